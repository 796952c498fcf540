"""The wheel's build hook: compiles the hot path (dutserver/native.py: COMPILED) with mypyc.

`pip install .` and `python -m build` build the wheel through this hook. With a C compiler and
the Python headers, the modules in COMPILED become C extensions beside their sources in the
package (an extension module is imported before a .py of the same name), plus the group's
shared library `dutserver__mypyc` at the top level, and the wheel is tagged for this Python and
platform. Otherwise the wheel is pure Python with the same behaviour, slower, and a note
(dutserver/_native.txt) that the start-up line shows. Editable installs and the sdist never
compile.

DUTSERVER_NATIVE: unset (or "auto") compiles when it can; "0" never compiles; "1" must compile
(a failure fails the build: `make native` uses it, so the dev build never silently falls back).
DUTSERVER_NATIVE_WORK: a directory to keep the build's intermediate files in (mypy's cache,
the C sources, the objects), so that a rebuild recompiles only what changed (`make native`).
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

GROUP = "dutserver"  # mypyc's shared library of the group: dutserver__mypyc

# Runs in a fresh interpreter in the work directory: setuptools and mypy read a pyproject.toml
# in the working directory, and ours is for hatchling (mypy runs with its defaults, as before,
# but for what [tool.mypy] also says: a dependency without types, such as asyncpg, is Any; in an
# isolated build, where no stubs happen to be installed, that was a type error, and so a pure
# wheel).
_BUILD = """
import os, sys
from mypyc.build import mypycify
from setuptools import setup
out, work, group, *paths = sys.argv[1:]
setup(name="dutserver-native", ext_modules=mypycify(["--ignore-missing-imports", *paths],
                                                    target_dir=work + "/c",
                                                    group_name=group, multi_file=True),
      script_args=["build_ext", "--build-lib", out, "--build-temp", work + "/o",
                   "--parallel", str(max(1, len(os.sched_getaffinity(0))))])
"""


def compiled_modules(root: Path) -> tuple[str, ...]:
    """native.COMPILED, read from the file's text (the package is not imported to build it)."""
    tree = ast.parse((root / "dutserver" / "native.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
                return value
    raise RuntimeError("dutserver/native.py: no COMPILED = (…) tuple of strings")


def missing_toolchain() -> str | None:
    """Why a C extension cannot be built here, found in milliseconds; None if it looks fine."""
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h; e.g. the python3-dev package)"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    words = shlex.split(cc)
    if not words or shutil.which(words[0]) is None:
        return f"no C compiler ({cc!r} not found)"
    return None


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if self.target_name != "wheel" or version == "editable":
            return
        mode = os.environ.get("DUTSERVER_NATIVE", "auto")
        root = Path(self.root)
        names = compiled_modules(root)
        if mode == "0":
            self._pure(build_data, "built with DUTSERVER_NATIVE=0")
            return
        reason = missing_toolchain()
        if reason is None:
            try:
                built = self._compile(root, names)
            except RuntimeError as e:
                reason = str(e)
            else:
                for source, target in built.items():
                    build_data["force_include"][str(source)] = target
                build_data["pure_python"] = False
                build_data["infer_tag"] = True
                self.app.display_info(f"dutserver: hot path compiled ({len(names)} modules)")
                return
        if mode == "1":
            raise RuntimeError(f"dutserver: the hot path could not be compiled: {reason}")
        self._pure(build_data, f"the build could not compile it: {reason}")

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def _work_dir(self) -> Path:
        if self._scratch is not None:
            return Path(self._scratch.name)
        kept = os.environ.get("DUTSERVER_NATIVE_WORK")
        if kept:
            path = Path(self.root, kept).resolve()
            path.mkdir(parents=True, exist_ok=True)
            return path
        self._scratch = tempfile.TemporaryDirectory(prefix="dutserver-native-")
        return Path(self._scratch.name)

    def _pure(self, build_data: dict[str, Any], why: str) -> None:
        """A pure-Python wheel, with the reason for the start-up line (native.describe())."""
        note = self._work_dir() / "_native.txt"
        note.write_text(why + "\n", encoding="utf-8")
        build_data["force_include"][str(note)] = "dutserver/_native.txt"
        print(f"dutserver: hot path NOT compiled, pure-Python wheel: {why}", file=sys.stderr)

    def _compile(self, root: Path, names: tuple[str, ...]) -> dict[Path, str]:
        """Runs mypyc and the C compiler; {built file: its path in the wheel}."""
        work = self._work_dir()
        out = work / "out"  # kept with the work directory: setuptools skips what is up to date
        paths = [str(root / "dutserver" / name) for name in names]
        self.app.display_info(f"dutserver: compiling the hot path with mypyc ({len(names)} "
                              "modules; about a minute)")
        done = subprocess.run([sys.executable, "-c", _BUILD, str(out), str(work), GROUP, *paths],
                              cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        (work / "mypyc.log").write_text(done.stdout, encoding="utf-8")
        if done.returncode != 0:  # mypyc's type errors, or the C compiler's: their last lines
            lines = [line for line in done.stdout.splitlines()
                     if line.strip() and not line.startswith(("gcc ", "cc ", "building "))]
            print("\n".join(lines[-30:]), file=sys.stderr)
            last = lines[-1] if lines else f"exit status {done.returncode}"
            raise RuntimeError(f"mypyc or the C compiler failed ({last.strip()[:200]})")
        # Only this build's modules: a kept directory may hold those of an earlier COMPILED.
        wanted = {f"dutserver/{name[:-3]}" for name in names} | {f"{GROUP}__mypyc"}
        built = {path: target for path in out.rglob("*")
                 if (target := path.relative_to(out).as_posix()).split(".", 1)[0] in wanted}
        missing = wanted - {target.split(".", 1)[0] for target in built.values()}
        if missing:
            raise RuntimeError(f"mypyc built no {', '.join(sorted(missing))}")
        return built
