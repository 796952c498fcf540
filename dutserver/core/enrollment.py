"""Enrollment: machines ask to join, admins decide, identities are revoked and re-keyed.

Every way in lands in the store's one list of requests (our agent here; RDFM devices and OCO
agents through their routes). An accepted request becomes an agent account whose secret is the
keyed digest of the machine's own credential, so an enrolled agent is checked on every poll
exactly like a classic one (core/auth.py): enrollment costs nothing on the hot path.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from typing import Any

from dutserver.config import Settings
from dutserver.core.auth import Auth
from dutserver.core.clock import Clock
from dutserver.core.credentials import NAME_RE, agent_digest, check_name
from dutserver.core.errors import ApiError
from dutserver.core.model import EnrollmentRecord, EnrollTokenRecord
from dutserver.core.ports import Store
from dutserver.core.tasks import Tasks
from dutserver.core.views import iso

STATES = ("pending", "accepted", "rejected", "revoked", "expired")
KINDS = ("agent", "rdfm", "oco")
TOKEN_PREFIX = "dutenr_"
_CREDENTIAL = re.compile(r"[A-Za-z0-9_-]{43,256}")
_FACT_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9_./-]{1,64}")
_TEXT_MAX = 1024
FACTS_MAX_BYTES = 16384
_UNSAFE = re.compile("[\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069]")  # controls, bidi overrides


def token_digest(key: bytes, token: str) -> str:
    """Tokens are kept as keyed digests, like agent secrets: the store alone cannot test one."""
    return agent_digest(key, "enroll-token:" + token)


def _safe_text(value: object, what: str, limit: int = _TEXT_MAX) -> str:
    if not isinstance(value, str) or len(value) > limit or _UNSAFE.search(value):
        raise ApiError(400, f"{what} must be text of at most {limit} characters, without "
                            "control or direction-override characters")
    return value


def check_facts(facts: object) -> str:
    """A machine's facts as stored (JSON text): an object of short keys whose values are
    text, numbers, booleans or lists of text; at most 16 KiB."""
    if facts is None:
        facts = {}
    if not isinstance(facts, dict):
        raise ApiError(400, "facts must be a JSON object")
    for key, value in facts.items():
        if not _FACT_KEY.fullmatch(key):
            raise ApiError(400, f"Invalid fact name: {key[:64]!r}")
        if isinstance(value, list):
            if len(value) > 64:
                raise ApiError(400, f"Fact {key}: at most 64 values")
            for item in value:
                _safe_text(item, f"Fact {key}")
        elif isinstance(value, str):
            _safe_text(value, f"Fact {key}")
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise ApiError(400, f"Fact {key}: use text, a number, a boolean or a list of text")
    text = json.dumps(facts, sort_keys=True, ensure_ascii=False)
    if len(text.encode()) > FACTS_MAX_BYTES:
        raise ApiError(400, f"facts too large (at most {FACTS_MAX_BYTES} bytes)")
    return text


def check_capabilities(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > 100 or not all(
            isinstance(v, str) and 0 < len(v) <= 64 and v.isprintable() for v in value):
        raise ApiError(400, "capabilities must be a list of at most 100 task type names")
    return json.dumps(sorted(set(value)))


def check_labels(value: object) -> str:
    if not isinstance(value, dict) or len(value) > 50:
        raise ApiError(400, "labels must be a JSON object of at most 50 name: value pairs")
    for key, text in value.items():
        if not _LABEL_KEY.fullmatch(key):
            raise ApiError(400, f"Invalid label name: {key[:64]!r} (use A-Z a-z 0-9 . _ / -)")
        _safe_text(text, f"Label {key}", 128)
    return json.dumps(value, sort_keys=True)


def check_credential(value: object) -> str:
    if not isinstance(value, str) or not _CREDENTIAL.fullmatch(value):
        raise ApiError(400, "credential must be 43 to 256 characters of A-Z a-z 0-9 _ - "
                            "(256 random bits or more)")
    return value


def name_from(hostname: object) -> str:
    """An agent name from a host name: the characters names allow, the rest as '-'."""
    text = hostname if isinstance(hostname, str) else ""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", text.split(".")[0] if "." in text else text)[:64]
    name = name.strip("-.") or "agent"
    return name if NAME_RE.fullmatch(name) else "agent"


def token_view(t: EnrollTokenRecord, now_ms: int) -> dict[str, Any]:
    state = ("revoked" if t.revoked_ms is not None else "expired" if t.expires_ms <= now_ms
             else "used up" if t.max_uses is not None and t.uses >= t.max_uses else "active")
    return {"id": t.id, "note": t.note, "created_by": t.created_by,
            "created_at": iso(t.created_ms), "expires_at": iso(t.expires_ms),
            "max_uses": t.max_uses, "uses": t.uses, "labels": json.loads(t.labels),
            "auto_accept": t.auto_accept, "revoked_at": iso(t.revoked_ms), "state": state}


def enrollment_view(e: EnrollmentRecord) -> dict[str, Any]:
    return {"id": e.id, "kind": e.kind, "state": e.state, "name": e.name,
            "facts": json.loads(e.facts),
            "capabilities": json.loads(e.capabilities) if e.capabilities else None,
            "token_id": e.token_id, "address": e.address, "device_id": e.device_id,
            "key_fingerprint": e.key_fp, "duplicate_of": e.duplicate_of,
            "labels": json.loads(e.labels), "created_at": iso(e.created_ms),
            "updated_at": iso(e.updated_ms), "decided_at": iso(e.decided_ms),
            "decided_by": e.decided_by}


async def create_token(store: Store, key: bytes, body: dict[str, Any], actor: str,
                       address: str | None, now: int, max_s: float) -> dict[str, Any]:
    """Validates body ({"expires_s", "max_uses", "labels", "auto_accept", "note"}), stores
    the new token's digest, audits it; returns its view with the token (shown this once).
    The API and `dutserver enroll-token` both come here."""
    expires_s = body.get("expires_s", 86400)
    if isinstance(expires_s, bool) or not isinstance(expires_s, (int, float)) or \
            not 0 < expires_s <= max_s:
        raise ApiError(400, f"expires_s must be a number of seconds between 0 and {max_s:g}")
    max_uses = body.get("max_uses", 1)
    if max_uses is not None and (isinstance(max_uses, bool) or not isinstance(max_uses, int)
                                 or not 0 < max_uses <= 1_000_000):
        raise ApiError(400, "max_uses must be a whole number from 1 to 1000000, or null "
                            "for unlimited until it expires")
    auto_accept = body.get("auto_accept", False)
    if not isinstance(auto_accept, bool):
        raise ApiError(400, "auto_accept must be true or false")
    note = _safe_text(body.get("note", ""), "note", 200)
    labels = check_labels(body.get("labels", {}))
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_ms = now + int(expires_s * 1000)
    token_id = await store.add_enroll_token(token_digest(key, token), note, actor, now,
                                            expires_ms, max_uses, labels, auto_accept)
    uses = "unlimited" if max_uses is None else str(max_uses)
    store.audit(actor, "enroll_token_create",
                f"token {token_id} ({note or 'no note'}): {uses} uses, "
                f"auto_accept {'on' if auto_accept else 'off'}, labels {labels}", address)
    view = token_view(EnrollTokenRecord(token_id, "", note, actor, now, expires_ms, max_uses, 0,
                                        labels, auto_accept, None), now)
    return {**view, "token": token}


def parse_duration(text: str) -> float:
    """Seconds from "3600", "90s", "30m", "12h", "7d" (command lines)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 3600, 30m, 12h or 7d)")
    return float(match.group(1)) * units[match.group(2) or "s"]


class Enrollment:
    def __init__(self, settings: Settings, store: Store, clock: Clock, auth: Auth,
                 tasks: Tasks) -> None:
        self.s = settings
        self.store = store
        self.clock = clock
        self.auth = auth
        self.tasks = tasks

    # --- tokens (admins) ---------------------------------------------------------------------

    async def create_token(self, body: dict[str, Any], actor: str,
                           address: str | None) -> dict[str, Any]:
        """A new token, shown once in the answer; the store keeps its digest."""
        return await create_token(self.store, self.auth.key, body, actor, address,
                                  self.clock.now_ms(), self.s.enroll_token_max_s)

    async def tokens(self) -> list[dict[str, Any]]:
        now = self.clock.now_ms()
        return [token_view(t, now) for t in await self.store.enroll_tokens()]

    async def revoke_token(self, token_id: int, actor: str, address: str | None) -> None:
        if not await self.store.revoke_enroll_token(token_id, self.clock.now_ms()):
            raise ApiError(404, f"No active enrollment token {token_id}")
        self.store.audit(actor, "enroll_token_revoke", f"token {token_id}", address)

    # --- a machine asks (our agent) ----------------------------------------------------------

    async def request(self, body: dict[str, Any], address: str) -> dict[str, Any]:
        """An agent asks to join with a token and its own credential."""
        self.auth.throttle.check("(enrollment)", address)
        token = body.get("token")
        credential = check_credential(body.get("credential"))
        facts = check_facts(body.get("facts"))
        capabilities = check_capabilities(body.get("capabilities"))
        parsed = json.loads(facts)
        name = name_from(parsed.get("hostname"))
        machine_id = parsed.get("machine_id") if isinstance(parsed.get("machine_id"), str) else None
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return self._bad_token(address)
        added = await self.store.add_enrollment(
            "agent", token_digest(self.auth.key, token), name, facts, capabilities, address,
            agent_digest(self.auth.key, credential), machine_id or None, None, None,
            self.clock.now_ms(), self.s.enroll_pending_max)
        if added is None:
            return self._bad_token(address)
        record, auto, _ = added
        self.store.audit(None, "enroll_request",
                         f"{record.kind} {record.id} as {record.name} with token "
                         f"{record.token_id}" + (f", duplicate of {record.duplicate_of}"
                                                 if record.duplicate_of else ""), address)
        if auto:
            decided = await self.accept(record.id, {}, f"token:{record.token_id}", address)
            return {"id": record.id, "state": decided["state"], "name": decided["name"]}
        return {"id": record.id, "state": record.state, "name": None}

    def _bad_token(self, address: str) -> dict[str, Any]:
        self.auth.enrollment_failure(address, "invalid enrollment token")
        raise ApiError(403, "Invalid enrollment token")

    async def status(self, enrollment_id: int, header: str | None,
                     address: str) -> dict[str, Any]:
        """What became of a request, for the machine that made it (its credential proves it)."""
        self.auth.throttle.check("(enrollment)", address)
        credential = header[7:].strip() if header and header[:7].lower() == "bearer " else ""
        record = await self.store.enrollment(enrollment_id)
        expected = record.secret_hash if record is not None else None
        given = agent_digest(self.auth.key, credential)
        if expected is None or not credential or not hmac.compare_digest(given, expected):
            self.auth.enrollment_failure(address, f"wrong credential for enrollment "
                                                  f"{enrollment_id}")
            raise ApiError(403, "Authorization failure")
        assert record is not None
        return {"id": record.id, "state": record.state,
                "name": record.name if record.state == "accepted" else None}

    # --- admins decide -----------------------------------------------------------------------

    async def listing(self, state: str | None, kind: str | None) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise ApiError(400, f"Invalid state: use one of {', '.join(STATES)}")
        if kind is not None and kind not in KINDS:
            raise ApiError(400, f"Invalid kind: use one of {', '.join(KINDS)}")
        await self.store.barrier()
        rows = await self.store.enrollments(state, kind)
        pending = await self.store.pending_enrollments()
        return {"enrollments": [enrollment_view(r) for r in rows], "pending": pending}

    async def accept(self, enrollment_id: int, body: dict[str, Any], actor: str,
                     address: str | None) -> dict[str, Any]:
        name = body.get("name")
        if name is not None:
            check_name(name)
        labels = check_labels(body["labels"]) if body.get("labels") is not None else None
        result = await self.store.accept_enrollment(enrollment_id, name, labels, actor,
                                                    self.clock.now_ms())
        if isinstance(result, str):
            raise self._refusal(enrollment_id, result, name)
        await self.auth.refresh()  # the agent may poll this node the next moment
        self.store.audit(actor, "enroll_accept",
                         f"{result.kind} {result.id} as {result.name}", address)
        return enrollment_view(result)

    async def reject(self, enrollment_id: int, actor: str, address: str | None) -> dict[str, Any]:
        result = await self.store.reject_enrollment(enrollment_id, actor, self.clock.now_ms())
        if isinstance(result, str):
            raise self._refusal(enrollment_id, result, None)
        self.store.audit(actor, "enroll_reject", f"{result.kind} {result.id} ({result.name})",
                         address)
        return enrollment_view(result)

    @staticmethod
    def _refusal(enrollment_id: int, why: str, name: object) -> ApiError:
        if why == "unknown":
            return ApiError(404, f"Unknown enrollment: {enrollment_id}")
        if why == "name taken":
            return ApiError(409, f"Name taken: {name}")
        return ApiError(409, f"Enrollment {enrollment_id} is {why}")

    # --- accepted identities -----------------------------------------------------------------

    def _agent(self, name: str) -> None:
        acc = self.auth.accounts.get(name)
        if acc is None or acc.kind != "agent":
            raise ApiError(404, f"Unknown agent: {name}")

    async def revoke(self, name: str, actor: str, address: str | None) -> None:
        """The agent's credential stops working now; its parked polls are answered."""
        self._agent(name)
        if not await self.store.revoke_agent(name, actor, self.clock.now_ms()):
            raise ApiError(404, f"Unknown agent: {name}")
        await self.auth.refresh()
        self.auth.changed_agents.add(name)
        self.tasks.end_polls_of_changed()
        self.store.audit(actor, "agent_revoke", name, address)

    async def rekey(self, name: str, actor: str, address: str | None) -> dict[str, Any]:
        """Tells the agent, with its next poll, to make a new credential (a `rekey` task)."""
        self._agent(name)
        created = await self.tasks.submit([name], {"type": "rekey"}, actor, None, address)
        self.store.audit(actor, "agent_rekey", f"{name} (task {created[0].id})", address)
        return {"task": created[0].id}

    async def adopt(self, name: str, actor: str, address: str | None) -> dict[str, Any]:
        """An existing (classic) agent account becomes an enrolled identity."""
        self._agent(name)
        result = await self.store.adopt_agent(name, "{}", actor, self.clock.now_ms())
        if isinstance(result, str):
            raise ApiError(404 if result == "unknown" else 409, f"{name}: {result}")
        self.store.audit(actor, "agent_adopt", name, address)
        return enrollment_view(result)

    async def set_labels(self, name: str, labels: object, actor: str,
                         address: str | None) -> None:
        text = check_labels(labels)
        if not await self.store.set_agent_labels(name, text):
            raise ApiError(404, f"Unknown agent: {name}")
        self.store.audit(actor, "agent_labels", f"{name}: {text}", address)

    # --- what an agent says of itself --------------------------------------------------------

    async def hello(self, agent: str, body: dict[str, Any]) -> None:
        capabilities = check_capabilities(body.get("capabilities"))
        facts = check_facts(body["facts"]) if body.get("facts") is not None else None
        if await self.store.set_agent_profile(agent, capabilities, facts):
            await self.auth.refresh()  # submits here are checked against them at once

    async def new_credential(self, agent: str, body: dict[str, Any], address: str) -> None:
        """A re-keyed agent's new credential: the old one works until the new one is used."""
        credential = check_credential(body.get("credential"))
        digest = agent_digest(self.auth.key, credential)
        if not await self.store.set_next_secret(agent, digest, self.clock.now_ms()):
            raise ApiError(404, f"Unknown agent: {agent}")
        await self.auth.refresh()
        self.store.audit(agent, "agent_new_credential", "sent by the agent", address)
