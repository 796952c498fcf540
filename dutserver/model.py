"""The task as it lives in memory while it is queued or running, and its states."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from json.encoder import encode_basestring_ascii
from typing import Any

from dutserver.codec import compact


class TaskState(str, Enum):
    QUEUED = "queued"        #: stored, waiting for its agent's poll
    DELIVERED = "delivered"  #: handed to the agent (durably recorded first); result pending
    DONE = "done"            #: the agent posted a result without "error": true
    FAILED = "failed"        #: the agent reported an error, or no result came before the deadline
    CANCELLED = "cancelled"  #: withdrawn before delivery (by an admin, or its submitter left)
    EXPIRED = "expired"      #: its deadline passed while it was still queued


FINAL_STATES = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED,
                          TaskState.EXPIRED})


@dataclass(slots=True, eq=False)
class Task:
    id: int
    agent: str
    type: str
    payload: dict[str, Any]
    submitted_by: str
    created_ms: int
    expires_ms: int
    state: TaskState = TaskState.QUEUED
    delivered_ms: int | None = None
    finished_ms: int | None = None
    result: dict[str, Any] | None = None
    payload_json: str = field(default="", repr=False)  # as stored, encoded once
    # The blocking submit waiting for this task's result, if any (tasks._Waiting).
    waiter: Any = field(default=None, repr=False)
    stored: bool = field(default=False, repr=False)  # its insert has been queued (store.py)

    def wire(self) -> dict[str, Any]:
        """The task object as the agent receives it."""
        return {**self.payload, "id": self.id, "type": self.type}

    def wire_json(self) -> bytes:
        """wire() as JSON, from the payload's JSON as stored (encoded once, at the submit)."""
        if not self.payload_json:
            return compact(self.wire()).encode()
        head = self.payload_json[:-1]
        comma = "," if len(head) > 1 else ""
        return f'{head}{comma}"id":{self.id},"type":{encode_basestring_ascii(self.type)}}}' \
            .encode()
