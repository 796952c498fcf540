"""The task as it lives in memory while it is queued or running, its states, and the records
the store gives back (core/ports.py): plain data, no SQL."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class TaskState(str, Enum):
    QUEUED = "queued"        #: stored, waiting for its agent's poll
    DELIVERED = "delivered"  #: handed to the agent (durably recorded first); result pending
    DONE = "done"            #: the agent posted a result without "error": true
    FAILED = "failed"        #: the agent reported an error, or no result came before the deadline
    CANCELLED = "cancelled"  #: withdrawn before delivery (by an admin, or its submitter left)
    EXPIRED = "expired"      #: its deadline passed while it was still queued


FINAL_STATES = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED,
                          TaskState.EXPIRED})


class Task:
    """One task in memory. A plain class with its own __init__, not a dataclass: compiled, a
    dataclass's generated __init__ stays interpreted, and one Task is made per round trip."""

    __slots__ = ("id", "agent", "type", "payload", "submitted_by", "created_ms", "expires_ms",
                 "state", "delivered_ms", "finished_ms", "result", "delivered_by",
                 "payload_json", "waiter", "stored")

    def __init__(self, id: int, agent: str, type: str, payload: dict[str, Any],
                 submitted_by: str, created_ms: int, expires_ms: int,
                 state: TaskState = TaskState.QUEUED, delivered_ms: int | None = None,
                 finished_ms: int | None = None, result: dict[str, Any] | None = None,
                 delivered_by: str | None = None, payload_json: str = "",
                 waiter: Any = None, stored: bool = False) -> None:
        self.id = id
        self.agent = agent
        self.type = type
        self.payload = payload
        self.submitted_by = submitted_by
        self.created_ms = created_ms
        self.expires_ms = expires_ms
        self.state = state
        self.delivered_ms = delivered_ms
        self.finished_ms = finished_ms
        self.result = result
        self.delivered_by = delivered_by  # the node that handed it over (its recovery ends it)
        self.payload_json = payload_json  # as stored, encoded once
        # The blocking submit waiting for this task's result, if any (core/waiting.py).
        self.waiter = waiter
        self.stored = stored  # its insert has been queued (the store's writer)

    def __repr__(self) -> str:
        return (f"Task(id={self.id!r}, agent={self.agent!r}, type={self.type!r}, "
                f"state={self.state.value!r}, delivered_by={self.delivered_by!r})")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a task ended, as the node that ended it tells the others with the wake-up, so that
    a node where its submitter waits need not read it back from the store."""

    state: str
    finished_ms: int | None
    result: str | None  # its JSON text


@dataclass(slots=True)
class TaskRecord:
    """A task as stored: payload and result as their JSON text."""

    id: int
    agent: str
    type: str
    payload: str
    state: str
    submitted_by: str
    created_ms: int
    expires_ms: int
    delivered_ms: int | None
    finished_ms: int | None
    result: str | None
    delivered_by: str | None = None


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """What the history asks for: every field optional, newest first, at most `limit`."""

    agent: str | None = None
    state: str | None = None
    submitted_by: str | None = None
    before_id: int | None = None
    ids: tuple[int, ...] | None = None
    limit: int = 100


@dataclass(slots=True)
class AccountRecord:
    name: str
    kind: str  # admin or agent
    secret_hash: str
    created_ms: int
    updated_ms: int
    next_hash: str | None = None  # a re-keyed agent's new credential, until it is first used
    capabilities: str | None = None  # JSON list of the task types the agent runs, if it said


@dataclass(slots=True)
class SessionRecord:
    digest: str
    account: str
    created_ms: int
    last_used_ms: int


@dataclass(slots=True)
class AgentRecord:
    """An agent account and what was last stored of its status."""

    name: str
    last_seen_ms: int | None
    address: str | None
    version: str | None
    inventory: str | None  # JSON, when asked for
    online_until_ms: int | None = None  # online on some node until then (as last written)
    capabilities: str | None = None  # JSON list of task types, as the agent declared them
    facts: str | None = None  # JSON object: what the agent says of itself (or a device's metadata)
    labels: str | None = None  # JSON object, set by admins (or given by an enrollment token)
    revoked: bool = False


@dataclass(slots=True)
class AuditRecord:
    id: int
    at_ms: int
    actor: str | None
    action: str
    detail: str | None
    address: str | None


@dataclass(slots=True)
class EnrollTokenRecord:
    """A token machines enroll with (stored as its digest; the token is shown once)."""

    id: int
    digest: str
    note: str
    created_by: str
    created_ms: int
    expires_ms: int
    max_uses: int | None  # None: unlimited until it expires
    uses: int
    labels: str  # JSON object, given to the machines that join with it
    auto_accept: bool
    revoked_ms: int | None


@dataclass(slots=True)
class EnrollmentRecord:
    """A machine's request to join (our agent, an RDFM device, an OCO agent), and its fate."""

    id: int
    kind: str  # agent | rdfm | oco
    state: str  # pending | accepted | rejected | revoked | expired
    name: str  # the name asked for; once accepted, the agent's name
    facts: str  # JSON object: hostname, machine id, OS, MACs, version (or a device's metadata)
    capabilities: str | None  # JSON list of task types, as the machine declared them
    token_id: int | None
    address: str | None
    secret_hash: str | None  # keyed digest of the agent's own credential
    device_id: str | None  # machine id, or an RDFM device's id
    key_fp: str | None  # an RDFM device's key: SHA-256 of its SPKI
    public_key: str | None
    duplicate_of: str | None  # an agent whose name or machine id this one also claims
    labels: str  # JSON object
    created_ms: int
    updated_ms: int
    decided_ms: int | None
    decided_by: str | None


@dataclass(slots=True)
class JobRecord:
    """A fleet job as stored: one task body for many targets, released in waves."""

    id: int
    created_by: str
    created_ms: int
    updated_ms: int
    state: str  # running | paused | done | aborted
    task: str  # the task body, JSON
    selector: str | None  # how its targets were chosen, if by a selector
    offline: str  # queue | skip: what becomes of targets offline when their wave goes out
    expires_s: int  # each task's lifetime in its queue
    waves: int
    pause_ms: int | None  # between waves: None none, -1 until an admin resumes, else ms
    max_failures: int | None  # the failure budget (None: no budget)
    nonzero_fails: bool  # a command's non-zero exit status counts as a failure
    released: int  # waves released so far
    released_ms: int | None
    next_ms: int | None  # the next wave goes out then (a pause between waves)
    reason: str | None  # why it is paused, or how it ended
    schedule_id: int | None
    finished_ms: int | None
    targets: int
    windows: str | None = None  # maintenance windows: {"tz", "windows"} JSON (core/windows.py)


@dataclass(slots=True)
class ScheduleRecord:
    """A schedule as stored: a job body run at cron slots, once, or every so often."""

    id: int
    name: str
    created_by: str
    created_ms: int
    updated_ms: int
    job: str  # the job's body, JSON: task, targets or selector, wave settings
    cron: str | None  # a cron expression (core/slots.py), or
    at_ms: int | None  # once, at this time, or
    every_ms: int | None  # every so often, from created_ms on
    tz: str  # the IANA zone of its cron and windows
    windows: str | None  # {"tz", "windows"} JSON, given to every job it makes
    next_ms: int | None  # its next run (None: none, a once schedule that ran)
    last_run_ms: int | None
    last_job_id: int | None
    runs: int  # jobs it made
    skipped: int  # slots that made none (its last job still running, or refused)
    last_skip_ms: int | None
    last_error: str | None  # why the last slot made no job
    enabled: bool
