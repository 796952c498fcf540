"""What the core needs from outside, as typing.Protocols: a Store, a Notifier (and the Clock,
a class in core/clock.py: the one port called so often that it must be a compiled call).

The core (tasks, polls, auth, accounts, fleet) only ever calls these; dutserver/store/ implements
Store and Notifier (SQLite now: the notifier in-process; PostgreSQL: LISTEN/NOTIFY), core/clock.py
the real Clock, and the core tests small fakes of all three. Nothing of SQL crosses this line: no
statement text, no connection, no callback that takes one; records are the plain dataclasses of
core/model.py.

Writes on the hot path (a task's state, an audit event, last-seen times) are queued, not awaited:
they return a Future that resolves once their batch is committed (group commit), so a request
that must be durable waits for its batch, and the rest never wait. Reads are coroutines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from dutserver.core.model import (AccountRecord, AgentRecord, AuditRecord, EnrollmentRecord,
                                  EnrollTokenRecord, JobRecord, Outcome, ScheduleRecord,
                                  SessionRecord, Task, TaskFilter, TaskRecord)


class AccountExists(Exception):
    """An account of that name is there already (Store.add_account)."""


class EnrollmentPort(Protocol):
    """The store's part for enrollment (store/enrollment_sql.py and store/device_sql.py,
    written once for both stores): requests to join, tokens, decisions, an agent's own
    declarations. Tested on the real stores (tests/test_store_enrollment.py), not faked.
    """

    async def add_enroll_token(self, digest: str, note: str, created_by: str, now_ms: int,
                               expires_ms: int, max_uses: int | None, labels: str,
                               auto_accept: bool) -> int: ...

    async def enroll_tokens(self) -> list[EnrollTokenRecord]: ...

    async def revoke_enroll_token(self, token_id: int, now_ms: int) -> bool: ...

    async def add_enrollment(self, kind: str, token_digest: str | None, name: str, facts: str,
                             capabilities: str | None, address: str | None,
                             secret_hash: str | None, device_id: str | None, key_fp: str | None,
                             public_key: str | None, now_ms: int,
                             pending_max: int) -> tuple[EnrollmentRecord, bool, str] | None:
        """A request to join; with a token, takes one use of it in the same transaction (None
        when it is not usable). Returns the record, whether it is to be accepted at once (the
        token says so and it is no duplicate), and the token's labels."""
        ...

    async def refresh_enrollment(self, enrollment_id: int, facts: str, address: str | None,
                                 now_ms: int) -> None: ...

    async def enrollment(self, enrollment_id: int) -> EnrollmentRecord | None: ...

    async def enrollments(self, state: str | None = None, kind: str | None = None,
                          device_id: str | None = None, name: str | None = None,
                          limit: int = 1000) -> list[EnrollmentRecord]: ...

    async def pending_enrollments(self) -> int: ...

    async def accept_enrollment(self, enrollment_id: int, name: str | None, labels: str | None,
                                actor: str, now_ms: int) -> EnrollmentRecord | str:
        """pending -> accepted, with the agent account it becomes; or why not ("unknown",
        "already <state>", "name taken")."""
        ...

    async def reject_enrollment(self, enrollment_id: int, actor: str,
                                now_ms: int) -> EnrollmentRecord | str: ...

    async def revoke_agent(self, name: str, actor: str, now_ms: int) -> bool: ...

    async def set_next_secret(self, name: str, next_hash: str, now_ms: int) -> bool: ...

    async def promote_secret(self, name: str, next_hash: str, now_ms: int) -> bool: ...

    async def adopt_agent(self, name: str, facts: str, actor: str,
                          now_ms: int) -> EnrollmentRecord | str: ...

    async def set_agent_profile(self, name: str, capabilities: str | None,
                                facts: str | None) -> bool:
        """Returns whether its capabilities changed (then the accounts' revision moved)."""
        ...

    async def set_agent_labels(self, name: str, labels: str) -> bool: ...

    async def agent_profiles(self) -> dict[str, tuple[str | None, str | None, str | None]]:
        """name -> (capabilities, facts, labels), JSON texts."""
        ...

    # --- RDFM devices (store/device_sql.py): enrollments of kind rdfm, keyed by (id, key) ---

    async def device_entries(self, device_id: str, key_fp: str) -> list[EnrollmentRecord]:
        """The entries of a device's key that decide its authentication: accepted first, then
        pending, then rejected (newest first within each)."""
        ...

    async def device_seen(self, enrollment_id: int, name: str, facts: str, address: str | None,
                          now_ms: int) -> None:
        """An accepted device authenticated: its metadata becomes its agent's facts (its
        capabilities and labels stay), and its entry's last contact is recorded."""
        ...


class JobPort(Protocol):
    """The store's part for fleet jobs (store/job_sql.py, written once for both stores).
    Tested on the real stores (tests/test_store_jobs.py), not faked."""

    async def add_job(self, created_by: str, now_ms: int, task: str, selector: str | None,
                      offline: str, expires_s: int, pause_ms: int | None,
                      max_failures: int | None, nonzero_fails: bool,
                      waves: Sequence[Sequence[str]], schedule_id: int | None,
                      windows: str | None = None) -> int: ...

    async def job(self, job_id: int) -> JobRecord | None: ...

    async def jobs(self, state: str | None, before_id: int | None, limit: int,
                   schedule_id: int | None = None) -> list[JobRecord]: ...

    async def active_jobs(self) -> list[int]: ...

    async def job_progress(self, job_id: int) -> list[tuple[int, str, int, int]]:
        """(wave, state, failed, count): state a task state, `skipped` or `waiting`."""
        ...

    async def job_wave(self, job_id: int, wave: int) -> list[tuple[str, int | None]]: ...

    async def job_missing_tasks(self, job_id: int) -> list[tuple[str, int]]: ...

    async def release_wave(self, job_id: int, wave: int, assigned: Sequence[tuple[str, int]],
                           skipped: Sequence[str], node: str, now_ms: int) -> bool:
        """Claims the wave (compare and set: one node wins) and records its task ids."""
        ...

    async def claim_refill(self, job_id: int, released_ms: int, now_ms: int) -> bool: ...

    async def set_job_state(self, job_id: int, before: Sequence[str], state: str,
                            reason: str | None, now_ms: int,
                            next_ms: int | None = None) -> bool: ...

    async def schedule_wave(self, job_id: int, next_ms: int, now_ms: int) -> bool: ...

    async def set_job_budget(self, job_id: int, max_failures: int | None,
                             now_ms: int) -> bool: ...

    async def job_targets(self, job_id: int, after: str | None,
                          limit: int) -> list[tuple[Any, ...]]:
        """(agent, wave, task_id, skipped, task state, result JSON), by agent name."""
        ...

    async def job_queued_tasks(self, job_id: int) -> list[int]: ...

    async def job_results(self, job_id: int) -> list[tuple[str, str, str | None]]: ...


class SchedulePort(Protocol):
    """The store's part for schedules (store/schedule_sql.py, written once for both stores).
    Tested on the real stores (tests/test_store_schedules.py), not faked."""

    async def add_schedule(self, name: str, created_by: str, now_ms: int, job: str,
                           cron: str | None, at_ms: int | None, every_ms: int | None, tz: str,
                           windows: str | None, next_ms: int | None, enabled: bool) -> int: ...

    async def schedule(self, schedule_id: int) -> ScheduleRecord | None:
        """A schedule that is not deleted."""
        ...

    async def schedules(self, before_id: int | None, limit: int) -> list[ScheduleRecord]: ...

    async def due_schedules(self, now_ms: int) -> list[ScheduleRecord]:
        """Enabled schedules whose next slot is at or before now_ms."""
        ...

    async def claim_schedule_run(self, schedule_id: int, seen_next_ms: int,
                                 following_ms: int | None, now_ms: int) -> bool:
        """Moves next_ms from the slot seen to the following one (compare and set): True for
        the one node that does, which runs the slot."""
        ...

    async def schedule_ran(self, schedule_id: int, job_id: int, now_ms: int) -> None: ...

    async def schedule_skipped(self, schedule_id: int, why: str, now_ms: int) -> None: ...

    async def set_schedule_enabled(self, schedule_id: int, enabled: bool, next_ms: int | None,
                                   now_ms: int) -> bool:
        """Compare and set: False when it already was so, or is deleted."""
        ...

    async def delete_schedule(self, schedule_id: int, now_ms: int) -> bool: ...


class Store(EnrollmentPort, JobPort, SchedulePort, Protocol):
    """The database: durable facts shared by every process of a fleet."""

    node: str  #: the name of this process in its fleet, written as a task's `delivered_by`

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def periodic(self) -> list[tuple[float, Callable[[], Awaitable[None]]]]:
        """Housekeeping of the store's own, as (interval_s, step): app.py runs each."""
        ...

    async def barrier(self) -> None:
        """Waits until every write queued before it is committed (read-your-writes)."""
        ...

    async def ping(self) -> bool:
        """Whether the database answers now (readiness)."""
        ...

    # --- tasks: ids, the hot path's writes, recovery, finding one ----------------------------

    async def reserve_task_ids(self, count: int) -> range:
        """count task ids no process was given before, nor ever will be."""
        ...

    def save_task(self, task: Task, expected: str | None = None) -> asyncio.Future[Any]:
        """Queues the task as it is now (insert first, then its changes); the future resolves
        at the commit. With `expected` (the state this process last knew), a store that
        several processes share writes it only if the stored task is still in that state
        (compare and set), and the future resolves False when it was not; a store of one
        process may ignore it (its memory is the truth)."""
        ...

    async def queued_tasks(self, agent: str) -> list[TaskRecord]:
        """The agent's queued tasks, oldest first (another process may have queued them)."""
        ...

    async def node_alive(self) -> tuple[list[str], list[int]]:
        """Heartbeat of this node; recovers the nodes whose heartbeat stopped (their
        deliveries fail, their queued tasks stay queued for the others). Returns the agents
        with queued tasks that nobody may hold any more, and the tasks that recovery ended.
        A store of one process has nothing to do here."""
        ...

    async def expire_queued(self, now_ms: int) -> list[int]:
        """Ends queued tasks past their deadline that no process may be holding; their ids."""
        ...

    async def finish_task(self, task_id: int, expected_state: str, state: str,
                          result_json: str, finished_ms: int) -> bool:
        """Ends a task that is not in this process's memory, if it is still in expected_state
        (compare and set: of two processes ending one task, one wins)."""
        ...

    async def recover(self, now_ms: int) -> list[TaskRecord]:
        """Start-up of this node: the tasks it delivered without a result fail, queued tasks
        past their deadline expire; returns the queued tasks this node should hold, oldest
        first (a store shared by several nodes returns none: each agent's first poll at a
        node fetches its own, `queued_tasks`)."""
        ...

    async def task(self, task_id: int) -> TaskRecord | None: ...

    async def tasks(self, where: TaskFilter) -> list[TaskRecord]:
        """History, newest first; what was saved before the call is found."""
        ...

    # --- accounts, sessions, bans, settings --------------------------------------------------

    async def accounts_rev(self) -> int:
        """A number that changes whenever an account does (by any process)."""
        ...

    async def accounts(self) -> list[AccountRecord]: ...

    async def account(self, name: str) -> AccountRecord | None: ...

    async def add_account(self, name: str, kind: str, secret_hash: str, now_ms: int) -> None:
        """Raises AccountExists."""
        ...

    async def set_secret(self, name: str, secret_hash: str, now_ms: int) -> bool:
        """False when there is no such account; the account's sessions end."""
        ...

    async def remove_account(self, name: str) -> bool:
        """False when there is no such account; its sessions end."""
        ...

    async def add_session(self, digest: str, account: str, now_ms: int) -> None: ...

    def delete_session(self, digest: str) -> None: ...

    def touch_sessions(self, rows: Sequence[tuple[int, str]]) -> None:
        """(last_used_ms, digest) of sessions used since the last call."""
        ...

    async def session(self, digest: str) -> SessionRecord | None: ...

    def prune_sessions(self, last_used_before_ms: int, created_before_ms: int) -> None:
        """Deletes the sessions idle since, or opened before, these times."""
        ...

    def add_ban(self, key: str, until_ms: int) -> None: ...

    async def bans(self, now_ms: int) -> dict[str, int]:
        """The bans in force: key -> until_ms."""
        ...

    async def setting(self, key: str) -> str | None: ...

    async def set_setting(self, key: str, value: str) -> None: ...

    # --- agents' status, audit ---------------------------------------------------------------

    def agents_seen(self, rows: Sequence[tuple[str, int, str | None, str | None, int]]) -> None:
        """(name, last_seen_ms, address, version, online_until_ms) of agents seen since the
        last call: every node's view of who is online, written within a sweep."""
        ...

    def agent_inventory(self, name: str, inventory_json: str) -> None: ...

    async def agents(self, with_inventory: bool, name: str | None = None) -> list[AgentRecord]:
        """Every agent account with its status (one, with name)."""
        ...

    def audit(self, actor: str | None, action: str, detail: str, address: str | None) -> None:
        """Records an audit event in the next batch; nobody waits for it."""
        ...

    async def audit_events(self, before_id: int | None, limit: int) -> list[AuditRecord]: ...


class Notifier(Protocol):
    """Wake-ups between the processes of a fleet: in-process for SQLite (one process),
    PostgreSQL's LISTEN/NOTIFY when several share a database. Each process subscribes once;
    a process never gets its own wake-ups back."""

    fleet: bool  #: whether other processes listen; when not, the core sends nothing

    def agent_has_work(self, agent: str, task_id: int | None = None) -> None:
        """A task for agent was queued here (sent with the commit of its insert). With its id
        when it is the agent's only one, the notifier may send the task as it commits it, so
        that the node where the agent polls need not read it (on_work gets a TaskRecord then,
        else None: read the agent's queue)."""
        ...

    def task_finished(self, task_id: int) -> None:
        """This process ended a task that another one may hold (a submitter waits there),
        sent with the commit that records it. When that commit writes the task's row, the
        notifier may send the outcome it writes (on_finished gets an Outcome then, else None:
        read it), and for a compare-and-set only if it wins: what is told is what is stored."""
        ...

    def subscribe(self, on_work: Callable[[str, TaskRecord | None], None],
                  on_finished: Callable[[int, Outcome | None], None],
                  on_gap: Callable[[], None]) -> None:
        """on_gap: wake-ups may have been missed (the listening connection was lost)."""
        ...


class Timer(Protocol):
    def cancel(self) -> None: ...
