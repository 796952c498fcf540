"""Who is asking (dutserver/core/auth.py, throttle.py, accounts.py), in-process on fakes: agent
credentials, bans, admin logins and sessions, also across two processes on one store."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from core_support import ADDRESS, ADMIN_PASSWORD, AGENT_SECRET, Node, spin, start_node
from dutserver.core.accounts import Accounts
from dutserver.core.auth import Auth
from dutserver.core.errors import ApiError
from fakes import FakeClock, FakeStore

AGENT_HEADER = f"agent1:{AGENT_SECRET}"
WRONG_HEADER = "agent1:not-the-secret-of-agent1"


async def refused(coro: object, status: int) -> ApiError:
    with pytest.raises(ApiError) as e:
        await coro  # type: ignore[misc]
    assert e.value.status == status, e.value.msg
    return e.value


async def two_nodes(tmp_path: Path, **overrides: object) -> tuple[Node, Node]:
    """Two processes on one database, with one clock."""
    a = await start_node(tmp_path, store=FakeStore("a"), **overrides)  # type: ignore[arg-type]
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock,
                         **overrides)  # type: ignore[arg-type]
    return a, b


# --- agents -------------------------------------------------------------------------------------

async def test_an_agents_credentials_are_accepted_in_both_forms(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    assert await node.auth.agent(AGENT_HEADER, ADDRESS) == "agent1"
    basic = "Basic " + base64.b64encode(AGENT_HEADER.encode()).decode()
    assert await node.auth.agent(basic, ADDRESS) == "agent1"
    assert node.auth.agent_known(AGENT_HEADER, ADDRESS) == "agent1"  # from memory, no refresh


async def test_wrong_agent_credentials_are_refused(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    for header in (WRONG_HEADER, f"nobody:{AGENT_SECRET}", f"admin:{ADMIN_PASSWORD}",
                   "agent1", "", None, "Basic !!!", f":{AGENT_SECRET}"):
        await refused(node.auth.agent(header, ADDRESS), 403)


async def test_an_agent_added_on_another_process_is_accepted(tmp_path: Path) -> None:
    a, b = await two_nodes(tmp_path)
    await b.auth.create_account("agent9", "agent", AGENT_SECRET, "admin", None)
    assert await a.auth.agent(f"agent9:{AGENT_SECRET}", ADDRESS) == "agent9"


def record_store_calls(store: FakeStore) -> list[str]:
    """The names of the store's methods as the core calls them, in order (the core reaches the
    store through its attributes, so wrapping them on the instance sees every call)."""
    calls: list[str] = []
    for name in dir(store):
        method = getattr(store, name)
        if name.startswith("_") or not callable(method):
            continue

        def wrapper(*args: Any, _name: str = name, _method: Any = method, **kw: Any) -> Any:
            calls.append(_name)
            return _method(*args, **kw)
        setattr(store, name, wrapper)
    return calls


async def test_an_unknown_agent_and_a_wrong_secret_do_the_same_work(tmp_path: Path) -> None:
    """What an attacker could time: both failures read the store the same way and leave the same
    trace (the HMAC is computed for either; no early return for a name that does not exist)."""
    node = await start_node(tmp_path, ban_failures=1000)
    calls = record_store_calls(node.store)
    traces = []
    for header in (WRONG_HEADER, f"nobody:{AGENT_SECRET}", f"admin:{ADMIN_PASSWORD}"):
        calls.clear()
        await refused(node.auth.agent(header, ADDRESS), 403)
        traces.append(list(calls))
    assert traces[0] == traces[1] == traces[2], traces
    assert "audit" in traces[0]  # each is recorded as a failure


async def test_a_wrong_login_name_costs_one_argon2_verification_like_a_wrong_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skipping the (slow on purpose) hash for unknown names would tell which names exist."""
    node = await start_node(tmp_path, ban_failures=1000)
    verified: list[str] = []
    real_verify = PasswordHasher.verify

    def counting_verify(self: PasswordHasher, stored: Any, password: Any) -> Any:
        verified.append(password)
        return real_verify(self, stored, password)
    monkeypatch.setattr(PasswordHasher, "verify", counting_verify)
    calls = record_store_calls(node.store)
    traces = []
    for user in ("admin", "no-such-user", "agent1"):
        verified.clear()
        calls.clear()
        await refused(node.auth.login(user, "not-the-password", ADDRESS), 403)
        assert verified == ["not-the-password"], user
        traces.append(list(calls))
    assert traces[0] == traces[1] == traces[2], traces


async def test_failures_ban_an_agent_from_that_address_on_every_process(tmp_path: Path) -> None:
    """Wrong secrets for one agent from one address get 429 there, on every node, for the ban's
    length; the right secret is never refused (issue 18: a room behind one NAT)."""
    a, b = await two_nodes(tmp_path, ban_failures=3, ban_s=30.0)
    for _ in range(3):
        await refused(a.auth.agent(WRONG_HEADER, ADDRESS), 403)
    err = await refused(a.auth.agent(WRONG_HEADER, ADDRESS), 429)
    assert err.headers == {"Retry-After": "30"}
    assert await a.auth.agent(AGENT_HEADER, ADDRESS) == "agent1"  # the right secret: served
    await refused(a.auth.agent(WRONG_HEADER, "10.9.9.9"), 403)  # from elsewhere: not banned

    await refused(b.auth.agent(WRONG_HEADER, ADDRESS), 403)  # b has not read it yet
    await a.store.barrier()  # the ban is committed,
    await b.auth.refresh()  # and b reads the bans (every accounts_refresh_s)
    err = await refused(b.auth.agent(WRONG_HEADER, ADDRESS), 429)
    assert err.headers == {"Retry-After": "30"}
    assert await b.auth.agent(AGENT_HEADER, ADDRESS) == "agent1"

    a.clock.advance(10)
    err = await refused(a.auth.agent(WRONG_HEADER, ADDRESS), 429)
    assert err.headers == {"Retry-After": "20"}
    a.clock.advance(20)  # the ban ends, on both
    await refused(a.auth.agent(WRONG_HEADER, ADDRESS), 403)
    await b.auth.refresh()
    await refused(b.auth.agent(WRONG_HEADER, ADDRESS), 403)


async def test_failures_spread_over_more_than_the_window_do_not_ban(tmp_path: Path) -> None:
    node = await start_node(tmp_path, ban_failures=3, ban_s=30.0)
    for _ in range(2):
        await refused(node.auth.agent(WRONG_HEADER, ADDRESS), 403)
    node.clock.advance(61)  # failures count for max(ban_s, 60) seconds
    await refused(node.auth.agent(WRONG_HEADER, ADDRESS), 403)
    assert await node.auth.agent(AGENT_HEADER, ADDRESS) == "agent1"


async def test_a_changed_agent_secret_ends_the_old_one_on_every_process(tmp_path: Path) -> None:
    a, b = await two_nodes(tmp_path)
    assert await b.auth.agent(AGENT_HEADER, ADDRESS) == "agent1"  # remembered by b
    accounts = Accounts(a.store, a.clock, a.auth, a.tasks)
    await accounts.set_password("agent1", "a-brand-new-agent-secret", "admin", None)
    await refused(a.auth.agent(AGENT_HEADER, ADDRESS), 403)
    await b.auth.refresh()
    await refused(b.auth.agent(AGENT_HEADER, ADDRESS), 403)
    assert await b.auth.agent("agent1:a-brand-new-agent-secret", ADDRESS) == "agent1"


# --- admins: logins and sessions ----------------------------------------------------------------

async def login(node: Node, password: str = ADMIN_PASSWORD, user: str = "admin") -> str:
    return "Bearer " + await node.auth.login(user, password, ADDRESS)


async def test_login_opens_a_session(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    header = await login(node)
    assert node.auth.session(header) == "admin"
    assert node.auth.session(header.removeprefix("Bearer ")) == "admin"  # the bare token too
    assert await node.auth.session_of(header) == "admin"
    assert node.auth.session(None) is None
    assert node.auth.session("Bearer " + "0" * 64) is None
    assert await node.auth.session_of("Bearer " + "0" * 64) is None


async def test_bad_logins_are_refused(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    for user, password in (("admin", "wrong-password"), ("nobody", ADMIN_PASSWORD),
                           ("agent1", AGENT_SECRET), ("", ADMIN_PASSWORD), (None, None),
                           ("admin", "x" * 2000)):
        await refused(node.auth.login(user, password, ADDRESS), 403)


async def test_failed_logins_ban_that_admin_from_that_address(tmp_path: Path) -> None:
    node = await start_node(tmp_path, ban_failures=3, ban_s=30.0)
    for _ in range(3):
        await refused(node.auth.login("admin", "wrong-password", ADDRESS), 403)
    err = await refused(node.auth.login("admin", ADMIN_PASSWORD, ADDRESS), 429)
    assert err.headers == {"Retry-After": "30"}
    assert await node.auth.login("admin", ADMIN_PASSWORD, "10.9.9.9")
    node.clock.advance(30)
    assert await login(node)


async def test_a_session_ends_after_being_idle_for_session_idle_s(tmp_path: Path) -> None:
    node = await start_node(tmp_path, session_idle_s=60.0)
    header = await login(node)
    for _ in range(3):  # in use: it stays, well past session_idle_s in all
        node.clock.advance(50)
        assert await node.auth.session_of(header) == "admin"
    node.clock.advance(61)
    assert node.auth.session(header) is None
    assert await node.auth.session_of(header) is None
    node.auth.flush_sessions()
    await node.store.barrier()
    assert node.store.db.sessions == {}


async def test_a_session_ends_after_session_max_s_even_in_use(tmp_path: Path) -> None:
    node = await start_node(tmp_path, session_idle_s=60.0, session_max_s=120.0)
    header = await login(node)
    node.clock.advance(50)
    assert await node.auth.session_of(header) == "admin"
    node.clock.advance(50)
    assert await node.auth.session_of(header) == "admin"
    node.clock.advance(50)
    assert await node.auth.session_of(header) is None


async def test_a_session_opened_on_one_process_works_on_another(tmp_path: Path) -> None:
    a, b = await two_nodes(tmp_path)
    header = await login(a)
    assert b.auth.session(header) is None  # b cannot tell from memory,
    assert await b.auth.session_of(header) == "admin"  # so it reads the store
    assert b.auth.session(header) == "admin"


async def test_a_logout_on_one_process_holds_on_another_after_session_cache_s(
        tmp_path: Path) -> None:
    a, b = await two_nodes(tmp_path, session_cache_s=1.0)
    header = await login(a)
    assert await b.auth.session_of(header) == "admin"
    await a.auth.logout(header, ADDRESS)
    assert a.auth.session(header) is None
    assert await a.auth.session_of(header) is None
    await a.store.barrier()  # the logout is committed

    assert b.auth.session(header) == "admin"  # b trusts its memory for session_cache_s
    a.clock.advance(1.01)
    assert b.auth.session(header) is None  # then it no longer does,
    assert await b.auth.session_of(header) is None  # and the store says it ended


async def test_a_changed_password_ends_the_sessions_on_every_process(tmp_path: Path) -> None:
    a, b = await two_nodes(tmp_path)
    header = await login(a)
    assert await b.auth.session_of(header) == "admin"
    accounts = Accounts(a.store, a.clock, a.auth, a.tasks)
    await accounts.set_password("admin", "new-password-1", "admin", ADDRESS)
    assert a.auth.session(header) is None
    assert await a.auth.session_of(header) is None
    await b.auth.refresh()  # every accounts_refresh_s
    assert b.auth.session(header) is None  # before session_cache_s
    assert await b.auth.session_of(header) is None
    await refused(a.auth.login("admin", ADMIN_PASSWORD, ADDRESS), 403)
    new = "Bearer " + await a.auth.login("admin", "new-password-1", ADDRESS)
    assert await b.auth.session_of(new) == "admin"


async def test_a_removed_admins_sessions_end(tmp_path: Path) -> None:
    a, b = await two_nodes(tmp_path, admins=("admin", "other"))
    header = await login(a, user="other")
    assert await b.auth.session_of(header) == "other"
    accounts = Accounts(a.store, a.clock, a.auth, a.tasks)
    await accounts.remove("other", "admin", ADDRESS)
    assert a.auth.session(header) is None
    await b.auth.refresh()
    assert b.auth.session(header) is None
    assert await b.auth.session_of(header) is None


async def test_creating_an_account_that_exists_is_409(tmp_path: Path) -> None:
    a, b = await two_nodes(tmp_path)
    await refused(a.auth.create_account("agent1", "agent", AGENT_SECRET, "admin", None), 409)
    await a.auth.create_account("agent7", "agent", AGENT_SECRET, "admin", None)
    # b has not refreshed: the store refuses it all the same
    await refused(b.auth.create_account("agent7", "agent", AGENT_SECRET, "admin", None), 409)
    await refused(a.auth.create_account("bad name", "agent", AGENT_SECRET, "admin", None), 400)
    await refused(a.auth.create_account("agent8", "agent", "short", "admin", None), 400)


async def test_the_key_file_is_made_once_and_shared(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    assert node.settings.key_path.exists()
    again = Auth(node.settings, FakeStore(), FakeClock())
    assert again.key == node.auth.key


async def test_a_session_in_steady_use_notices_a_logout_elsewhere_without_waiting(
        tmp_path: Path) -> None:
    a, b = await two_nodes(tmp_path, session_cache_s=1.0)
    header = await login(a)
    assert await b.auth.session_of(header) == "admin"
    await a.auth.logout(header, ADDRESS)
    await a.store.barrier()
    a.clock.advance(0.6)  # past half of session_cache_s: b reads it again in the background
    assert b.auth.session(header) == "admin"
    await spin()
    assert b.auth.session(header) is None


async def test_a_session_in_use_on_another_process_is_not_ended_by_this_ones_sweep(
        tmp_path: Path) -> None:
    """BUG (core/auth.py, Auth.flush_sessions): a's sweep deletes from the store a session
    that a last saw long ago, although b has been using it all along (and wrote that use)."""
    a, b = await two_nodes(tmp_path, session_idle_s=60.0)
    header = await login(a)  # opened on a, then used on b only (a load balancer's choice)
    for _ in range(4):
        a.clock.advance(40)
        assert await b.auth.session_of(header) == "admin"
        b.services.sweep()  # every sweep_interval_s on each node
        a.services.sweep()
        await spin()
    assert await b.auth.session_of(header) == "admin"
