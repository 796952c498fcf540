"""One frozen Settings object: flags > environment (DUTSERVER_*) > TOML file > defaults."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import zoneinfo
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Every timeout and limit of the server. Field docs become the `--help` texts."""

    db_path: Path = field(default=Path("dutserver.db"), metadata={"help": "SQLite database file"})
    db_url: str = field(default="", metadata={"help": "PostgreSQL URL (instead of db_path)"})
    node_name: str = field(
        default="", metadata={"help": "this server's name among the nodes of one database, "
                                      "recorded with each task it delivers [default: local]"})
    port: int = field(default=8080, metadata={"help": "TCP port"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    tls_cert: Path | None = field(default=None, metadata={"help": "TLS certificate (PEM)"})
    tls_key: Path | None = field(default=None, metadata={"help": "TLS private key (PEM)"})
    key_file: Path | None = field(
        default=None, metadata={"help": "key for agent secret digests [default: DBFILE.key]"})
    poll_timeout_s: float = field(default=26.0, metadata={"help": "agent long-poll timeout"})
    submit_timeout_s: float = field(default=26.0, metadata={"help": "default blocking submit wait"})
    submit_timeout_max_s: float = field(default=300.0, metadata={"help": "maximum submit wait"})
    online_grace_s: float = field(default=5.0, metadata={"help": "agent stays online after a poll"})
    queue_max: int = field(default=1000, metadata={"help": "queued tasks per agent"})
    body_max_bytes: int = field(default=MIB, metadata={"help": "largest task or result body"})
    task_expiry_s: float = field(default=86400.0, metadata={"help": "default task lifetime"})
    session_idle_s: float = field(default=7200.0, metadata={"help": "session idle timeout"})
    session_max_s: float = field(default=86400.0, metadata={"help": "session absolute lifetime"})
    session_cache_s: float = field(
        default=1.0, metadata={"help": "how long a session is trusted from memory before it is "
                                       "read again (a logout elsewhere holds after this long)"})
    ban_failures: int = field(default=5, metadata={"help": "failures per account+address"})
    ban_address_failures: int = field(
        default=50, metadata={"help": "failures per address a minute, any account"})
    ban_s: float = field(default=60.0, metadata={"help": "ban length"})
    accounts_refresh_s: float = field(
        default=0.25, metadata={"help": "how often CLI account changes are picked up"})
    sweep_interval_s: float = field(default=1.0, metadata={"help": "expiry sweep period"})
    node_heartbeat_s: float = field(
        default=1.0, metadata={"help": "several nodes: how often a node says it is alive"})
    node_lease_s: float = field(
        default=5.0, metadata={"help": "several nodes: a node silent this long is recovered by "
                                       "the others (its deliveries fail)"})
    checkpoint_interval_s: float = field(
        default=1.0, metadata={"help": "how often the WAL is copied into the database file"})
    index_interval_s: float = field(
        default=0.1, metadata={"help": "how often new tasks and changed states are written to "
                                       "the history's look-up tables"})
    keep_alive_s: float = field(
        default=60.0, metadata={"help": "idle connections close after this long"})
    shutdown_timeout_s: float = field(
        default=1.5, metadata={"help": "how long in-flight requests may finish at shutdown"})
    sqlite_synchronous: str = field(
        default="NORMAL", metadata={"help": "SQLite synchronous mode (FULL: fsync every commit)"})
    # 0: a batch commits one loop turn after its first write. Under full load the turns are
    # long and batch by themselves (the same round trips/s as with 1 ms); at half load the
    # round trip's p50 fell from 2.0 to 0.44 ms and its p99 from 8.5-9.1 to 4.0-5.1 ms, for 7 %
    # more CPU per round trip at that load (bench/README.md, "Session 6").
    commit_interval_ms: float = field(
        default=0.0, metadata={"help": "under load, at most one database commit per interval "
                                       "(0: a commit per loop turn that wrote)"})
    enroll_pending_max: int = field(
        default=200, metadata={"help": "pending enrollment requests per token and per address "
                                       "(past it the oldest of them expires)"})
    enroll_token_max_s: float = field(
        default=366 * 86400.0, metadata={"help": "longest lifetime of an enrollment token"})
    rdfm_devices: bool = field(
        default=False, metadata={"help": "serve RDFM devices (their routes answer 404 when off)"})
    rdfm_token_s: float = field(
        default=300.0, metadata={"help": "lifetime of an RDFM device token (at least 30 s)"})
    timezone: str = field(
        default="", metadata={"help": "IANA time zone of schedules and maintenance windows that "
                                      "name none [default: this machine's, else UTC]"})
    schedule_min_interval_s: float = field(
        default=60.0, metadata={"help": "shortest interval of a schedule's every_s"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})
    access_log: bool = field(default=False, metadata={"help": "log every request"})

    @property
    def key_path(self) -> Path:
        """DBFILE.key beside an SQLite file; with PostgreSQL, dutserver.key in the working
        directory: every node of one database needs a copy of the same key."""
        if self.key_file:
            return self.key_file
        if self.db_url:
            return Path("dutserver.key")
        return self.db_path.with_name(self.db_path.name + ".key")

    @property
    def rdfm_key_path(self) -> Path:
        """The key that signs RDFM device tokens: the agent-digest key's file name + ".rdfm",
        beside it, created on first use; every node of one database needs a copy of it too
        (a token issued by one node is checked by the others)."""
        return self.key_path.with_name(self.key_path.name + ".rdfm")

    @property
    def zone(self) -> str:
        """The time zone of schedules and windows that name none: the setting, else the
        machine's (its IANA name), else UTC. Each schedule and job stores the zone it got, so
        nodes on machines in other zones agree."""
        return self.timezone or local_zone_name()

    @property
    def database(self) -> str:
        """The database for messages: the SQLite file, or the URL without its password."""
        return redact_url(self.db_url) if self.db_url else str(self.db_path)


SETTING_FIELDS = {f.name: f for f in fields(Settings)}
_PATHS = frozenset({"db_path", "tls_cert", "tls_key", "key_file"})


def redact_url(url: str) -> str:
    """A database URL without its password, for log lines and error messages."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def local_zone_name() -> str:
    """This machine's time zone as an IANA name (TZ, else where /etc/localtime points, else
    /etc/timezone), or UTC when it has none by name."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        candidates.append(os.path.realpath("/etc/localtime"))
    except OSError:
        pass
    try:
        with open("/etc/timezone", encoding="utf-8") as f:
            candidates.append(f.read().strip())
    except OSError:
        pass
    for text in candidates:
        name = text.split("zoneinfo/", 1)[-1].removeprefix("posix/")
        if name and not name.startswith("/") and _is_zone(name):
            return name
    return "UTC"


def _is_zone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _coerce(name: str, value: Any) -> Any:
    """Turns a TOML, environment or flag value into the field's type, or raises ValueError."""
    kind = SETTING_FIELDS[name].type
    if value is None:
        return None
    if name in _PATHS:  # by name: compiled, a field's type is not the annotation's text
        return Path(value)
    if kind in ("float", float):
        return float(value)
    if kind in ("int", int):
        return int(value)
    if kind in ("bool", bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: not a boolean: {value!r}")
    return str(value)


def load_settings(flags: dict[str, Any], config_file: Path | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """Merges the four sources, highest first: flags, DUTSERVER_* variables, TOML, defaults."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or (Path(environ["DUTSERVER_CONFIG"])
                                  if environ.get("DUTSERVER_CONFIG") else None)
    if config_file is not None:
        with open(config_file, "rb") as f:
            data = tomllib.load(f)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in SETTING_FIELDS:
                raise ValueError(f"{config_file}: unknown setting {key!r}")
            values[name] = _coerce(name, value)
    for name in SETTING_FIELDS:
        env_value = environ.get("DUTSERVER_" + name.upper())
        if env_value is not None:
            values[name] = _coerce(name, env_value)
    for name, value in flags.items():
        if value is not None:
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    positive = ["poll_timeout_s", "submit_timeout_s", "submit_timeout_max_s", "task_expiry_s",
                "session_idle_s", "session_max_s", "session_cache_s", "ban_s", "accounts_refresh_s",
                "sweep_interval_s", "node_heartbeat_s", "node_lease_s", "checkpoint_interval_s", "index_interval_s", "queue_max",
                "body_max_bytes", "ban_failures", "ban_address_failures",
                "enroll_pending_max", "enroll_token_max_s"]
    for name in positive:
        if getattr(s, name) <= 0:
            raise ValueError(f"{name} must be positive")
    if s.online_grace_s < 0 or s.shutdown_timeout_s < 0:
        raise ValueError("online_grace_s and shutdown_timeout_s must not be negative")
    if s.rdfm_token_s < 30:
        raise ValueError("rdfm_token_s must be at least 30 s (RDFM clients renew 5 s early)")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if s.timezone and not _is_zone(s.timezone):
        raise ValueError(f"timezone: unknown time zone {s.timezone!r} (an IANA name like "
                         "Europe/Paris or UTC)")
    if s.schedule_min_interval_s <= 0:
        raise ValueError("schedule_min_interval_s must be positive")
    if s.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError("sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA")


def replace(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)
