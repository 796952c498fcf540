"""Which modules are compiled, and whether they run compiled.

The wheel's build hook (hatch_build.py: `pip install .`, `python -m build`, `make native`) reads
COMPILED from this file's text and compiles those modules with mypyc into the wheel when a C
compiler and the Python headers are there: each becomes an extension module beside its source,
which the import system prefers. Without them the wheel is pure Python, the same behaviour,
slower, and carries _native.txt, the reason, for the start-up line. Nothing here runs at
import: the interpreter imports whichever the installation holds. In a checkout, `make run` and
`make test` run the build of the sources as they are (build/native, rebuilt when a source
changed); the sources themselves run interpreted.

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
from pathlib import Path

# The modules a request passes through (under dutserver/). The rest (app set-up, the CLI,
# OpenAPI, the web files) runs once or rarely, and stays interpreted.
COMPILED = (
    "config.py",
    "core/auth.py", "core/clock.py", "core/codec.py", "core/credentials.py",
    "core/dispatcher.py", "core/errors.py", "core/fleet.py", "core/model.py", "core/notify.py",
    "core/services.py", "core/tasks.py", "core/throttle.py", "core/views.py", "core/waiting.py",
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
    """For the start-up line: "compiled", or "interpreted: why"."""
    if active():
        return "compiled"
    package = Path(__file__).resolve().parent
    try:  # written by the build hook into a wheel it could not compile
        why = (package / "_native.txt").read_text(encoding="utf-8").strip()
    except OSError:
        if (package.parent / "hatch_build.py").is_file():
            why = "the sources of a checkout (`make run` runs them compiled)"
        else:
            why = "installed without its compiled modules"
    return f"interpreted: {why}"
