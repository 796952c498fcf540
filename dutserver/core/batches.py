"""Atomic batches (CCEd-NG's BEGIN/COMMIT): several submits — different tasks to different
agents — stored all or nothing.

Every part is checked before anything is queued (with the earlier parts counted against each
agent's queue bound); then all parts are queued in one turn of the loop, so that their inserts
go into one commit of the store's group commit: it lands whole or not at all.
"""

from __future__ import annotations


from dutserver.core.errors import ApiError
from dutserver.core.model import Task
from dutserver.core.tasks import Tasks

MAX_PARTS = 1000


async def submit(tasks: Tasks, parts: object, actor: str,
                 address: str | None) -> list[list[Task]]:
    """The tasks of each part, once all are stored; or 400/404/409/503 naming the part that
    was refused, with nothing stored."""
    if not isinstance(parts, list) or not parts:
        raise ApiError(400, "submits must be a non-empty list of {targets, task}")
    if len(parts) > MAX_PARTS:
        raise ApiError(400, f"Too many submits in one batch (at most {MAX_PARTS})")
    names = [t for p in parts if isinstance(p, dict) and isinstance(p.get("targets"), list)
             for t in p["targets"] if isinstance(t, str)]
    total = sum(len(p["targets"]) for p in parts if isinstance(p, dict)
                and isinstance(p.get("targets"), list))
    await tasks.auth.knows(names)
    await tasks.reserve(total)
    queued: dict[str, int] = {}
    for number, part in enumerate(parts):
        try:
            if not isinstance(part, dict):
                raise ApiError(400, "each submit must be an object {targets, task}")
            targets = part.get("targets")
            if not isinstance(targets, list) or not targets or not all(
                    isinstance(t, str) for t in targets):
                raise ApiError(400, "targets must be a non-empty list of agent names")
            expires_s = part.get("expires_s")
            if expires_s is not None and (isinstance(expires_s, bool) or not isinstance(
                    expires_s, (int, float)) or not 0 < expires_s <= 366 * 86400):
                raise ApiError(400, "expires_s must be a number of seconds up to one year")
            tasks.check(targets, part.get("task"), queued)
        except ApiError as exc:
            raise ApiError(exc.status, f"submit {number + 1} of {len(parts)} refused, nothing "
                                       f"stored: {exc.msg}") from None
        for name in targets:
            queued[name] = queued.get(name, 0) + 1
    created: list[list[Task]] = []
    inserted = None
    for part in parts:  # one turn: no await between the first create and the last
        made, inserted = tasks.create(part["targets"], part["task"], actor,
                                      part.get("expires_s"), address)
        created.append(made)
    assert inserted is not None  # parts is not empty
    await tasks.stored([t for made in created for t in made], inserted)
    return created
