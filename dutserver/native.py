"""Whether the hot path runs compiled: the wheel's build hook (hatch_build.py) compiles the
modules in COMPILED with mypyc when a C compiler is there; otherwise the same modules run
interpreted, the same behaviour, slower. Nothing here runs at import.

What compiled code asks of those modules' sources (mypyc's rules): declared types are checked
at run time (a value of the wrong type is a TypeError, so a third-party stub that says bytes
where None comes must be read as Any); compiled classes cannot be patched or subclassed from
Python; module functions called from compiled code are bound at compile time (patching the
module attribute changes nothing); a class attribute of a compiled class is a default of every
instance (ClassVar for a shared one); and a closure keeps its function's environment, which keeps
the closure: a reference cycle per call, so the hot path passes partials and methods instead
(tests/test_no_garbage_cycles.py). Modules outside COMPILED need not follow these rules.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

# The modules a request passes through (under dutserver/). The rest (app set-up, the CLI,
# OpenAPI, the web files) runs once or rarely, and stays interpreted.
COMPILED = (
    "config.py",
    "core/auth.py", "core/clock.py", "core/codec.py", "core/credentials.py",
    "core/dispatcher.py", "core/errors.py", "core/fleet.py", "core/model.py", "core/tasks.py",
    "core/throttle.py", "core/views.py", "core/waiting.py",
    "http/answer.py", "http/direct.py", "http/endpoint.py", "http/protocol.py",
    "http/request.py",
    "routes/api.py", "routes/classic.py",
    "store/sqlite.py", "store/sqlite_sql.py", "store/writer.py",
)


def active() -> bool:
    """Whether the hot path was imported compiled (its modules are extension modules)."""
    spec = importlib.util.find_spec("dutserver.core.tasks")
    origin = (spec.origin if spec is not None else None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def describe() -> str:
    """For the start-up line."""
    if active():
        return "compiled"
    return "interpreted: install with a C compiler present to compile it (dutserver/native.py)"
