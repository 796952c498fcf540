"""The routes of each wire protocol: classic.py (PROTOCOL part 1), api.py (part 2), ops.py
(health, openapi, files). Each parses, makes one call into the core, and shapes the answer;
none imports the store or the dispatcher."""
