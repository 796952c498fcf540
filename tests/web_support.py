"""Browser-test support: Debian's chromium driven by Playwright, real dutagent subprocesses,
and a scripted agent for data the real agent never sends (hostile result shapes)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import ADMIN, FAST_ARGS, PYTHON, ROOT, RunningServer, http, wait_until

CHROMIUM = Path(os.environ.get("DUT_CHROMIUM", "/usr/bin/chromium"))
DUTAGENT = ROOT / "cli" / "dutagent.py"
ARTIFACTS = Path(os.environ.get("DUT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
AGENT_SECRET = "web-agent-secret-0123456789"
HOSTILE = "<img src=x onerror=alert(1)>"
# The server keeps an agent's version up to the first space of its User-Agent.
HOSTILE_WORD = "<svg/onload=alert(1)>"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not CHROMIUM.exists():
        return (f"no chromium at {CHROMIUM}: install Debian's package (apt-get install chromium), "
                "as .ci/run does, or point DUT_CHROMIUM at one")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[test]')"
    return None


# The browser and the shared server outlive one test module: test_web.py and test_web_agents.py
# import these fixtures, which gives each module its own fixture definition, so the instances
# live here and end with the test session.
_session_objects: dict[str, Any] = {}


def _once(request: pytest.FixtureRequest, key: str, make: Callable[[], Any],
          close: Callable[[Any], None]) -> Any:
    if key not in _session_objects:
        value = make()
        _session_objects[key] = value

        def finish() -> None:
            del _session_objects[key]
            close(value)
        request.session.addfinalizer(finish)
    return _session_objects[key]


def _launch() -> tuple[Any, Any]:
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        return pw, pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    except BaseException:
        pw.stop()
        raise


def _close(launched: tuple[Any, Any]) -> None:
    pw, chromium = launched
    chromium.close()
    pw.stop()


@pytest.fixture(scope="module")
def web_browser(request: pytest.FixtureRequest) -> Any:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return _once(request, "browser", _launch, _close)[1]


@dataclass
class Watch:
    """What a page did that a test must know about: native dialogs, uncaught errors, URLs."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)


def open_page(browser: Any, viewport: dict[str, int] = LAPTOP) -> tuple[Any, Any, Watch]:
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    context.set_default_timeout(5000)
    page = context.new_page()
    watch = Watch()

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
    page.on("request", lambda req: watch.urls.append(req.url))
    return context, page, watch


@pytest.fixture
def web(web_browser: Any, request: pytest.FixtureRequest) -> Iterator[tuple[Any, Watch]]:
    """(page, watch) at laptop size. A failing test leaves a screenshot in test-artifacts/;
    an uncaught script error on the page fails the test even if its assertions passed."""
    context, page, watch = open_page(web_browser)
    failed_before = request.session.testsfailed
    yield page, watch
    try:
        # The call phase's report is counted before fixtures are torn down.
        if request.session.testsfailed > failed_before:
            screenshot(page, request.node.name)
    finally:
        context.close()
    assert not watch.errors, f"uncaught script errors on the page: {watch.errors}"


def screenshot(page: Any, name: str) -> Path | None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
    from playwright.sync_api import Error

    try:
        page.screenshot(path=str(path), full_page=True)
    except Error as exc:  # the page may be gone; the test's own failure matters more
        print(f"screenshot failed: {exc}")
        return None
    print(f"screenshot: {path}")
    return path


def log_in(page: Any, server: RunningServer, user: str = "admin",
           password: str = "adminpass1") -> None:
    page.goto(server.url + "/")
    page.get_by_label("User").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="Agents").wait_for()


def logged_in(page: Any, server: RunningServer, token: str, hash_path: str = "#/") -> None:
    """Opens the client with an existing session, as a reload after logging in would: the
    tests that are not about the login form skip its seconds of password hashing."""
    page.goto(server.url + "/")
    page.evaluate("([t]) => { sessionStorage.setItem('dutserver.token', t);"
                  " sessionStorage.setItem('dutserver.user', 'admin'); }", [token])
    page.goto(f"{server.url}/{hash_path}")
    page.reload()
    page.locator("#topbar").wait_for()


def token_of(page: Any) -> str | None:
    return page.evaluate("sessionStorage.getItem('dutserver.token')")  # type: ignore[no-any-return]


def api(server: RunningServer, token: str, method: str, path: str, body: Any = None) -> Any:
    status, _, data = http(method, server.url + path, body, {"Authorization": token})
    assert status < 300, (status, data)
    return json.loads(data) if data else None


class Agents:
    """Real `cli/dutagent.py` agents, each running in a directory named after it."""

    def __init__(self, server: RunningServer, base: Path, token: str | None = None) -> None:
        self.server = server
        self.base = base
        self.token = token or server.login()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def register(self, name: str) -> None:
        api(self.server, self.token, "POST", "/api/v1/accounts",
            {"name": name, "type": "agent", "password": AGENT_SECRET})

    def start(self, *names: str, register: bool = True) -> dict[str, Path]:
        """Starts agents; returns their working directories once all are online."""
        if not DUTAGENT.exists():
            pytest.skip("cli/dutagent.py is not in the tree yet")
        dirs = {}
        for name in names:
            if register:
                self.register(name)
            cwd = self.base / name
            cwd.mkdir(parents=True, exist_ok=True)
            with open(cwd.parent / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    [PYTHON, str(DUTAGENT), "run", "--server", self.server.url, "--name", name,
                     "--backoff-min-s", "0.1", "--backoff-max-s", "0.5"],
                    cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                    env=dict(os.environ, DUTAGENT_SECRET=AGENT_SECRET))
            dirs[name] = cwd
        wait_until(lambda: self.online() >= set(names), timeout_s=10)
        return dirs

    def online(self) -> set[str]:
        agents = api(self.server, self.token, "GET", "/api/v1/agents?inventory=0")["agents"]
        return {a["name"] for a in agents if a["online"]}

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for name in list(self.procs):
            self.stop(name)


def add_accounts(db: Path, accounts: list[tuple[str, str, str]]) -> None:
    """(name, kind, password) through the real `dutserver addaccount`, run in-process: a
    subprocess each would spend most of its time starting Python."""
    from click.testing import CliRunner

    from dutserver.cli import main

    runner = CliRunner()
    for name, kind, password in accounts:
        result = runner.invoke(main, ["addaccount", str(db), name, kind], input=password + "\n")
        assert result.exit_code == 0, result.output


def server_with(tmp_path: Path, *args: str,
                agents: list[str] | tuple[str, ...] = ()) -> RunningServer:
    """A server with fast timeouts, the admin ADMIN and the given agent accounts."""
    db = tmp_path / "dut.db"
    add_accounts(db, [(ADMIN[0], "admin", ADMIN[1])]
                 + [(name, "agent", AGENT_SECRET) for name in agents])
    return RunningServer(db=db, args=[*FAST_ARGS, *args]).start()


@pytest.fixture(scope="module")
def web_server(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """One server for the browser tests, since starting one costs seconds; each test uses its
    own agent names (and so its own dashboard group), so tests cannot see each other's agents."""
    server: RunningServer = _once(
        request, "server", lambda: server_with(tmp_path_factory.mktemp("web-server")),
        lambda srv: srv.stop())
    return server


@pytest.fixture(scope="module")
def web_token(request: pytest.FixtureRequest, web_server: RunningServer) -> str:
    """One admin session for all of them (each login costs an argon2 hash)."""
    token: str = _once(request, "token", web_server.login, lambda _: None)
    return token


@pytest.fixture
def web_agents(web_server: RunningServer, web_token: str, tmp_path: Path) -> Iterator[Agents]:
    pool = Agents(web_server, tmp_path / "agents", web_token)
    yield pool
    pool.stop_all()


class ScriptedAgent(threading.Thread):
    """Speaks the agent side of the protocol with results made by `answer(task)`: for what the
    real agent never sends (wrong types, markup in every field, a hostile version string)."""

    def __init__(self, server: RunningServer, name: str, answer: Callable[[dict[str, Any]], Any],
                 user_agent: str) -> None:
        super().__init__(daemon=True)
        self.url = server.url
        self.answer = answer
        self.headers = {
            "Authorization": "Basic " + base64.b64encode(f"{name}:{AGENT_SECRET}".encode()).decode(),
            "User-Agent": user_agent,
        }
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                status, _, body = http("GET", self.url + "/tasks", headers=self.headers, timeout=5)
            except OSError:
                continue
            task = json.loads(body) if status == 200 and body else {}
            if "id" in task:
                http("POST", f"{self.url}/tasks_result?id={task['id']}", self.answer(task),
                     self.headers)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
