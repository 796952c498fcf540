"""The hot path compiled to C with mypyc, from the same typed Python (bench/README.md, "Session 6").

A round trip runs about a hundred Python functions; in the interpreter that was half of the
server's CPU. mypyc compiles the modules in COMPILED (strictly typed already: mypy --strict)
into C extensions: native classes with their attributes in C structs, calls between them as C
calls. The sources stay the only code: `dutserver compile` (run by `make run` and `make test`)
compiles them into build/native/ beside the package, with a digest of the sources they were
built from.

At import (dutserver/__init__.py) `use()` puts the compiled modules ahead of the sources only if
that digest matches the sources as they are now. Never built, edited since, another Python, no
C compiler, or DUTSERVER_NATIVE=0: the pure-Python modules run, which behave the same, only
slower. `active()` says which (the start-up line shows it).

What the compiled code asks of the sources (mypyc's rules, checked by the test suite running
compiled): declared types are checked at run time (a value of the wrong type is a TypeError,
so a third-party stub that says bytes where None comes must be read as Any); compiled
classes cannot be patched or subclassed from Python; module functions called from compiled code
are bound at compile time (patching the module attribute changes nothing); a class attribute of
a compiled class is a default of every instance (ClassVar for a shared one); and a closure keeps
its function's environment, which keeps the closure: a reference cycle per call, so the hot path
passes partials and methods instead (tests/test_no_garbage_cycles.py).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock; two builds at once there may fail, never mix
    fcntl = None  # type: ignore[assignment]

PACKAGE = Path(__file__).resolve().parent
NATIVE_DIR = PACKAGE.parent / "build" / "native"
GROUP = "dutserver"  # the shared library of the group: dutserver__mypyc

# The modules a request passes through, and what they import from us. The rest (app set-up,
# CLI, OpenAPI, the web files) runs once or rarely, and stays interpreted.
COMPILED = (
    "auth.py", "codec.py", "config.py", "direct.py", "dispatcher.py", "errors.py", "model.py",
    "protocol.py", "store.py", "tasks.py", "writer.py", "routes/api.py", "routes/classic.py",
    "routes/common.py",
)

_active = False


def sources_digest() -> str:
    """What a build is valid for: the compiled sources, and the Python that loads them."""
    digest = hashlib.sha256(sys.implementation.cache_tag.encode())
    for name in COMPILED:
        digest.update(name.encode() + b"\0" + (PACKAGE / name).read_bytes() + b"\0")
    return digest.hexdigest()


def is_fresh() -> bool:
    """Whether build/native holds a whole build of the sources as they are now (a module
    compiled and another not would refuse each other's objects)."""
    try:
        if (NATIVE_DIR / "SOURCES").read_text().strip() != sources_digest():
            return False
    except OSError:
        return False
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return (NATIVE_DIR / "lib" / (GROUP + "__mypyc" + suffix)).is_file() and all(
        (NATIVE_DIR / "dutserver" / name.replace(".py", suffix)).is_file() for name in COMPILED)


def use(package_path: list[str]) -> bool:
    """Puts a fresh build's modules ahead of the sources in the package's search path."""
    global _active
    if os.environ.get("DUTSERVER_NATIVE", "1") == "0" or not is_fresh():
        return False
    package_path.insert(0, str(NATIVE_DIR / "dutserver"))
    # The group's shared library is a top-level module that every compiled module imports.
    sys.path.insert(0, str(NATIVE_DIR / "lib"))
    _active = True
    return True


def use_in_subpackage(package_path: list[str], name: str) -> None:
    """dutserver.routes: its compiled modules live under the build too, when it is in use."""
    if _active:
        package_path.insert(0, str(NATIVE_DIR / "dutserver" / name))


def active() -> bool:
    return _active


# Runs in a fresh interpreter in a scratch directory: setuptools reads a pyproject.toml in the
# working directory, and ours is for hatchling.
_BUILD = """
import sys
from mypyc.build import mypycify
from setuptools import setup
out, scratch, group, *paths = sys.argv[1:]
setup(name="dutserver-native", ext_modules=mypycify(paths, target_dir=scratch + "/c",
                                                    group_name=group, multi_file=True),
      script_args=["build_ext", "--build-lib", out, "--build-temp", scratch + "/o",
                   "--parallel", str(max(1, len(__import__("os").sched_getaffinity(0))))])
"""


def build(target: Path = NATIVE_DIR, quiet: bool = True) -> None:
    """Compiles COMPILED into target, replacing an earlier build only once this one worked.
    Raises CalledProcessError when mypyc or the C compiler fails (their last lines on stderr).
    A second build at the same time waits for the first (a lock file beside the target)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".native.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        _build(target, quiet)


def _build(target: Path, quiet: bool) -> None:
    digest = sources_digest()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".native-") as scratch:
        out = Path(scratch) / "out"
        paths = [str(PACKAGE / name) for name in COMPILED]
        done = subprocess.run([sys.executable, "-c", _BUILD, str(out), scratch, GROUP, *paths],
                              cwd=scratch, stdout=subprocess.PIPE if quiet else None,
                              stderr=subprocess.STDOUT if quiet else None, text=True)
        if done.returncode != 0:  # mypyc's type errors, or the C compiler's: their last lines
            lines = (done.stdout or "").splitlines()
            print("\n".join(line for line in lines[-40:] if not line.startswith("gcc ")),
                  file=sys.stderr)
            raise subprocess.CalledProcessError(done.returncode, "mypyc")
        (out / "lib").mkdir()
        for library in out.glob(f"{GROUP}__mypyc*"):
            library.rename(out / "lib" / library.name)
        (out / "SOURCES").write_text(digest + "\n")
        # The old build moves into the scratch directory (deleted with it) and the new one into
        # place: a server starting in between finds none and runs the sources, never half.
        if target.exists():
            target.rename(Path(scratch) / "old")
        out.rename(target)
