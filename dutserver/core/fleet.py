"""The agents as admins see them: online status from this process's polls, the rest from the
store (last seen, address, version, inventory), whichever is newer."""

from __future__ import annotations

import functools
import json
from typing import Any

from dutserver.core.auth import Auth
from dutserver.core.dispatcher import Dispatcher
from dutserver.core.errors import unknown_agent
from dutserver.core.model import AgentRecord
from dutserver.core.clock import Clock
from dutserver.core.ports import Store
from dutserver.core.views import iso


@functools.lru_cache(maxsize=1024)  # every poll and result says it again: parse each once
def version_in_user_agent(user_agent: str) -> str | None:
    """The reference agent says its version in its User-Agent: `dutagent/1.2.3`."""
    return user_agent[9:].split(" ", 1)[0][:32] if user_agent.startswith("dutagent/") else None


class Fleet:
    def __init__(self, store: Store, dispatcher: Dispatcher, auth: Auth, clock: Clock,
                 fleet: bool) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.auth = auth
        self.clock = clock
        self.fleet = fleet  # several nodes: who is online elsewhere comes from the store

    async def online(self) -> dict[str, bool]:
        """Every agent's name and whether it is online (the classic /agents): polling here, or
        (several nodes) on another node, as that node last wrote."""
        is_online = self.dispatcher.is_online
        names = sorted(n for n, a in self.auth.accounts.items() if a.kind == "agent")
        if not self.fleet:
            return {n: is_online(n) for n in names}
        now = self.clock.now_ms()
        records = await self.store.agents(False)
        elsewhere = {r.name for r in records
                     if r.online_until_ms is not None and r.online_until_ms > now}
        return {n: is_online(n) or n in elsewhere for n in names}

    async def statuses(self, with_inventory: bool) -> list[dict[str, Any]]:
        if with_inventory:
            await self.store.barrier()  # an inventory that just came in is shown
        views = []
        for record in await self.store.agents(with_inventory):
            view = self._view(record)
            if not with_inventory:
                view.pop("inventory", None)
            views.append(view)
        return views

    async def status(self, name: str) -> dict[str, Any]:
        await self.store.barrier()
        records = await self.store.agents(True, name)
        if not records:
            raise unknown_agent(name)
        return self._view(records[0])

    def _view(self, record: AgentRecord) -> dict[str, Any]:
        last_seen_ms, address, version = record.last_seen_ms, record.address, record.version
        slot = self.dispatcher.slots.get(record.name)
        if slot is not None and slot.last_seen_ms is not None:  # memory is newer than the store
            last_seen_ms, address = slot.last_seen_ms, slot.address
            version = slot.version or version
        online = self.dispatcher.is_online(record.name) or (
            self.fleet and (record.online_until_ms or 0) > self.clock.now_ms())
        return {"name": record.name, "online": online,
                "last_seen": iso(last_seen_ms), "address": address, "agent_version": version,
                "inventory": json.loads(record.inventory) if record.inventory else None,
                "capabilities": json.loads(record.capabilities) if record.capabilities else None,
                "facts": json.loads(record.facts) if record.facts else {},
                "labels": json.loads(record.labels) if record.labels else {},
                "revoked": record.revoked}
