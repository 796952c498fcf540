"""Accounts as admins manage them, and the self-registration switch: the rules, over the store.

Creating one is Auth's (self-registration and the admin API share it); this is the rest.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dutserver.core.auth import Auth
from dutserver.core.credentials import check_secret, hash_secret
from dutserver.core.errors import ApiError
from dutserver.core.clock import Clock
from dutserver.core.ports import Store
from dutserver.core.tasks import Tasks
from dutserver.core.views import iso

SELFREG = "selfreg"


class Accounts:
    def __init__(self, store: Store, clock: Clock, auth: Auth, tasks: Tasks) -> None:
        self.store = store
        self.clock = clock
        self.auth = auth
        self.tasks = tasks

    async def listing(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "type": r.kind, "created_at": iso(r.created_ms),
                 "updated_at": iso(r.updated_ms)} for r in await self.store.accounts()]

    async def set_password(self, name: str, password: object, actor: str,
                           address: str | None) -> None:
        """A new password (agent secret); the account's sessions end."""
        acc = self.auth.accounts.get(name)
        if acc is None:
            raise ApiError(404, f"Unknown account: {name}")
        secret = check_secret(acc.kind, password)
        digest = await asyncio.to_thread(hash_secret, acc.kind, secret, self.auth.key)
        if not await self.store.set_secret(name, digest, self.clock.now_ms()):
            raise ApiError(404, f"Unknown account: {name}")
        await self.auth.refresh()  # revokes its sessions: its secret changed
        self.store.audit(actor, "account_password", f"{acc.kind} {name}", address)

    async def remove(self, name: str, actor: str, address: str | None) -> None:
        """Removes an account; its sessions end and its queued tasks are cancelled."""
        if name == actor:
            raise ApiError(409, "You cannot remove your own account")
        acc = self.auth.accounts.get(name)
        if acc is not None and acc.kind == "admin" and \
                sum(a.kind == "admin" for a in self.auth.accounts.values()) <= 1:
            raise ApiError(409, "Cannot remove the last admin account")
        if not await self.store.remove_account(name):
            raise ApiError(404, f"Unknown account: {name}")
        await self.auth.refresh()  # revokes its sessions: it is gone
        self.tasks.cancel_for_removed_agents()
        self.store.audit(actor, "account_remove", name, address)

    async def selfreg_enabled(self) -> bool:
        return await self.store.setting(SELFREG) == "1"

    async def set_selfreg(self, enabled: bool, actor: str, address: str | None) -> None:
        await self.store.set_setting(SELFREG, "1" if enabled else "0")
        self.store.audit(actor, "selfreg", "on" if enabled else "off", address)

    async def audit_events(self, before_id: int | None, limit: int) -> list[dict[str, Any]]:
        await self.store.barrier()  # what was just done is listed
        return [{"id": r.id, "at": iso(r.at_ms), "actor": r.actor, "action": r.action,
                 "detail": r.detail, "address": r.address}
                for r in await self.store.audit_events(before_id, limit)]
