"""The stores: the only SQL of the server, each implementing core.ports.Store.

sqlite.py is the embedded default (one process, one file; its Notifier in-process). PostgreSQL,
for several nodes on one database, joins here with its LISTEN/NOTIFY behind the Notifier port.
"""

from __future__ import annotations

from dutserver.config import Settings
from dutserver.core.notify import LocalNotifier
from dutserver.core.ports import Notifier, Store
from dutserver.store.sqlite import SqliteStore


def create_store(settings: Settings) -> tuple[Store, Notifier]:
    """The store that settings.db_path names, not yet open, and its Notifier."""
    store = SqliteStore(settings.db_path, settings.sqlite_synchronous,
                        settings.commit_interval_ms / 1000, settings.node_name or "local",
                        settings.checkpoint_interval_s, settings.index_interval_s)
    return store, LocalNotifier()
