"""Failed logins and agent checks: counted per (account, address) and per address; bans past
the limits.

Counters live in this process (a failure is counted where it happened); a ban goes to the
store at once and every process reads the bans in force every `accounts_refresh_s`, so a ban
on one node holds on all of them within that time.
"""

from __future__ import annotations

from dutserver.config import Settings
from dutserver.core.errors import ApiError
from dutserver.core.clock import Clock
from dutserver.core.ports import Store


def ban_key(account: str | None, address: str) -> str:
    """How a ban is named in the store: an address, or an account from an address (no address
    holds the separator, so no two pairs share a key)."""
    return address if account is None else f"{account}\x1f{address}"


class Throttle:
    def __init__(self, settings: Settings, store: Store, clock: Clock) -> None:
        self.s = settings
        self.store = store
        self.clock = clock
        self._pair: dict[tuple[str, str], tuple[int, float]] = {}  # -> (failures, first at)
        self._addr: dict[str, tuple[int, float]] = {}
        self._banned: dict[str, int] = {}  # ban_key -> until_ms (wall time: shared by nodes)

    async def refresh(self) -> None:
        """The bans in force, as the store has them (those of other nodes too)."""
        now = self.clock.now_ms()
        stored = await self.store.bans(now)
        # Bans only end by time, so this node's own (maybe not committed yet) stay too.
        for key, until in self._banned.items():
            if until > now and until > stored.get(key, 0):
                stored[key] = until
        self._banned = stored

    def check(self, account: str, address: str, whole_address: bool = True) -> None:
        """429 while the pair, or (whole_address) the address, is banned."""
        if not self._banned:
            return  # the usual case: nobody is banned
        now = self.clock.now_ms()
        keys = (ban_key(account, address), address) if whole_address else (
            ban_key(account, address),)
        for key in keys:
            until = self._banned.get(key)
            if until is not None:
                if until > now:
                    raise ApiError(429, "Too many failed attempts, try again later",
                                   {"Retry-After": str(max(1, round((until - now) / 1000)))})
                del self._banned[key]

    def failed(self, account: str, address: str, per_address: bool = True) -> str | None:
        """Records a failure (per_address: against the whole address too); returns what got
        banned by it, if anything."""
        now = self.clock.monotonic()
        window = max(self.s.ban_s, 60.0)  # failures count for a minute, however short the ban
        count, first = self._pair.get((account, address), (0, now))
        count = count + 1 if now - first < window else 1
        self._pair[(account, address)] = (count, first if count > 1 else now)
        acount = 0
        if per_address:
            acount, afirst = self._addr.get(address, (0, now))
            acount = acount + 1 if now - afirst < 60 else 1
            self._addr[address] = (acount, afirst if acount > 1 else now)
        if per_address and acount >= self.s.ban_address_failures:
            self._ban(ban_key(None, address))
            self._addr.pop(address, None)
            return f"address {address}"
        if count >= self.s.ban_failures:
            self._ban(ban_key(account, address))
            self._pair.pop((account, address), None)
            return f"account {account} from {address}"
        return None

    def _ban(self, key: str) -> None:
        until = self.clock.now_ms() + int(self.s.ban_s * 1000)
        self._banned[key] = until
        self.store.add_ban(key, until)

    def succeeded(self, account: str, address: str) -> None:
        self._pair.pop((account, address), None)

    def prune(self) -> None:
        """Forgets old counters and ended bans, so memory stays bounded under a flood."""
        now = self.clock.monotonic()
        window = max(self.s.ban_s, 60)
        self._pair = {k: v for k, v in self._pair.items() if now - v[1] < window}
        self._addr = {k: v for k, v in self._addr.items() if now - v[1] < 60}
        wall = self.clock.now_ms()
        self._banned = {k: v for k, v in self._banned.items() if v > wall}
