"""The store suite for enrollment (store/enrollment_sql.py, written once): the same tests on
SQLite and PostgreSQL, through the Store port, as the core uses it."""

from __future__ import annotations

import asyncio
import json

from test_store import OpenStore, open_store  # noqa: F401, F811  (the parametrized fixture)
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)

FAR = 10**13


async def _request(store: object, digest: str | None, name: str = "pc-17",
                   machine: str | None = "m1", now: int = 10, pending_max: int = 100,
                   address: str = "10.0.0.1") -> object:
    return await store.add_enrollment(  # type: ignore[attr-defined]
        "agent", digest, name, json.dumps({"hostname": name}), '["ping"]', address,
        "hmac-sha256$" + name, machine, None, None, now, pending_max)


async def test_a_token_is_used_up_atomically_by_racing_requests(open_store: OpenStore) -> None:  # noqa: F811
    one, two = await open_store("a"), await open_store("b")
    await one.add_enroll_token("t", "lab", "admin", 1, FAR, 3, '{"room": "204"}', False)
    results = await asyncio.gather(*(_request(s, "t", f"pc-{i}", f"m{i}")
                                     for i, s in enumerate([one, two] * 5)))
    granted = [r for r in results if r is not None]
    assert len(granted) == 3  # ten machines raced for three uses, on two nodes
    (token,) = await one.enroll_tokens()
    assert token.uses == 3
    record, auto, labels = granted[0]  # type: ignore[misc]
    assert (record.state, auto, json.loads(labels)) == ("pending", False, {"room": "204"})


async def test_expired_and_revoked_tokens_admit_nobody(open_store: OpenStore) -> None:  # noqa: F811
    store = await open_store()
    await store.add_enroll_token("old", "", "admin", 1, 5, None, "{}", False)
    token_id = await store.add_enroll_token("rev", "", "admin", 1, FAR, None, "{}", False)
    assert await _request(store, "old", now=10) is None
    assert await _request(store, "nonesuch") is None
    assert await _request(store, "rev") is not None
    assert await store.revoke_enroll_token(token_id, 20)
    assert await _request(store, "rev") is None
    assert not await store.revoke_enroll_token(token_id, 21)  # once


async def test_accepting_makes_a_unique_agent_account(open_store: OpenStore) -> None:  # noqa: F811
    store = await open_store()
    await store.add_enroll_token("t", "", "admin", 1, FAR, None, '{"room": "204"}', True)
    first = await _request(store, "t", "pc-17", "m1")
    record, auto, _ = first  # type: ignore[misc]
    assert auto  # the token says so, and it is nobody's duplicate
    accepted = await store.accept_enrollment(record.id, None, '{"role": "build"}', "admin", 11)
    assert accepted.state == "accepted" and accepted.name == "pc-17"  # type: ignore[union-attr]
    assert json.loads(accepted.labels) == {"room": "204", "role": "build"}  # type: ignore[union-attr]
    account = await store.account("pc-17")
    assert account is not None and account.secret_hash == "hmac-sha256$pc-17"
    assert json.loads(account.capabilities or "[]") == ["ping"]
    # Another machine with the same host name and machine id: a flagged duplicate, pending
    # whatever its token says; accepted, it gets a name of its own.
    second, auto, _ = await _request(store, "t", "pc-17", "m1")  # type: ignore[misc]
    assert second.duplicate_of == "pc-17" and not auto
    again = await store.accept_enrollment(second.id, None, None, "admin", 12)
    assert again.name == "pc-17-2"  # type: ignore[union-attr]
    assert await store.accept_enrollment(second.id, None, None, "admin", 13) == "already accepted"
    third, _, _ = await _request(store, "t", "pc-18", "m3")  # type: ignore[misc]
    assert await store.accept_enrollment(third.id, "pc-17", None, "admin", 14) == "name taken"
    assert await store.accept_enrollment(999, None, None, "admin", 14) == "unknown"
    assert (await store.enrollment(third.id)).state == "pending"  # type: ignore[union-attr]


async def test_pending_requests_are_bounded_per_token_and_address(open_store: OpenStore) -> None:  # noqa: F811
    store = await open_store()
    await store.add_enroll_token("t", "", "admin", 1, FAR, None, "{}", False)
    for i in range(5):
        await _request(store, "t", f"pc-{i}", f"m{i}", now=10 + i, pending_max=3)
    states = {e.name: e.state for e in await store.enrollments()}
    assert states == {"pc-0": "expired", "pc-1": "expired", "pc-2": "pending",
                      "pc-3": "pending", "pc-4": "pending"}
    assert await store.pending_enrollments() == 3


async def test_reject_revoke_and_rekey(open_store: OpenStore) -> None:  # noqa: F811
    one, two = await open_store("a"), await open_store("b")
    await one.add_enroll_token("t", "", "admin", 1, FAR, None, "{}", False)
    a, _, _ = await _request(one, "t", "pc-a", "ma")  # type: ignore[misc]
    b, _, _ = await _request(one, "t", "pc-b", "mb")  # type: ignore[misc]
    rejected = await two.reject_enrollment(b.id, "admin", 20)
    assert rejected.state == "rejected"  # type: ignore[union-attr]
    assert await one.accept_enrollment(b.id, None, None, "admin", 21) == "already rejected"
    assert await one.account("pc-b") is None
    await one.accept_enrollment(a.id, None, None, "admin", 22)
    rev = await two.accounts_rev()
    assert await two.set_next_secret("pc-a", "hmac-sha256$new", 23)
    account = await one.account("pc-a")
    assert account is not None and account.next_hash == "hmac-sha256$new"
    assert account.secret_hash == "hmac-sha256$pc-a"  # the old one works until the new is used
    assert not await one.promote_secret("pc-a", "hmac-sha256$other", 24)
    assert await one.promote_secret("pc-a", "hmac-sha256$new", 24)
    account = await two.account("pc-a")
    assert account is not None and (account.secret_hash, account.next_hash) == (
        "hmac-sha256$new", None)
    assert await one.revoke_agent("pc-a", "admin", 25)
    assert await one.accounts_rev() > rev  # every node re-reads the accounts
    account = await two.account("pc-a")
    assert account is not None and account.secret_hash == "revoked$"
    assert not await two.set_next_secret("pc-a", "hmac-sha256$x", 26)  # revoked stays revoked
    assert (await one.enrollment(a.id)).state == "revoked"  # type: ignore[union-attr]


async def test_profiles_and_adoption(open_store: OpenStore) -> None:  # noqa: F811
    store = await open_store()
    await store.add_account("classic", "agent", "hmac-sha256$c", 1)
    rev = await store.accounts_rev()
    assert await store.set_agent_profile("classic", '["ping"]', '{"os": "Linux"}')
    assert await store.accounts_rev() > rev  # capabilities changed: nodes must see them
    rev = await store.accounts_rev()
    assert not await store.set_agent_profile("classic", '["ping"]', None)  # unchanged
    assert await store.accounts_rev() == rev
    assert await store.set_agent_labels("classic", '{"room": "1"}')
    assert not await store.set_agent_labels("nobody", "{}")
    assert (await store.agent_profiles())["classic"] == ('["ping"]', '{"os": "Linux"}',
                                                         '{"room": "1"}')
    adopted = await store.adopt_agent("classic", "{}", "admin", 5)
    assert adopted.state == "accepted" and adopted.name == "classic"  # type: ignore[union-attr]
    assert await store.adopt_agent("classic", "{}", "admin", 6) == "already enrolled"
    assert await store.adopt_agent("nobody", "{}", "admin", 6) == "unknown"


DEVICE, DEVICE_NAME = "52:54:00:12:34:56", "rdfm-52-54-00-12-34-56"


async def _device(store: object, key_fp: str, now: int, version: str = "v1") -> object:
    added = await store.add_enrollment(  # type: ignore[attr-defined]
        "rdfm", None, DEVICE_NAME, json.dumps({"rdfm.software.version": version}), None,
        "10.0.0.9", None, DEVICE, key_fp, "PEM", now, 100)
    return added[0]


async def test_rdfm_devices_entries_facts_and_key_rotation(open_store: OpenStore) -> None:  # noqa: F811
    """An RDFM device's entries by (id, key); what its authentication refreshes (facts only);
    a new key of an accepted device, accepted, rotates the key: same agent, old entry revoked."""
    one, two = await open_store("a"), await open_store("b")
    first = await _device(one, "k1", 10)
    assert [e.id for e in await two.device_entries(DEVICE, "k1")] == [first.id]  # type: ignore[attr-defined]
    assert await two.device_entries(DEVICE, "k2") == []
    assert await two.device_entries("other", "k1") == []
    accepted = await two.accept_enrollment(first.id, None, '{"room": "7"}', "admin", 11)  # type: ignore[attr-defined]
    assert (accepted.state, accepted.name) == ("accepted", DEVICE_NAME)  # type: ignore[union-attr]
    account = await one.account(DEVICE_NAME)
    assert account is not None and account.secret_hash == f"device${first.id}"  # type: ignore[attr-defined]
    # Authenticating replaces the agent's facts, and nothing else of it.
    await one.set_agent_profile(DEVICE_NAME, '["shell"]', None)
    await one.device_seen(first.id, DEVICE_NAME, '{"rdfm.software.version": "v2"}',  # type: ignore[attr-defined]
                          "10.0.0.10", 12)
    assert (await two.agent_profiles())[DEVICE_NAME] == (
        '["shell"]', '{"rdfm.software.version": "v2"}', '{"room": "7"}')
    entry = await two.enrollment(first.id)  # type: ignore[attr-defined]
    assert entry is not None and (entry.facts, entry.address, entry.updated_ms) == (
        '{"rdfm.software.version": "v2"}', "10.0.0.10", 12)
    # A second key of the same device: pending, flagged as the agent's duplicate.
    second = await _device(one, "k2", 13, "v3")
    assert second.duplicate_of == DEVICE_NAME and second.state == "pending"  # type: ignore[attr-defined]
    assert await one.accept_enrollment(second.id, "other-name", None, "admin", 14) == (  # type: ignore[attr-defined]
        f"a new key of {DEVICE_NAME}: accept it without a name")
    rev = await one.accounts_rev()
    rotated = await two.accept_enrollment(second.id, None, '{"role": "kiosk"}', "admin", 15)  # type: ignore[attr-defined]
    assert (rotated.state, rotated.name) == ("accepted", DEVICE_NAME)  # type: ignore[union-attr]
    assert json.loads(rotated.labels) == {"room": "7", "role": "kiosk"}  # type: ignore[union-attr]
    assert await one.accounts_rev() > rev  # every node re-reads the accounts
    old = await one.enrollment(first.id)  # type: ignore[attr-defined]
    assert old is not None and (old.state, old.decided_by, old.decided_ms) == (
        "revoked", "admin", 15)
    account = await one.account(DEVICE_NAME)
    assert account is not None and account.secret_hash == f"device${second.id}"  # type: ignore[attr-defined]
    assert [a.name for a in await two.accounts()] == [DEVICE_NAME]  # no "-2": the same agent
    assert (await one.agent_profiles())[DEVICE_NAME] == (
        '["shell"]', '{"rdfm.software.version": "v3"}', '{"role": "kiosk", "room": "7"}')
    assert await one.device_entries(DEVICE, "k1") == []  # superseded: decides nothing
    assert [e.id for e in await one.device_entries(DEVICE, "k2")] == [second.id]  # type: ignore[attr-defined]
    # Accepted first, then pending, then rejected.
    third = await _device(one, "k3", 16)
    assert (await two.reject_enrollment(third.id, "admin", 17)).state == "rejected"  # type: ignore[attr-defined, union-attr]
    fourth = await _device(one, "k3", 18)
    assert [(e.id, e.state) for e in await two.device_entries(DEVICE, "k3")] == [
        (fourth.id, "pending"), (third.id, "rejected")]  # type: ignore[attr-defined]
    await one.refresh_enrollment(fourth.id, '{"rdfm.software.version": "v4"}', None, 19)  # type: ignore[attr-defined]
    assert (await two.enrollment(fourth.id)).facts == '{"rdfm.software.version": "v4"}'  # type: ignore[attr-defined, union-attr]
