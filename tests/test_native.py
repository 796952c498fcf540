"""The compiled hot path (dutserver/native.py): used when it was built from the sources as they
are, never otherwise, and the server says which it runs."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import PYTHON, ROOT, free_port, http, stop_process, wait_until

from dutserver import native


def test_the_suite_runs_the_compiled_hot_path() -> None:
    """`make test` compiles first: a build that silently fell back would leave the compiled
    code, which is what `make run` serves, untested."""
    if os.environ.get("DUTSERVER_NATIVE") == "0":
        pytest.skip("DUTSERVER_NATIVE=0: this run is of the interpreted hot path")
    if not native.is_fresh():
        pytest.fail("no build of the current sources: run `make native` (or `make test`)")
    import dutserver.direct
    import dutserver.protocol
    import dutserver.routes.classic
    import dutserver.tasks
    for module in (dutserver.direct, dutserver.protocol, dutserver.tasks,
                   dutserver.routes.classic):
        assert module.__file__ is not None and module.__file__.endswith(".so"), module
    assert native.active()


def _fake_build(root: Path, digest: str, missing: str | None = None) -> Path:
    """A build's layout with empty files where the extensions go (use() only looks)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (root / "dutserver" / "routes").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "lib" / f"{native.GROUP}__mypyc{suffix}").touch()
    for name in native.COMPILED:
        if name != missing:
            (root / "dutserver" / name.replace(".py", suffix)).touch()
    (root / "SOURCES").write_text(digest + "\n")
    return root


def test_a_build_of_other_sources_is_not_used(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Edited since the build (or built by another Python): the sources run, not stale C."""
    monkeypatch.setattr(native, "NATIVE_DIR", _fake_build(tmp_path, "0" * 64))
    monkeypatch.setattr(native, "_active", False)
    path = ["/the/sources"]
    assert not native.use(path)
    assert path == ["/the/sources"] and not native.active()


def test_a_build_missing_a_module_is_not_used(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a build (a copy interrupted, a file deleted): compiled code refuses the objects of
    an interpreted module of its group, so it is all or nothing."""
    build = _fake_build(tmp_path, native.sources_digest(), missing="routes/common.py")
    monkeypatch.setattr(native, "NATIVE_DIR", build)
    monkeypatch.setattr(native, "_active", False)
    monkeypatch.delenv("DUTSERVER_NATIVE", raising=False)
    path = ["/the/sources"]
    assert not native.use(path) and path == ["/the/sources"]


def test_a_fresh_build_comes_before_the_sources(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    build = _fake_build(tmp_path, native.sources_digest())
    monkeypatch.setattr(native, "NATIVE_DIR", build)
    monkeypatch.setattr(native, "_active", False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("DUTSERVER_NATIVE", raising=False)
    path, routes = ["/the/sources"], ["/the/sources/routes"]
    assert native.use(path)
    native.use_in_subpackage(routes, "routes")
    assert path == [str(build / "dutserver"), "/the/sources"]
    assert routes == [str(build / "dutserver" / "routes"), "/the/sources/routes"]
    assert sys.path[0] == str(build / "lib")  # where the group's shared library is

    monkeypatch.setattr(native, "_active", False)
    monkeypatch.setenv("DUTSERVER_NATIVE", "0")  # switched off: the sources
    assert not native.use(path := ["/the/sources"]) and path == ["/the/sources"]


def test_the_digest_follows_every_compiled_source() -> None:
    assert all((native.PACKAGE / name).is_file() for name in native.COMPILED)
    assert len(native.sources_digest()) == 64


@pytest.mark.parametrize("switch,says", [("0", "hot path interpreted"),
                                         ("1", "hot path compiled")])
def test_the_server_says_which_hot_path_it_runs(tmp_path: Path, switch: str, says: str) -> None:
    if switch == "1" and not native.is_fresh():
        pytest.skip("no build of the current sources (make native)")
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PYTHON, "-m", "dutserver", "server", str(port), str(tmp_path / "dut.db")],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "DUTSERVER_NATIVE": switch})
    try:
        wait_until(lambda: _alive(port), timeout_s=20)
        assert says in log.read_text()
    finally:
        stop_process(proc, 15, 20, "server did not stop")


def _alive(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
    except OSError:
        return False
