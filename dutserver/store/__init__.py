"""The stores: the only SQL of the server, each implementing core.ports.Store.

sqlite.py is the embedded default (one process, one file; its Notifier in-process). PostgreSQL,
for several nodes on one database, joins here with its LISTEN/NOTIFY behind the Notifier port.
"""

from __future__ import annotations

import socket

from dutserver.config import Settings
from dutserver.core.notify import LocalNotifier
from dutserver.core.ports import Notifier, Store
from dutserver.store.sqlite import SqliteStore


def is_url(database: str) -> bool:
    """Whether a database argument names PostgreSQL (else it is an SQLite file)."""
    return database.startswith(("postgresql://", "postgres://"))


def create_store(settings: Settings) -> tuple[Store, Notifier]:
    """The store that settings name (db_url: PostgreSQL; else the SQLite file db_path), not yet
    open, and its Notifier."""
    if settings.db_url:
        from dutserver.store.postgres import PostgresStore  # the driver only where it is used
        pg = PostgresStore(settings.db_url, settings.node_name or default_node_name(settings),
                           settings.node_lease_s)
        return pg, pg.notifier
    store = SqliteStore(settings.db_path, settings.sqlite_synchronous,
                        settings.commit_interval_ms / 1000, settings.node_name or "local",
                        settings.checkpoint_interval_s, settings.index_interval_s)
    return store, LocalNotifier()


def default_node_name(settings: Settings) -> str:
    """hostname:port: unique among the nodes of one database, the same after a restart."""
    return f"{socket.gethostname()}:{settings.port}"
