"""Tasks as the APIs show them: one dict shape, from memory (Task) or from the store (TaskRecord)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from dutserver.core.model import Task, TaskRecord


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def task_view(task: Task) -> dict[str, Any]:
    return {"id": task.id, "target": task.agent, "type": task.type, "payload": task.payload,
            "state": task.state.value, "submitted_by": task.submitted_by,
            "created_at": iso(task.created_ms), "delivered_at": iso(task.delivered_ms),
            "finished_at": iso(task.finished_ms), "expires_at": iso(task.expires_ms),
            "result": task.result}


def record_view(row: TaskRecord) -> dict[str, Any]:
    return {"id": row.id, "target": row.agent, "type": row.type,
            "payload": json.loads(row.payload), "state": row.state,
            "submitted_by": row.submitted_by, "created_at": iso(row.created_ms),
            "delivered_at": iso(row.delivered_ms), "finished_at": iso(row.finished_ms),
            "expires_at": iso(row.expires_ms),
            "result": json.loads(row.result) if row.result else None}
