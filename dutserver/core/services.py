"""The core's services in one typed object: what every route module gets (as `req.services`)
instead of strings into a state dict. The dispatcher is not among them: routes reach queues and
polls only through Tasks and Fleet."""

from __future__ import annotations

from dataclasses import dataclass

from dutserver.config import Settings
from dutserver.core.accounts import Accounts
from dutserver.core.auth import Auth
from dutserver.core.devices import RdfmDevices
from dutserver.core.dispatcher import Dispatcher
from dutserver.core.enrollment import Enrollment
from dutserver.core.jobs import Jobs
from dutserver.core.fleet import Fleet
from dutserver.core.clock import Clock
from dutserver.core.ports import Notifier, Store
from dutserver.core.schedules import Schedules
from dutserver.core.tasks import Tasks


@dataclass(eq=False)
class Services:
    settings: Settings
    auth: Auth
    tasks: Tasks
    fleet: Fleet
    accounts: Accounts
    enrollment: Enrollment
    devices: RdfmDevices  # RDFM devices' enrollment and tokens (served with rdfm_devices on)
    jobs: Jobs
    schedules: Schedules
    openapi: bytes = b"{}"  # this server's OpenAPI description (http/openapi.py)

    @property
    def closing(self) -> bool:
        """Shutting down: answers close their connections, /readyz says 503."""
        return self.tasks.closing

    async def unready(self) -> str | None:
        """Why this node should get no traffic now, if it should not."""
        if self.closing:
            return "Shutting down"
        if not await self.tasks.store.ping():
            return "database unavailable"
        return None

    async def start(self) -> None:
        """Start-up: the keys, the accounts and bans, then this node's recovery."""
        await self.auth.check_key()
        if self.settings.rdfm_devices:
            self.devices.start()
        await self.auth.refresh()
        await self.tasks.recover()

    def close(self) -> None:
        """Shutdown, first step: every parked poll ends now, empty; new ones end at once."""
        self.tasks.dispatcher.close()

    async def refresh(self) -> None:
        """Every accounts_refresh_s: account changes made elsewhere, the bans in force."""
        before = set(self.auth.accounts)
        await self.auth.refresh()
        if before - set(self.auth.accounts):
            self.tasks.cancel_for_removed_agents()
        self.tasks.end_polls_of_changed()

    def sweep(self) -> None:
        """Every sweep_interval_s, and once more at shutdown: expiries, last-seen times,
        session use, old throttle counters."""
        self.tasks.sweep()
        self.auth.flush_sessions()
        self.auth.throttle.prune()


def build_services(settings: Settings, store: Store, notifier: Notifier,
                   clock: Clock) -> Services:
    auth = Auth(settings, store, clock)
    dispatcher = Dispatcher(settings.online_grace_s, clock)
    tasks = Tasks(settings, store, notifier, clock, dispatcher, auth)
    jobs = Jobs(settings, store, clock, tasks)
    return Services(settings, auth, tasks, Fleet(store, dispatcher, auth, clock, notifier.fleet),
                    Accounts(store, clock, auth, tasks),
                    Enrollment(settings, store, clock, auth, tasks),
                    RdfmDevices(settings, store, clock, auth),
                    jobs, Schedules(settings, store, clock, jobs))
