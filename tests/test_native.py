"""The compiled hot path (dutserver/native.py, hatch_build.py): the wheel compiles it when it
can and is pure Python otherwise, `make test` runs the compiled build of the sources as they
are, and the server says which it runs."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from support import PYTHON, ROOT, free_port, http, stop_process, wait_until

import dutserver
from dutserver import native

PACKAGE = Path(dutserver.__file__).resolve().parent
FROM_SOURCES = PACKAGE == ROOT / "dutserver"
EXTENSION = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def _hook() -> ModuleType:
    """hatch_build.py, loaded from its file (it is no module of the package)."""
    pytest.importorskip("hatchling", reason="hatchling (the `native` extra) is not installed")
    spec = importlib.util.spec_from_file_location("hatch_build", ROOT / "hatch_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiled_build() -> None:
    if os.environ.get("DUTSERVER_NATIVE") == "0":
        pytest.skip("DUTSERVER_NATIVE=0: this run is of the sources, interpreted")
    build = str(ROOT / "build" / "native")
    if FROM_SOURCES and build in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        pytest.fail(f"make test put {build} first on the path, yet this process imported the "
                    "sources: something put the checkout ahead of it on sys.path before "
                    "dutserver was first imported (a sys.path.insert(0, ROOT) in a test module?)")
    if FROM_SOURCES:
        pytest.skip("this run imports the sources, which run interpreted: `make test` runs "
                    "the suite on their compiled build (build/native)")


def test_the_suite_runs_the_compiled_hot_path() -> None:
    """`make test` builds first: a build that fell back to pure Python would leave the compiled
    code, which is what `make run` and a `pip install .` serve, untested."""
    _compiled_build()
    note = PACKAGE / "_native.txt"
    assert not note.exists(), f"{PACKAGE} is a pure-Python build: {note.read_text().strip()}"
    for name in native.COMPILED:
        module = importlib.import_module("dutserver." + name[:-3].replace("/", "."))
        assert (module.__file__ or "").endswith(EXTENSION), module
    assert native.active() and native.describe() == "compiled"


def test_the_build_is_of_the_sources_as_they_are() -> None:
    """Never a stale build: the build carries every source it was made from (the compiled
    ones beside their extension modules); make rebuilds it when one was edited, added or
    removed."""
    _compiled_build()
    sources = {p.relative_to(ROOT / "dutserver") for p in (ROOT / "dutserver").rglob("*.py")}
    built = {p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if "_cli" not in p.parts}
    assert built == sources, "build/native is not of these sources: run `make native`"
    stale = [str(p) for p in sources
             if (PACKAGE / p).read_bytes() != (ROOT / "dutserver" / p).read_bytes()]
    assert not stale, f"edited since the build: {stale} (run `make native`)"


def test_the_hook_compiles_what_native_lists() -> None:
    """COMPILED is the one list: the hook reads it from native.py's text, without importing."""
    hook = _hook()
    assert hook.compiled_modules(ROOT) == native.COMPILED
    assert all((ROOT / "dutserver" / name).is_file() for name in native.COMPILED)


def test_the_hook_sees_a_missing_compiler_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _hook()
    monkeypatch.setenv("CC", "/nonexistent/cc -O2")
    assert "no C compiler" in (hook.missing_toolchain() or "")


def _serve(tmp_path: Path, env: dict[str, str]) -> str:
    """Starts `python -m dutserver server` with env, from the checkout; its output once ready."""
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PYTHON, "-m", "dutserver", "server", str(port), str(tmp_path / "dut.db")],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: _alive(port, proc), timeout_s=20)
        return log.read_text()
    finally:
        stop_process(proc, 15, 20, "server did not stop")


def _alive(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"server exited ({proc.returncode})"
    try:
        return http("GET", f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
    except OSError:
        return False


def _without_build(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}


@pytest.mark.parametrize("run", ["as this suite", "the sources"])
def test_the_server_says_which_hot_path_it_runs(tmp_path: Path, run: str) -> None:
    if run == "the sources":
        output = _serve(tmp_path, _without_build(dict(os.environ)))
        assert "hot path interpreted: the sources of a checkout" in output
    else:
        output = _serve(tmp_path, dict(os.environ))
        assert f"hot path {native.describe()})" in output


@pytest.mark.timeout(240)
def test_without_a_compiler_the_wheel_is_pure_python_and_works(tmp_path: Path) -> None:
    """A C compiler that fails (mypyc has type-checked and written the C by then): the build
    says why on stderr and makes a pure-Python wheel, which serves, and says so at start-up.
    The one wheel build of the suite (about 20 s: mypyc's type check runs first)."""
    _hook()  # the build backend, installed in this environment (no download)
    env = {**_without_build(dict(os.environ)), "CC": "/bin/false"}
    env.pop("DUTSERVER_NATIVE", None)
    env.pop("DUTSERVER_NATIVE_WORK", None)
    done = subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, env=env, timeout=220)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "hot path NOT compiled, pure-Python wheel" in done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("dutserver-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert not [n for n in names if n.endswith(EXTENSION)]
        assert "failed" in z.read("dutserver/_native.txt").decode()
        z.extractall(tmp_path / "site")
    output = _serve(tmp_path, {**env, "PYTHONPATH": str(tmp_path / "site"),
                               "PYTHONSAFEPATH": "1"})
    assert "hot path interpreted: the build could not compile it: mypyc or the C compiler" \
        in output


def test_the_package_type_checks_as_the_wheels_build_demands() -> None:
    """The wheel's build runs mypy over the package before it compiles; one type error anywhere
    in it (not only in the compiled modules) and `pip install .` quietly gives an interpreted
    server, three times slower. This is that check, with the project's mypy settings."""
    mypy = Path(PYTHON).with_name("mypy")
    if not mypy.exists():
        pytest.skip("mypy (the `native` extra) is not installed")
    run = subprocess.run([str(mypy), "--config-file", str(ROOT / "pyproject.toml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
