"""Where the files the server serves live: web/ and the agent program.

In a source checkout they sit beside the package (../web, ../cli); an installed wheel carries
them inside the package (_web, _cli). The server reads them as files; it never imports cli/.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for path in candidates:
        if path.exists():
            return path
    return candidates[0]


def web_dir() -> Path:
    return _first_existing(_PACKAGE / "_web", _PACKAGE.parent / "web")


def client_program(name: str) -> Path:
    """cli/dutagent.py or cli/dutctl.py."""
    return _first_existing(_PACKAGE / "_cli" / name, _PACKAGE.parent / "cli" / name)
