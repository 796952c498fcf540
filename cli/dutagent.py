#!/usr/bin/env python3
"""dutagent: the dutserver agent.

One file, standard library only, Python >= 3.9, Linux, macOS and Windows. It
long-polls the server for tasks (PROTOCOL.md part 1), runs each in its own
thread (part 3) and posts the result back.

    dutagent register --server https://dut.example.com:8443
    dutagent enroll https://dut.example.com:8443 TOKEN
    dutagent run
"""

# The agent runs on Python 3.9, where datetime.UTC does not exist and socket.timeout is
# not yet TimeoutError: keep the old spellings.
# ruff: noqa: UP017, UP041

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import http.client
import ipaddress
import json
import logging
import logging.handlers
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from typing import Any

__version__ = "1.0.0"

USER_AGENT = "dutagent/" + __version__
IS_WINDOWS = os.name == "nt"
IS_MACOS = sys.platform == "darwin"
IS_LINUX = sys.platform.startswith("linux")
MIB = 1024 * 1024

# Windows process creation flags (not all are exported by `subprocess` before 3.7 / on POSIX).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000

# How long the agent still reads a command's pipes after the shell exited: a background
# process that inherited them (`server &`) would otherwise hold the task forever.
PIPE_DRAIN_S = 0.5
# After the grace period, running commands are killed; this is how long their error
# results then get to reach the server before the agent exits anyway.
KILL_POST_WINDOW_S = 3.0
# Answers to polls and results are small; anything bigger than this is garbage.
MAX_SMALL_ANSWER_BYTES = 64 * 1024
# An empty poll answer faster than this means the server is not long-polling
# (misconfigured, or a proxy answering); back off instead of spinning.
FAST_EMPTY_POLL_S = 0.1

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

log = logging.getLogger("dutagent")

JsonDict = dict[str, Any]


# --------------------------------------------------------------------------- settings

class Option:
    """One setting: a command-line flag, a DUTAGENT_* environment variable and a config-file key."""

    def __init__(self, name: str, kind: type, default: Any, help: str,
                 commands: tuple[str, ...] = ("run",), in_file: bool = True) -> None:
        self.name = name
        self.kind = kind
        self.default = default
        self.help = help
        self.commands = commands
        self.in_file = in_file

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "DUTAGENT_" + self.name.upper()


# Which commands take an option. `enroll` runs tasks once accepted, so it takes every option
# of `run`; `trust` only needs to find the config file.
RUNNING = ("run", "enroll")
BOTH = ("register", *RUNNING)
OPTIONS: list[Option] = [
    Option("server", str, None, "server URL, e.g. https://dut.example.com:8443; several nodes of "
           "one fleet as a comma list (URL1,URL2,…): the agent starts at a random one and "
           "moves to the next when one fails", BOTH),
    Option("name", str, None, "agent name (register: default the host name)", ("register", "run")),
    Option("secret", str, None, "agent secret; prefer the config file or DUTAGENT_SECRET, "
           "since other users can see command lines"),
    Option("token", str, None, "enrollment token: without a name and secret the agent enrolls "
           "with it first (see `dutagent enroll`); prefer the config file or DUTAGENT_TOKEN",
           RUNNING),
    Option("config", str, None, "config file (default: see `dutagent --help`)", (*BOTH, "trust"),
           in_file=False),
    Option("classic", bool, False, "speak the classic protocol (Authorization: name:secret, "
           "/task_result) to an unmodified classic dutserver", ("register", "run")),
    Option("ca_file", str, None, "PEM file of the CA that signed the server's certificate", BOTH),
    Option("insecure", bool, False, "do NOT verify the server's TLS certificate, and allow "
           "enrolling over plain http:// (dangerous)", BOTH),
    Option("pin", bool, None, "trust the server's TLS key on first contact and refuse any other "
           "key later, instead of the system's CAs (default: on for enrolled agents)", RUNNING),
    Option("policy", str, None, "local policy file of task types this PC refuses (default "
           "/etc/dutagent/policy.json, %%ProgramData%%\\dutagent\\policy.json on Windows)",
           RUNNING),
    Option("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR", (*BOTH, "trust")),
    Option("log_file", str, None, "also log to this file (rotated at 5 MiB)", RUNNING),
    Option("max_tasks", int, 4, "tasks run at once", RUNNING),
    Option("poll_timeout_s", float, 35.0, "seconds without an answer to a poll before the server "
           "counts as dead; must exceed the server's poll timeout (26 s by default)", RUNNING),
    Option("backoff_min_s", float, 1.0, "first retry delay ceiling after a failure", RUNNING),
    Option("backoff_max_s", float, 20.0, "retry delay ceiling (delays are random below it)",
           RUNNING),
    Option("forbidden_backoff_s", float, 120.0, "delay after the server refused the credentials",
           RUNNING),
    Option("enroll_poll_min_s", float, 1.0, "first wait between two questions whether the "
           "enrollment was accepted; it doubles up to --enroll-poll-max-s", RUNNING),
    Option("enroll_poll_max_s", float, 60.0, "longest wait between two such questions", RUNNING),
    Option("grace_s", float, 30.0, "on SIGTERM, how long running tasks may still finish", RUNNING),
    Option("cmd_timeout_s", float, 3600.0, "execute_cmd timeout when the task gives none (0: none)",
           RUNNING),
    Option("max_output_bytes", int, MIB, "execute_cmd keeps at most this much of stdout and of "
           "stderr", RUNNING),
    Option("max_result_bytes", int, MIB, "largest result body posted (the server's limit)", RUNNING),
    Option("max_task_bytes", int, 32 * MIB, "largest task answer accepted from the server", RUNNING),
    Option("server_seed", int, None, "seed of the random choice of the first of several servers "
           "(default: truly random; for tests)", RUNNING),
    # What the agent itself keeps in its config file: no flag, no environment variable.
    Option("pins", dict, None, "the servers' pinned key digests by host:port", ()),
    Option("enrollment", dict, None, "the pending enrollment: id and credential", ()),
]
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


class Settings:
    """The resolved settings: flags > DUTAGENT_* environment > config file > defaults."""

    server: str
    name: str
    secret: str
    config: str | None
    classic: bool
    ca_file: str | None
    insecure: bool
    log_level: str
    log_file: str | None
    max_tasks: int
    poll_timeout_s: float
    backoff_min_s: float
    backoff_max_s: float
    forbidden_backoff_s: float
    grace_s: float
    cmd_timeout_s: float
    max_output_bytes: int
    max_result_bytes: int
    max_task_bytes: int
    server_seed: int | None
    token: str | None
    pin: bool | None
    policy: str | None
    enroll_poll_min_s: float
    enroll_poll_max_s: float
    pins: dict[str, str] | None
    enrollment: JsonDict | None

    def __init__(self, values: JsonDict, origins: dict[str, str] | None = None) -> None:
        for option in OPTIONS:
            setattr(self, option.name, values.get(option.name, option.default))
        # Where each value came from ("flag", "env", "file"): the agent rewrites its secret
        # only when the config file is what gives it (an environment variable would win
        # over the new one at the next start).
        self.origins: dict[str, str] = dict(origins or {})


class UsageError(Exception):
    """Bad settings or arguments: printed as one line, exit status 2."""


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def coerce(option: Option, value: Any, origin: str) -> Any:
    """Converts a value from the environment (str) or the config file (JSON) to the option's type."""
    if value is None:
        return None
    if option.name == "server" and isinstance(value, list) and value \
            and all(isinstance(v, str) for v in value):
        return ",".join(value)  # the config file may list a fleet's nodes as a JSON array
    try:
        if option.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                return parse_bool(value)
        elif option.kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value.strip())
        elif option.kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
        elif option.kind is dict:
            if isinstance(value, dict):
                return value
        elif isinstance(value, str):
            return value
    except ValueError:
        pass
    raise UsageError(f"{origin}: {option.name} must be a {option.kind.__name__}, not {value!r}")


def default_config_path() -> str:
    """The user's config folder, or a system path for root/administrators (services)."""
    if IS_WINDOWS:
        if windows_is_admin():
            base = os.environ.get("PROGRAMDATA") or r"C:\ProgramData"
        else:
            base = os.environ.get("APPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Roaming")
        return os.path.join(base, "dutagent", "agent.json")
    if os.geteuid() == 0:
        return "/etc/dutagent/agent.json"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "dutagent", "agent.json")


def windows_is_admin() -> bool:
    try:
        import ctypes
        return bool(ctypes.windll.shell32.IsUserAnAdmin())  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        return False


def read_config_file(path: str) -> JsonDict:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: not a JSON object")
    values: JsonDict = {}
    for key, value in data.items():
        option = OPTION_BY_NAME.get(key)
        if option is None or not option.in_file:
            log.warning("config file %s: unknown key %r ignored", path, key)
            continue
        values[key] = coerce(option, value, f"config file {path}")
    if not IS_WINDOWS:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            log.warning("config file %s holds the agent secret but other users may read it "
                        "(mode %o): run chmod 600 %s", path, stat.S_IMODE(mode), path)
    return values


def resolve_settings(args: argparse.Namespace, command: str, environ: dict[str, str]) -> tuple[Settings, str, bool]:
    """Merges flags > environment > config file > defaults; returns (settings, config path, file found)."""
    from_flags = {o.name: getattr(args, o.name) for o in OPTIONS
                  if command in o.commands and getattr(args, o.name, None) is not None}
    from_env = {}
    for option in OPTIONS:
        if command in option.commands and environ.get(option.env) not in (None, ""):
            from_env[option.name] = coerce(option, environ[option.env], option.env)
    config_path = from_flags.get("config") or from_env.get("config")
    explicit = config_path is not None
    config_path = os.path.abspath(config_path or default_config_path())
    from_file: JsonDict = {}
    found = False
    # An agent that enrolls writes its config file, so for it a missing file is no mistake.
    must_exist = explicit and command == "run" and "token" not in from_env and "token" not in from_flags
    if command != "register":
        try:
            from_file = read_config_file(config_path)
            found = True
        except FileNotFoundError:
            if must_exist:
                raise UsageError(f"config file not found: {config_path}") from None
        except PermissionError:
            if explicit:
                raise UsageError(f"cannot read config file {config_path}: permission denied") from None
            # An unreadable file at the default place (another user's HOME, say) matters only
            # when the settings it would give are missing, and then main() says so.
            log.warning("cannot read config file %s: permission denied; going on without it", config_path)
    merged = {**from_file, **from_env, **from_flags, "config": config_path}
    origins = {**{k: "file" for k in from_file}, **{k: "env" for k in from_env},
               **{k: "flag" for k in from_flags}}
    return Settings(merged, origins), config_path, found


def split_servers(text: str) -> list[str]:
    """The URLs of a comma list ("URL1,URL2"), blanks and repeats dropped, in order."""
    urls: list[str] = []
    for item in text.split(","):
        url = item.strip()
        if url and url not in urls:
            urls.append(url)
    return urls


def validate_settings(s: Settings) -> None:
    if s.server is not None:
        urls = split_servers(s.server)
        for url in urls or [s.server]:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UsageError(f"server must be an http:// or https:// URL, not {url!r}")
    if s.name is not None and not NAME_RE.match(s.name):
        raise UsageError(f"invalid agent name {s.name!r}: use 1..64 characters of A-Z a-z 0-9 . _ -")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"log level must be DEBUG, INFO, WARNING or ERROR, not {s.log_level!r}")
    if s.ca_file is not None and not os.path.isfile(s.ca_file):
        raise UsageError(f"CA file not found: {s.ca_file}")
    for name in ("max_tasks", "max_output_bytes", "max_result_bytes", "max_task_bytes"):
        if getattr(s, name) < 1:
            raise UsageError(f"{name} must be at least 1")
    for name in ("poll_timeout_s", "backoff_min_s", "backoff_max_s", "forbidden_backoff_s"):
        if not getattr(s, name) > 0:
            raise UsageError(f"{name} must be above 0")
    if s.grace_s < 0 or s.cmd_timeout_s < 0:
        raise UsageError("grace_s and cmd_timeout_s must not be negative")
    if s.backoff_min_s > s.backoff_max_s:
        raise UsageError("backoff_min_s must not exceed backoff_max_s")
    if not 0 < s.enroll_poll_min_s <= s.enroll_poll_max_s:
        raise UsageError("enroll_poll_min_s must be above 0 and not exceed enroll_poll_max_s")
    if s.pins is not None and not all(isinstance(k, str) and isinstance(v, str)
                                      for k, v in s.pins.items()):
        raise UsageError("config file: pins must map \"host:port\" to \"sha256//…\" strings")
    if s.token is not None and not s.token.strip():
        s.token = None  # an empty DUTAGENT_TOKEN= in a unit file means none


# --------------------------------------------------------------------------- HTTP

class Reply:
    """A complete HTTP answer."""

    def __init__(self, status: int, body: bytes, retry_after_s: float | None) -> None:
        self.status = status
        self.body = body
        self.retry_after_s = retry_after_s

    def says_error(self) -> bool:
        """A body of {"error": true, …}: a refusal even when the status claims success."""
        try:
            data = json.loads(self.body)
        except (ValueError, RecursionError):
            return False
        return isinstance(data, dict) and data.get("error") is True

    def message(self) -> str:
        """The server's {"msg": …} when it sent one, else a short excerpt of the body."""
        try:
            data = json.loads(self.body)
            if isinstance(data, dict) and isinstance(data.get("msg"), str):
                return str(data["msg"])
        except (ValueError, RecursionError):
            pass  # not JSON: the excerpt below tells what it was
        return excerpt(self.body)


class BadAnswer(Exception):
    """The server answered something that is not what the protocol says."""


class Aborted(Exception):
    """The connection was closed on purpose because the agent is stopping."""


def excerpt(data: Any, limit: int = 200) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else repr(data)
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "no answer in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); use --ca-file"
    if isinstance(exc, http.client.IncompleteRead):
        return "truncated answer (the connection closed before the announced length)"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "the connection was reset"
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if not isinstance(exc, (OSError, BadAnswer)) else text


# Errors of a keep-alive connection the server closed while it was idle: the request
# never reached the server, so it is sent again at once on a fresh connection.
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError,
                           BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError)


class Endpoint:
    """The server's address, parsed once."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None,
                 pins: PinStore | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.base_path = parts.path.rstrip("/")
        self.ssl_context = ssl_context
        # Set when the server's key is pinned rather than verified by a CA (then the handshake
        # itself verifies nothing, and check_connection() must pass before anything is sent).
        self.pins = pins if self.https else None

    @property
    def host_port(self) -> str:
        """The key of this server's pin: a fleet's nodes each have their own certificate."""
        host = self.host.lower()
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def path(self, path: str) -> str:
        return self.base_path + path

    def new_connection(self, connect_timeout_s: float) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=connect_timeout_s,
                                               context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=connect_timeout_s)

    def check_connection(self, conn: http.client.HTTPConnection) -> None:
        """Raises PinMismatch when a pinned server shows another key; closes the connection then."""
        if self.pins is None or conn.sock is None:
            return
        try:
            sock = conn.sock
            der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
            if not der:
                raise PinMismatch(f"the server {self.host_port} showed no certificate; nothing was sent")
            try:
                pin = spki_pin(der)
            except ValueError as e:
                raise PinMismatch(f"cannot read the key in the certificate of the server "
                                  f"{self.host_port} ({e}); nothing was sent") from None
            self.pins.check(self.host_port, pin)
        except BaseException:
            conn.close()
            raise


def make_ssl_context(ca_file: str | None, insecure: bool, pinning: bool = False) -> ssl.SSLContext:
    """CA verification (the system's CAs, or ca_file's); none at all (insecure); or, for a pinned
    server, none in the handshake: Endpoint.check_connection compares the key right after it."""
    if insecure or (pinning and not ca_file):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_file)


# --------------------------------------------------------------------------- server key pins

class PinMismatch(ssl.SSLError):
    """The server's key is not the one pinned for it: the connection is closed unused."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "pinned key mismatch"


def der_element(data: bytes, offset: int, limit: int | None = None) -> tuple[int, int, int]:
    """One DER element at offset, within data[:limit]: (tag, start of its contents, end).
    ValueError if malformed.

    Only what X.509 needs: single-byte tags and definite lengths (DER allows no other)."""
    limit = len(data) if limit is None else limit
    if offset + 2 > limit:
        raise ValueError("truncated DER element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not used in certificates")
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > limit:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start:start + count], "big")
        start += count
    end = start + length
    if end > limit:
        raise ValueError("DER element runs past its container")
    return tag, start, end


def spki_from_certificate(der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of an X.509 certificate (RFC 5280 4.1), whole with its header.

    Certificate = SEQUENCE { tbsCertificate, signatureAlgorithm, signature };
    tbsCertificate = SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
    validity, subject, subjectPublicKeyInfo, … }. The standard library parses certificates
    only into text, so this walks the bytes: the key is what a pin must cover (it outlives a
    certificate renewed with the same key)."""
    tag, start, end = der_element(der, 0)
    if tag != 0x30:
        raise ValueError("a certificate is a DER SEQUENCE")
    tag, offset, tbs_end = der_element(der, start, end)
    if tag != 0x30:
        raise ValueError("tbsCertificate is not a SEQUENCE")
    fields = 0
    while offset < tbs_end:
        tag, _, next_offset = der_element(der, offset, tbs_end)
        if not (fields == 0 and tag == 0xA0):  # the optional [0] version is not counted
            if fields == 5:
                if tag != 0x30:
                    raise ValueError("subjectPublicKeyInfo is not a SEQUENCE")
                return der[offset:next_offset]
            fields += 1
        offset = next_offset
    raise ValueError("certificate without subjectPublicKeyInfo")


def spki_pin(der_certificate: bytes) -> str:
    """sha256//BASE64 of the certificate's SubjectPublicKeyInfo: curl's --pinnedpubkey form."""
    digest = hashlib.sha256(spki_from_certificate(der_certificate)).digest()
    return "sha256//" + base64.b64encode(digest).decode("ascii")


class PinStore:
    """The pinned key of each server (host:port). A server seen for the first time is trusted
    and its key recorded (in the config file when there is one); after that only that key.
    Thread-safe: the poller and the result threads connect at the same time."""

    def __init__(self, pins: dict[str, str] | None, config: ConfigFile | None) -> None:
        self.pins = dict(pins or {})
        self.config = config
        self._lock = threading.Lock()

    def check(self, host_port: str, pin: str) -> None:
        with self._lock:
            known = self.pins.get(host_port)
            if known is None:
                self.pins[host_port] = pin
        if known is None:
            self._record(host_port, pin)  # outside the lock: the file has its own
            return
        if known != pin:
            raise PinMismatch(
                f"the server {host_port} showed the key {pin}, but this agent pinned {known} for "
                f"it; nothing was sent. Someone may be posing as the server. If its key was "
                f"changed on purpose, run `dutagent trust --reset` on this PC and restart the agent")

    def _record(self, host_port: str, pin: str) -> None:
        if self.config is None:
            log.warning("trusting the key of %s on first contact (%s); no config file to pin it "
                        "in, so it is trusted again at the next start", host_port, pin)
            return

        def change(data: JsonDict) -> None:
            pins = data.get("pins")
            data["pins"] = {**(pins if isinstance(pins, dict) else {}), host_port: pin}

        try:
            self.config.update(change)
        except OSError as e:
            log.warning("trusting the key of %s on first contact (%s), but it could not be pinned "
                        "in %s: %s", host_port, pin, self.config.path, describe_error(e))
            return
        log.info("trusting the key of %s on first contact: %s, pinned in %s", host_port, pin,
                 self.config.path)


class ConfigFile:
    """The agent's config file, which the agent updates itself: enrollment state, pins, a new
    secret. Each update re-reads the file (keeping what an administrator put there) and replaces
    it whole (temporary file + rename, mode 0600), so a crash leaves the old file or the new one,
    never half of one. One lock serialises the updates of all threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> JsonDict:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise OSError(f"config file {self.path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise OSError(f"config file {self.path} is not a JSON object")
        return data

    def update(self, change: Callable[[JsonDict], Any]) -> None:
        """Applies change(data) to the file's JSON object and writes it back atomically."""
        with self.lock:
            data = self.read()
            change(data)
            temp = write_private_file(self.path, data)
            try:
                os.replace(temp, self.path)
            except OSError:
                remove_quietly(temp)
                raise

    def check_writable(self) -> None:
        """Raises OSError unless a new version of the file could be written now."""
        with self.lock:
            remove_quietly(write_private_file(self.path, self.read()))


class HttpChannel:
    """One persistent HTTP/1.1 connection to the server, re-opened when it breaks.

    abort() may be called from another thread: it shuts the socket down, so a request
    parked in a long-poll returns at once instead of after the poll timeout.
    """

    def __init__(self, endpoint: Endpoint, read_timeout_s: float) -> None:
        self._endpoint = endpoint
        self._read_timeout_s = read_timeout_s
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False

    def request(self, method: str, path: str, headers: dict[str, str],
                body: bytes | None = None, max_body: int = MAX_SMALL_ANSWER_BYTES) -> Reply:
        for attempt in (0, 1):
            conn, reused = self._connection()
            try:
                return self._exchange(conn, method, path, headers, body, max_body)
            except STALE_CONNECTION_ERRORS:
                self._drop(conn)
                if self._aborted:
                    raise Aborted() from None
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                self._drop(conn)
                if self._aborted:
                    raise Aborted() from None
                raise
        raise AssertionError("unreachable")

    def open(self) -> None:
        """Connects now (a request sent later reuses the connection)."""
        self._connection()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would tear the
                # TLS object down under the feet of the thread that is reading from it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._aborted:
                raise Aborted()
            conn = self._conn
        if conn is not None and conn.sock is not None:
            return conn, True
        conn = self._endpoint.new_connection(min(10.0, self._read_timeout_s))
        conn.connect()
        self._endpoint.check_connection(conn)  # before the first byte of a request
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout_s)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass
        with self._lock:
            self._conn = conn
            aborted = self._aborted
        if aborted:
            conn.close()
            raise Aborted()
        return conn, False

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        conn.close()

    @staticmethod
    def _exchange(conn: http.client.HTTPConnection, method: str, path: str,
                  headers: dict[str, str], body: bytes | None, max_body: int) -> Reply:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        if resp.length is not None and resp.length > max_body:
            conn.close()
            raise BadAnswer(f"answer of {resp.length} bytes exceeds the limit of {max_body} bytes")
        data = resp.read(max_body + 1)
        if len(data) > max_body:
            conn.close()
            raise BadAnswer(f"answer exceeds the limit of {max_body} bytes")
        if not resp.isclosed():
            resp.read()
        if resp.will_close:
            conn.close()
        retry_after: float | None = None
        header = resp.getheader("Retry-After")
        if header:
            try:
                retry_after = max(0.0, float(header))
            except ValueError:
                retry_after = None
        return Reply(resp.status, data, retry_after)


class Backoff:
    """Capped exponential backoff with full jitter: a random delay in [0, min(max, min·2^n)].

    The randomness spreads thousands of agents over the whole window, so that a
    restarted server is not hit by all of them in the same second.
    """

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.failures = 0
        self._rng = random.SystemRandom()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0


class ServerList:
    """The nodes of one fleet, in the order given, and which of them the agent uses now.

    The agent starts at a random node, so that a fleet of agents (and a restart herd of them)
    is spread over the list, and keeps to it while it answers (sticky). A node that fails
    (unreachable, no answer in time, 5xx) hands over to the next one in the list, for polls
    and results alike. Thread-safe: the poller and the result threads share it.
    """

    def __init__(self, urls: list[str], ssl_context: ssl.SSLContext | None,
                 seed: int | None = None, pins: PinStore | None = None) -> None:
        self.endpoints = [Endpoint(url, ssl_context, pins) for url in urls]
        self._lock = threading.Lock()
        rng = random.Random(seed) if seed is not None else random.SystemRandom()
        self._current = rng.randrange(len(self.endpoints)) if len(self.endpoints) > 1 else 0

    def __len__(self) -> int:
        return len(self.endpoints)

    @property
    def several(self) -> bool:
        return len(self.endpoints) > 1

    def current(self) -> int:
        with self._lock:
            return self._current

    def url(self, index: int) -> str:
        return self.endpoints[index].url

    def failed(self, index: int) -> int:
        """Node `index` failed: moves on to the next one, unless another thread did already.
        Returns the node to use now."""
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self.endpoints)
            return self._current


def auth_header(name: str, secret: str, classic: bool) -> str:
    if classic:
        return f"{name}:{secret}"
    token = base64.b64encode(f"{name}:{secret}".encode()).decode("ascii")
    return "Basic " + token


# --------------------------------------------------------------------------- task helpers

class TaskError(Exception):
    """A failure the agent detected; the result becomes {"error": true, "msg": …}."""


class TaskContext:
    """What a task handler may use besides its task object."""

    def __init__(self, settings: Settings, cancel: threading.Event,
                 download_context: ssl.SSLContext) -> None:
        self.settings = settings
        self.cancel = cancel
        self.download_context = download_context


def field_str(task: JsonDict, name: str, required: bool = True, allow_empty: bool = False) -> str | None:
    value = task.get(name)
    if value is None:
        if required:
            raise TaskError(f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise TaskError(f"field {name!r} must be a string")
    if not value and not allow_empty:
        raise TaskError(f"field {name!r} must not be empty")
    if "\x00" in value:
        raise TaskError(f"field {name!r} must not contain NUL characters")
    return value


def req_str(task: JsonDict, name: str) -> str:
    value = field_str(task, name)
    assert value is not None
    return value


def field_number(task: JsonDict, name: str, minimum: float = 0.0) -> float | None:
    value = task.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TaskError(f"field {name!r} must be a number")
    if value < minimum:
        raise TaskError(f"field {name!r} must be at least {minimum:g}")
    return float(value)


def field_int(task: JsonDict, name: str, required: bool = False, minimum: int = 0) -> int | None:
    value = task.get(name)
    if value is None:
        if required:
            raise TaskError(f"missing field {name!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskError(f"field {name!r} must be an integer")
    if value < minimum:
        raise TaskError(f"field {name!r} must be at least {minimum}")
    return int(value)


def os_error_message(exc: OSError, path: str | None = None) -> str:
    target = exc.filename if exc.filename is not None else path
    where = f": {target}" if target is not None else ""
    if isinstance(exc, FileNotFoundError):
        return "no such file or directory" + where
    if isinstance(exc, PermissionError):
        return "permission denied" + where
    if isinstance(exc, IsADirectoryError):
        return "is a directory" + where
    if isinstance(exc, NotADirectoryError):
        return "not a directory" + where
    if isinstance(exc, FileExistsError):
        return "already exists" + where
    return f"{exc.strerror or exc}{where}"


def iso_utc(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_temp_beside(path: str) -> tuple[int, str]:
    """Creates a new file next to `path` (same file system, so os.replace is atomic).

    Mode 0o666 before the umask, like any new file, unlike tempfile.mkstemp's 0o600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = os.path.join(directory, f".{os.path.basename(path)}.dutagent-{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
    raise OSError(f"cannot create a temporary file in {directory}")


def require_dir(path: str) -> None:
    """A TaskError unless path is a directory (os.path.isdir would hide "permission denied")."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TaskError(f"no such directory: {path}") from None
    except OSError as e:
        raise TaskError(os_error_message(e, path)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise TaskError(f"not a directory: {path}")


def check_parent_dir(path: str) -> None:
    """For a file about to be written: its directory exists and it is no directory itself."""
    require_dir(os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path):
        raise TaskError(f"is a directory: {path}")


def replace_keeping_mode(temp: str, path: str, mode: int | None) -> None:
    """Moves temp over path; the file keeps its old mode and owner unless `mode` is given."""
    try:
        old = os.stat(path)
    except OSError:
        old = None
    if mode is not None:
        os.chmod(temp, mode)
    elif old is not None:
        os.chmod(temp, stat.S_IMODE(old.st_mode))
    if old is not None and not IS_WINDOWS and os.geteuid() == 0:
        try:
            os.chown(temp, old.st_uid, old.st_gid)
        except OSError:
            pass
    os.replace(temp, path)


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def run_quiet(argv: list[str], timeout_s: float = 30.0) -> str:
    """Runs a helper program (ps, sysctl, who…); its stdout, or an OSError/CalledProcessError."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, timeout=timeout_s, check=True,
                          creationflags=CREATE_NO_WINDOW if IS_WINDOWS else 0)
    return decode_output(proc.stdout)


def decode_output(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Windows console programs write in the OEM code page when their output is a pipe.
        return data.decode("oem" if IS_WINDOWS else "utf-8", "replace")


def run_powershell(script: str, timeout_s: float = 60.0) -> Any:
    prefix = "[Console]::OutputEncoding=[Text.Encoding]::UTF8;$ErrorActionPreference='SilentlyContinue';"
    out = run_quiet(["powershell", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass",
                     "-Command", prefix + script], timeout_s)
    return json.loads(out) if out.strip() else None


# --------------------------------------------------------------------------- execute_cmd

class _PipeReader(threading.Thread):
    """Reads one pipe to its end, keeping the first `limit` bytes and discarding the rest
    (the child must never block on a full pipe)."""

    def __init__(self, stream: Any, limit: int) -> None:
        super().__init__(daemon=True, name="pipe-reader")
        self._stream = stream
        self._limit = limit
        self._lock = threading.Lock()
        self._data = bytearray()
        self.truncated = False

    def run(self) -> None:
        fd = self._stream.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                with self._lock:
                    room = self._limit - len(self._data)
                    if room > 0:
                        self._data += chunk[:room]
                    if len(chunk) > room:
                        self.truncated = True
        except (OSError, ValueError):
            pass
        finally:
            try:
                self._stream.close()
            except OSError:
                pass

    def data(self) -> bytes:
        with self._lock:
            return bytes(self._data)


def kill_process_tree(proc: subprocess.Popen[bytes]) -> None:
    if IS_WINDOWS:
        try:
            run_quiet(["taskkill", "/T", "/F", "/PID", str(proc.pid)], timeout_s=30)
        except (OSError, subprocess.SubprocessError):
            pass
        try:
            proc.kill()
        except OSError:
            pass
        return
    try:
        # start_new_session made the shell the leader of its own process group.
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except OSError:
            pass


def task_execute_cmd(task: JsonDict, ctx: TaskContext) -> JsonDict:
    cmd = req_str(task, "cmd")
    timeout_s = field_number(task, "timeout_s", minimum=0.001)
    if timeout_s is None and ctx.settings.cmd_timeout_s > 0:
        timeout_s = ctx.settings.cmd_timeout_s
    cwd = field_str(task, "cwd", required=False)
    if cwd is not None:
        require_dir(cwd)
    env_field = task.get("env")
    env: dict[str, str] | None = None
    if env_field is not None:
        if not isinstance(env_field, dict) or not all(
                isinstance(k, str) and k and "=" not in k and "\x00" not in k
                and isinstance(v, str) and "\x00" not in v for k, v in env_field.items()):
            raise TaskError("field 'env' must be an object of variable names (no '=', no NUL) "
                            "to string values")
        env = dict(os.environ)
        env.update(env_field)
    started = time.monotonic()
    try:
        # Its own process group (POSIX session), so that a timeout can kill the whole tree.
        proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=not IS_WINDOWS,
                                creationflags=(CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW)
                                if IS_WINDOWS else 0)
    except OSError as e:
        raise TaskError("cannot start the command: " + os_error_message(e)) from None
    limit = ctx.settings.max_output_bytes
    readers = [_PipeReader(proc.stdout, limit), _PipeReader(proc.stderr, limit)]
    for reader in readers:
        reader.start()
    deadline = started + timeout_s if timeout_s else None
    stopped_because: str | None = None
    while True:
        wait_s = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            pass
        if deadline is not None and time.monotonic() >= deadline:
            stopped_because = "timeout"
        elif ctx.cancel.is_set():
            stopped_because = "cancelled"
        if stopped_because:
            kill_process_tree(proc)
            proc.wait()
            break
    for reader in readers:
        reader.join(PIPE_DRAIN_S)
    duration_s = time.monotonic() - started
    result: JsonDict = {
        "status_code": proc.returncode,
        "output": decode_output(readers[0].data()),
        "stderr": decode_output(readers[1].data()),
        "duration_s": round(duration_s, 3),
    }
    if readers[0].truncated or readers[1].truncated:
        result["truncated"] = True
    if stopped_because == "timeout":
        result["error"] = True
        result["msg"] = f"timed out after {timeout_s:g} s; the command and its child processes were killed"
    elif stopped_because == "cancelled":
        result["error"] = True
        result["msg"] = "the agent is stopping; the command and its child processes were killed"
    return result


# --------------------------------------------------------------------------- processes

def task_proclist(task: JsonDict, ctx: TaskContext) -> JsonDict:
    if IS_LINUX and os.path.isdir("/proc/self"):
        procs = linux_processes()
    elif IS_WINDOWS:
        procs = windows_processes()
    else:
        procs = ps_processes()
    procs.sort(key=lambda p: p["id"])
    return {"procs": procs}


def linux_processes() -> list[JsonDict]:
    users: dict[int, str] = {}
    procs = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        base = "/proc/" + entry
        try:
            with open(base + "/status", "rb") as f:
                status = f.read().decode("utf-8", "replace")
            with open(base + "/cmdline", "rb") as f:
                raw_cmdline = f.read()
        except OSError:
            continue  # the process ended while we looked
        name = ""
        uid = -1
        for line in status.splitlines():
            if line.startswith("Name:"):
                name = line[5:].strip()
            elif line.startswith("Uid:"):
                fields = line.split()
                uid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else -1
        args = [a for a in raw_cmdline.split(b"\x00")]
        while args and args[-1] == b"":
            args.pop()
        procs.append({
            "id": int(entry),
            "name": name,
            "user": user_name(uid, users),
            "cmdline": b" ".join(args).decode("utf-8", "replace"),
        })
    return procs


def user_name(uid: int, cache: dict[int, str]) -> str:
    if uid < 0:
        return ""
    if uid not in cache:
        try:
            import pwd
            cache[uid] = pwd.getpwuid(uid).pw_name
        except (KeyError, ImportError):
            cache[uid] = str(uid)
    return cache[uid]


def ps_processes() -> list[JsonDict]:
    # Two calls, each with its free-text column last, so spaces in it cannot shift columns.
    # One -o per column: BSD ps reads "pid=,user=" as the pid column with the header ",user=".
    args_out = run_quiet(["ps", "-axww", "-o", "pid=", "-o", "user=", "-o", "args="])
    comm_out = run_quiet(["ps", "-axww", "-o", "pid=", "-o", "comm="])
    return parse_ps_output(args_out, comm_out)


def parse_ps_output(args_out: str, comm_out: str) -> list[JsonDict]:
    names: dict[int, str] = {}
    for line in comm_out.splitlines():
        parts = line.strip().split(None, 1)
        if parts and parts[0].isdigit():
            names[int(parts[0])] = os.path.basename(parts[1].strip()) if len(parts) > 1 else ""
    procs = []
    for line in args_out.splitlines():
        parts = line.strip().split(None, 2)
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        procs.append({"id": pid, "name": names.get(pid, ""), "user": parts[1],
                      "cmdline": parts[2] if len(parts) > 2 else ""})
    return procs


WINDOWS_PROCLIST_PS = (
    "$owners=@{};"
    "try{foreach($p in (Get-Process -IncludeUserName -ErrorAction Stop)){$owners[[int]$p.Id]=[string]$p.UserName}}catch{};"
    "$list=@(Get-CimInstance Win32_Process|ForEach-Object{[pscustomobject]@{id=[int]$_.ProcessId;"
    "name=[string]$_.Name;user=[string]$owners[[int]$_.ProcessId];cmdline=[string]$_.CommandLine}});"
    "ConvertTo-Json -InputObject $list -Compress"
)


def windows_processes() -> list[JsonDict]:
    try:
        return parse_powershell_procs(run_powershell(WINDOWS_PROCLIST_PS))
    except (OSError, subprocess.SubprocessError, ValueError, TypeError):
        # No PowerShell (Server Core without it, or blocked by policy): names and pids only.
        return parse_tasklist_csv(run_quiet(["tasklist", "/fo", "csv", "/nh"]))


def parse_powershell_procs(data: Any) -> list[JsonDict]:
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise TypeError("unexpected PowerShell output")
    procs = []
    for item in data:
        if isinstance(item, dict) and isinstance(item.get("id"), int):
            procs.append({"id": item["id"], "name": str(item.get("name") or ""),
                          "user": str(item.get("user") or ""), "cmdline": str(item.get("cmdline") or "")})
    return procs


def parse_tasklist_csv(text: str) -> list[JsonDict]:
    import csv
    procs = []
    for row in csv.reader(text.splitlines()):
        if len(row) >= 2 and row[1].strip().isdigit():
            procs.append({"id": int(row[1]), "name": row[0], "user": "", "cmdline": ""})
    return procs


# Names accepted on Windows, where every signal ends the process the same way.
WINDOWS_SIGNAL_NAMES = {"TERM", "KILL", "INT", "HUP", "QUIT"}


def resolve_signal(value: Any) -> int:
    if value is None:
        return int(signal.SIGTERM)
    if isinstance(value, bool):
        raise TaskError("field 'signal' must be a signal number or name")
    if isinstance(value, int):
        if value <= 0:
            raise TaskError("field 'signal' must be a positive signal number")
        return value
    if isinstance(value, str):
        text = value.strip().upper()
        if text.isdigit():
            return resolve_signal(int(text))
        bare = text.removeprefix("SIG")
        number = getattr(signal, "SIG" + bare, None)
        if isinstance(number, int) and bare.isalnum():
            return int(number)
        if IS_WINDOWS and bare in WINDOWS_SIGNAL_NAMES:
            return int(signal.SIGTERM)
        raise TaskError(f"unknown signal: {value}")
    raise TaskError("field 'signal' must be a signal number or name")


def task_kill(task: JsonDict, ctx: TaskContext) -> JsonDict:
    # The pid is `pid`, never `id`: the server puts its own task id into `id`, and reading
    # that as a pid would signal whatever process happens to have that number.
    if task.get("pid") is None:
        raise TaskError("missing field 'pid' (the process id; 'id' is the task's own id)")
    pid = field_int(task, "pid", required=True, minimum=1)
    assert pid is not None
    signum = resolve_signal(task.get("signal"))
    if IS_WINDOWS:
        # os.kill sends console events for 0 and 1 (CTRL_C, CTRL_BREAK) and calls
        # TerminateProcess for anything else: always terminate.
        signum = int(signal.SIGTERM)
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise TaskError(f"no such process: {pid}") from None
    except PermissionError:
        raise TaskError(f"permission denied to signal process {pid}") from None
    except OSError as e:
        if IS_WINDOWS and getattr(e, "winerror", None) == 87:  # ERROR_INVALID_PARAMETER: no such pid
            raise TaskError(f"no such process: {pid}") from None
        raise TaskError(f"cannot signal process {pid}: {os_error_message(e)}") from None
    return {}


# --------------------------------------------------------------------------- files

def task_dircontents(task: JsonDict, ctx: TaskContext) -> JsonDict:
    directory = field_str(task, "dir", allow_empty=True)
    assert directory is not None
    if directory == "" and IS_WINDOWS:
        return {"contents": windows_drives()}
    if directory == "":
        directory = "/"
    require_dir(directory)
    base = os.path.abspath(directory)
    contents = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                contents.append(dir_entry(entry, base))
    except OSError as e:
        raise TaskError(os_error_message(e, directory)) from None
    contents.sort(key=lambda c: (not c["dir"], c["name"].lower(), c["name"]))
    return {"contents": contents}


def dir_entry(entry: os.DirEntry[str], base: str) -> JsonDict:
    try:
        st: os.stat_result | None = entry.stat()
    except OSError:
        try:
            st = entry.stat(follow_symlinks=False)  # a dangling symbolic link
        except OSError:
            st = None
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    return {
        "name": entry.name,
        "dir": is_dir,
        "fullpath": os.path.join(base, entry.name),
        "size": st.st_size if st is not None and not is_dir else 0,
        "mtime": iso_utc(st.st_mtime) if st is not None else None,
    }


def windows_drives() -> list[JsonDict]:
    import ctypes
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    mask = kernel32.GetLogicalDrives()
    drives = []
    for i in range(26):
        if mask & (1 << i):
            root = chr(65 + i) + ":\\"
            drives.append({"name": root, "dir": True, "fullpath": root, "size": 0, "mtime": None})
    return drives


def default_read_limit(settings: Settings) -> int:
    """The most file bytes whose base64 still fits in one result body."""
    return max(0, (settings.max_result_bytes - 4096) * 3 // 4)


def task_readfile(task: JsonDict, ctx: TaskContext) -> JsonDict:
    path = req_str(task, "path")
    max_bytes = field_int(task, "max_bytes")
    if max_bytes is None:
        max_bytes = default_read_limit(ctx.settings)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise TaskError(f"is a directory: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise TaskError(f"not a regular file: {path}")
        digest = hashlib.sha256()
        kept = bytearray()
        size = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(MIB)
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
                if len(kept) < max_bytes:
                    kept += chunk[:max_bytes - len(kept)]
                if ctx.cancel.is_set():
                    raise TaskError("the agent is stopping")
    except OSError as e:
        raise TaskError(os_error_message(e, path)) from None
    result: JsonDict = {"content_b64": base64.b64encode(bytes(kept)).decode("ascii"),
                        "size": size, "sha256": digest.hexdigest()}
    if len(kept) < size:
        result["truncated"] = True
    return result


def parse_mode(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TaskError("field 'mode' must be an integer or an octal string")
    if isinstance(value, str):
        text = value.strip().lower()
        text = text.removeprefix("0o")
        if not text or not all(c in "01234567" for c in text):
            raise TaskError(f"field 'mode' is not an octal number: {value!r}")
        value = int(text, 8)
    if not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise TaskError("field 'mode' must be between 0 and 0o7777")
    return value


def task_writefile(task: JsonDict, ctx: TaskContext) -> JsonDict:
    path = req_str(task, "path")
    content_b64 = field_str(task, "content_b64", allow_empty=True)
    if content_b64 is None:
        raise TaskError("missing field 'content_b64'")
    try:
        content = base64.b64decode(content_b64, validate=True)
    except (binascii.Error, ValueError):
        raise TaskError("field 'content_b64' is not valid base64") from None
    mode = parse_mode(task.get("mode"))
    check_parent_dir(path)
    temp = ""
    try:
        fd, temp = open_temp_beside(path)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        replace_keeping_mode(temp, path, mode)
    except OSError as e:
        if temp:
            remove_quietly(temp)
        raise TaskError(os_error_message(e, path)) from None
    return {"size": len(content), "sha256": sha256_hex(content)}


def task_deletefile(task: JsonDict, ctx: TaskContext) -> JsonDict:
    path = req_str(task, "path")
    if os.path.isdir(path) and not os.path.islink(path):
        raise TaskError(f"is a directory (deletefile removes files only): {path}")
    try:
        os.remove(path)
    except OSError as e:
        raise TaskError(os_error_message(e, path)) from None
    return {}


def task_movefile(task: JsonDict, ctx: TaskContext) -> JsonDict:
    frompath = req_str(task, "frompath")
    topath = req_str(task, "topath")
    try:
        os.lstat(frompath)
    except OSError as e:
        raise TaskError(os_error_message(e, frompath)) from None
    require_dir(os.path.dirname(os.path.abspath(topath)))
    try:
        # Like mv: into topath when it is a directory, across file systems when needed.
        shutil.move(frompath, topath)
    except shutil.Error as e:
        raise TaskError(str(e)) from None
    except OSError as e:
        raise TaskError(os_error_message(e)) from None
    return {}


def task_downloadfile(task: JsonDict, ctx: TaskContext) -> JsonDict:
    url = req_str(task, "url")
    out = req_str(task, "out")
    expected = field_str(task, "sha256", required=False)
    if expected is not None:
        expected = expected.strip().lower()
        if not re.match(r"^[0-9a-f]{64}$", expected):
            raise TaskError("field 'sha256' must be 64 hexadecimal digits")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise TaskError("field 'url' must be an http:// or https:// URL")
    check_parent_dir(out)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx.download_context))
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    temp = ""
    try:
        fd, temp = open_temp_beside(out)
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as f, opener.open(request, timeout=60) as response:
            while True:
                if ctx.cancel.is_set():
                    raise TaskError("the agent is stopping; download abandoned")
                chunk = response.read(256 * 1024)
                if not chunk:
                    break
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise TaskError(f"sha256 mismatch: expected {expected}, got {actual}; the file was not kept")
        replace_keeping_mode(temp, out, None)
        temp = ""
    except urllib.error.HTTPError as e:
        raise TaskError(f"download failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise TaskError(f"download failed: {e.reason}") from None
    except (http.client.HTTPException, socket.timeout) as e:
        raise TaskError(f"download failed: {describe_error(e)}") from None
    except OSError as e:
        raise TaskError(os_error_message(e, out)) from None
    finally:
        if temp:
            remove_quietly(temp)
    return {"size": size, "sha256": actual}


# --------------------------------------------------------------------------- inventory

def task_inventory(task: JsonDict, ctx: TaskContext) -> JsonDict:
    probes: list[tuple[str, Callable[[], Any], Any]] = [
        ("hostname", socket.gethostname, ""),
        ("os", os_family, platform.system()),
        ("os_version", os_version, ""),
        ("kernel", kernel_version, platform.release()),
        ("arch", platform.machine, ""),
        ("cpu", cpu_model, ""),
        ("cpu_count", lambda: os.cpu_count() or 0, 0),
        ("ram_bytes", ram_bytes, 0),
        ("disks", disks, []),
        ("networks", networks, []),
        ("uptime_s", uptime_s, 0.0),
        ("users", logged_in_users, []),
        ("python_version", platform.python_version, ""),
        ("agent_version", lambda: __version__, __version__),
    ]
    result: JsonDict = {}
    for key, probe, fallback in probes:
        try:
            result[key] = probe()
        except Exception as e:  # noqa: BLE001 -- one missing fact must not cost the others
            log.debug("inventory: %s unavailable: %s", key, describe_error(e))
            result[key] = fallback
    return result


def os_family() -> str:
    return {"Darwin": "macOS"}.get(platform.system(), platform.system())


def os_version() -> str:
    if IS_LINUX:
        for path in ("/etc/os-release", "/usr/lib/os-release"):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if line.startswith("PRETTY_NAME="):
                            return line.split("=", 1)[1].strip().strip('"').strip("'")
            except OSError:
                continue
        return "Linux"
    if IS_MACOS:
        return "macOS " + platform.mac_ver()[0]
    if IS_WINDOWS:
        release, version, _, _ = platform.win32_ver()
        build = version.split(".")[2] if version.count(".") >= 2 else ""
        if release == "10" and build.isdigit() and int(build) >= 22000:
            release = "11"  # Windows 11 still calls itself 10 in the version API
        edition = platform.win32_edition() if hasattr(platform, "win32_edition") else ""
        return " ".join(p for p in ("Windows", release, edition or "", f"({version})") if p)
    return f"{platform.system()} {platform.release()}"


def kernel_version() -> str:
    return platform.version() if IS_WINDOWS else platform.release()


def cpu_model() -> str:
    if IS_LINUX:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model", "cpu model") and value.strip():
                    return value.strip()
    elif IS_MACOS:
        return run_quiet(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
    elif IS_WINDOWS:
        import winreg
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE,  # type: ignore[attr-defined,unused-ignore]
                            r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as registry_key:
            name = winreg.QueryValueEx(registry_key, "ProcessorNameString")[0]  # type: ignore[attr-defined,unused-ignore]
            return str(name).strip()
    return platform.processor()


def ram_bytes() -> int:
    if IS_LINUX:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no MemTotal in /proc/meminfo")
    if IS_MACOS:
        return int(run_quiet(["sysctl", "-n", "hw.memsize"]).strip())
    if IS_WINDOWS:
        import ctypes

        class MemoryStatusEx(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        status = MemoryStatusEx()
        status.dwLength = ctypes.sizeof(status)
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            raise OSError("GlobalMemoryStatusEx failed")
        return int(status.ullTotalPhys)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def uptime_s() -> float:
    if IS_LINUX:
        with open("/proc/uptime") as f:
            return round(float(f.read().split()[0]), 1)
    if IS_WINDOWS:
        import ctypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        kernel32.GetTickCount64.restype = ctypes.c_ulonglong
        return round(float(kernel32.GetTickCount64()) / 1000.0, 1)
    # BSD and macOS: "{ sec = 1700000000, usec = 0 } Tue Nov 14 …"
    boot = run_quiet(["sysctl", "-n", "kern.boottime"])
    match = re.search(r"sec\s*=\s*(\d+)", boot)
    if not match:
        raise OSError("cannot parse kern.boottime")
    return round(time.time() - int(match.group(1)), 1)


# File systems that are no disks (or that statvfs could hang on, for the network ones).
PSEUDO_FILESYSTEMS = {"proc", "sysfs", "devtmpfs", "devpts", "tmpfs", "cgroup", "cgroup2", "securityfs",
                      "pstore", "debugfs", "tracefs", "configfs", "fusectl", "mqueue", "hugetlbfs",
                      "bpf", "autofs", "binfmt_misc", "squashfs", "nsfs", "ramfs", "rpc_pipefs",
                      "nfs", "nfs4", "cifs", "smb3", "sshfs", "fuse.sshfs", "efivarfs", "selinuxfs"}


def disks() -> list[JsonDict]:
    mounts: list[str] = []
    if IS_LINUX:
        seen_devices = set()
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                device, mount, fstype = (unescape_mount(x) for x in fields[:3])
                if fstype in PSEUDO_FILESYSTEMS or device.startswith("/dev/loop"):
                    continue
                if not device.startswith("/dev/") and mount != "/":
                    continue
                if device in seen_devices:
                    continue  # bind mounts of the same device
                seen_devices.add(device)
                mounts.append(mount)
    elif IS_WINDOWS:
        import ctypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        mask = kernel32.GetLogicalDrives()
        for i in range(26):
            root = chr(65 + i) + ":\\"
            if mask & (1 << i) and kernel32.GetDriveTypeW(root) in (2, 3):  # removable, fixed
                mounts.append(root)
    else:
        for line in run_quiet(["mount"]).splitlines():
            match = re.match(r"^(.+?) on (.+) \((.+)\)$", line)
            if match and "local" in match.group(3) and "nobrowse" not in match.group(3):
                mounts.append(match.group(2))
    result = []
    for mount in mounts:
        try:
            usage = shutil.disk_usage(mount)
        except OSError:
            continue
        result.append({"mount": mount, "size": usage.total, "free": usage.free})
    return result


def unescape_mount(text: str) -> str:
    """/proc/mounts writes spaces and tabs in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def networks() -> list[JsonDict]:
    if IS_WINDOWS:
        return windows_networks()
    return posix_networks()


def posix_networks() -> list[JsonDict]:
    """Interfaces from getifaddrs(3), through ctypes: the standard library has no binding."""
    import ctypes
    import ctypes.util

    class IfAddrs(ctypes.Structure):
        pass

    IfAddrs._fields_ = [("ifa_next", ctypes.POINTER(IfAddrs)), ("ifa_name", ctypes.c_char_p),
                        ("ifa_flags", ctypes.c_uint), ("ifa_addr", ctypes.c_void_p),
                        ("ifa_netmask", ctypes.c_void_p), ("ifa_dstaddr", ctypes.c_void_p),
                        ("ifa_data", ctypes.c_void_p)]
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(IfAddrs))]
    libc.freeifaddrs.argtypes = [ctypes.POINTER(IfAddrs)]
    head = ctypes.POINTER(IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    found: dict[str, JsonDict] = {}
    try:
        node = head
        while node:
            entry = node.contents
            name = (entry.ifa_name or b"").decode("utf-8", "replace")
            item = found.setdefault(name, {"name": name, "addresses": [], "mac": ""})
            if entry.ifa_addr:
                parse_sockaddr(entry.ifa_addr, item)
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return list(found.values())


def parse_sockaddr(address: int, item: JsonDict) -> None:
    import ctypes
    # BSD's struct sockaddr starts with a length byte; Linux's family is 16 bits wide.
    bsd = not IS_LINUX
    header = ctypes.string_at(address, 2)
    family = header[1] if bsd else int.from_bytes(header, sys.byteorder)
    if family == socket.AF_INET:
        raw = ctypes.string_at(address, 8)
        item["addresses"].append(socket.inet_ntop(socket.AF_INET, raw[4:8]))
    elif family == socket.AF_INET6:
        raw = ctypes.string_at(address, 24)
        item["addresses"].append(socket.inet_ntop(socket.AF_INET6, raw[8:24]))
    elif IS_LINUX and family == 17:  # AF_PACKET: struct sockaddr_ll
        raw = ctypes.string_at(address, 20)
        length = raw[11]
        mac = raw[12:12 + min(length, 8)]
        if any(mac):
            item["mac"] = ":".join(f"{b:02x}" for b in mac)
    elif bsd and family == 18:  # AF_LINK: struct sockaddr_dl
        size = header[0]
        raw = ctypes.string_at(address, max(size, 8))
        name_len, addr_len = raw[5], raw[6]
        mac = raw[8 + name_len:8 + name_len + addr_len]
        if len(mac) == 6 and any(mac):
            item["mac"] = ":".join(f"{b:02x}" for b in mac)


WINDOWS_NETWORKS_PS = (
    "$ips=@(Get-NetIPAddress);"
    "$list=@(Get-NetAdapter|ForEach-Object{$a=$_;[pscustomobject]@{name=[string]$a.Name;"
    "mac=[string]$a.MacAddress;addresses=@($ips|Where-Object{$_.InterfaceIndex -eq $a.ifIndex}|"
    "ForEach-Object{[string]$_.IPAddress})}});"
    "ConvertTo-Json -InputObject $list -Compress -Depth 3"
)


def windows_networks() -> list[JsonDict]:
    data = run_powershell(WINDOWS_NETWORKS_PS)
    if isinstance(data, dict):
        data = [data]
    result = []
    for item in data or []:
        if not isinstance(item, dict):
            continue
        addresses = item.get("addresses") or []
        if isinstance(addresses, str):
            addresses = [addresses]
        result.append({"name": str(item.get("name") or ""),
                       "addresses": [str(a).split("%")[0] for a in addresses],
                       "mac": str(item.get("mac") or "").replace("-", ":").lower()})
    return result


def logged_in_users() -> list[str]:
    if IS_WINDOWS:
        try:
            return parse_query_user(run_quiet(["query", "user"]))
        except (OSError, subprocess.SubprocessError):
            name = run_powershell("ConvertTo-Json -InputObject ([string](Get-CimInstance Win32_ComputerSystem).UserName)")
            return [name] if name else []
    users = set()
    for line in run_quiet(["who"]).splitlines():
        fields = line.split()
        if fields:
            users.add(fields[0])
    return sorted(users)


def parse_query_user(text: str) -> list[str]:
    users = set()
    for line in text.splitlines()[1:]:
        fields = line.strip().lstrip(">").split()
        if fields:
            users.add(fields[0])
    return sorted(users)


def task_ping(task: JsonDict, ctx: TaskContext) -> JsonDict:
    return {"pong": True, "agent_version": __version__}


HANDLERS: dict[str, Callable[[JsonDict, TaskContext], JsonDict]] = {
    "execute_cmd": task_execute_cmd,
    "proclist": task_proclist,
    "kill": task_kill,
    "dircontents": task_dircontents,
    "readfile": task_readfile,
    "writefile": task_writefile,
    "deletefile": task_deletefile,
    "movefile": task_movefile,
    "downloadfile": task_downloadfile,
    "inventory": task_inventory,
    "ping": task_ping,
}


def run_handler(task: JsonDict, ctx: TaskContext) -> JsonDict:
    """Runs one task; every failure becomes an error result, nothing escapes."""
    task_type = task.get("type")
    if not isinstance(task_type, str) or not task_type:
        return {"error": True, "msg": "task type missing"}
    handler = HANDLERS.get(task_type)
    if handler is None:
        return {"error": True, "msg": f"unknown task type: {excerpt(task_type.encode(), 80)}"}
    try:
        return handler(task, ctx)
    except TaskError as e:
        return {"error": True, "msg": str(e)}
    except Exception as e:
        log.exception("task %s of type %s failed unexpectedly", task.get("id"), task_type)
        return {"error": True, "msg": f"agent error: {e.__class__.__name__}: {e}"}


# --------------------------------------------------------------------------- local policy

# Task types so powerful that a PC runs them only when its administrator's policy file says
# {"allow": [...]} (none is implemented yet; an interactive `shell` would be).
OPT_IN_TYPES = ("shell",)
POLICY_KEYS = ("deny", "allow")


class Policy:
    """What the PC's administrator allows, whatever the server asks: a type in "deny" is
    refused, a type of OPT_IN_TYPES runs only when in "allow"; "deny" wins over "allow"."""

    def __init__(self, deny: Iterable[str] = (), allow: Iterable[str] = (),
                 path: str | None = None) -> None:
        self.deny = frozenset(deny)
        self.allow = frozenset(allow)
        self.path = path

    def permits(self, task_type: str) -> bool:
        if task_type in self.deny:
            return False
        return task_type not in OPT_IN_TYPES or task_type in self.allow


def default_policy_path() -> str:
    """Beside the system config, where only the administrator may write."""
    if IS_WINDOWS:
        base = os.environ.get("PROGRAMDATA") or r"C:\ProgramData"
        return os.path.join(base, "dutagent", "policy.json")
    return "/etc/dutagent/policy.json"


def parse_policy(data: Any, origin: str) -> Policy:
    """A policy from its JSON; UsageError for anything unexpected, since a typo ("denny") read
    as "no policy" would quietly allow what the administrator meant to forbid."""
    if not isinstance(data, dict):
        raise UsageError(f"{origin}: not a JSON object like {{\"deny\": [\"execute_cmd\"]}}")
    unknown = sorted(set(data) - set(POLICY_KEYS))
    if unknown:
        raise UsageError(f"{origin}: unknown key {unknown[0]!r} (only \"deny\" and \"allow\")")
    lists: dict[str, list[str]] = {}
    for key in POLICY_KEYS:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise UsageError(f"{origin}: {key!r} must be a list of task type names")
        lists[key] = value
    return Policy(lists["deny"], lists["allow"], origin)


def load_policy(path: str | None) -> Policy:
    """The policy file's rules. No file at the default place: everything allowed. A file named
    explicitly (--policy) must exist, and one that cannot be read or parsed stops the agent."""
    explicit = path is not None
    path = os.path.abspath(path) if path else default_policy_path()
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"policy file not found: {path}") from None
        return Policy()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the policy file {path}: {describe_error(e)}; the agent "
                         f"does not start without the rules it may have to obey") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UsageError(f"policy file {path} is not valid JSON ({e}); the agent does not start "
                         f"without the rules it may have to obey") from None
    policy = parse_policy(data, f"policy file {path}")
    if not IS_WINDOWS:
        mode = os.stat(path).st_mode
        if mode & 0o022:
            log.warning("policy file %s may be changed by other users (mode %o): run chmod 644 %s",
                        path, stat.S_IMODE(mode), path)
    return policy


def capabilities(policy: Policy, can_rekey: bool) -> list[str]:
    """The task types this agent runs: its table, "rekey" when it can rewrite its secret, minus
    what the local policy refuses. The server queues no other type for it."""
    types = list(HANDLERS) + (["rekey"] if can_rekey else [])
    return sorted(t for t in types if policy.permits(t))


# --------------------------------------------------------------------------- facts

def read_first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


def machine_id() -> str:
    """The OS's own stable id of this installation: what tells two PCs of one name apart."""
    try:
        if IS_WINDOWS:
            out = run_quiet(["reg", "query", r"HKLM\SOFTWARE\Microsoft\Cryptography",
                             "/v", "MachineGuid"], 10.0)
            return parse_reg_query(out, "MachineGuid")
        if IS_MACOS:
            return parse_ioreg_uuid(run_quiet(["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"], 10.0))
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("machine id unavailable: %s", describe_error(e))
        return ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        value = read_first_line(path)
        if value:
            return value
    return ""


def parse_reg_query(text: str, name: str) -> str:
    """The value of `name` in `reg query` output: "    MachineGuid    REG_SZ    1234-…"."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == name and fields[1].startswith("REG_"):
            return fields[-1]
    return ""


def parse_ioreg_uuid(text: str) -> str:
    match = re.search(r'"IOPlatformUUID"\s*=\s*"([^"]+)"', text)
    return match.group(1) if match else ""


MAX_MACS = 64  # the server takes at most 64 values of one fact


def mac_addresses() -> list[str]:
    """The hardware addresses of the network interfaces, lower case, without loopback."""
    macs: list[str] = []
    if IS_LINUX:
        try:
            names = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
        except OSError:
            names = []
        # Interfaces backed by a device, when there are any: the addresses of bridges, veths and
        # tunnels (a container host has hundreds) are made up and change, so they tell nothing.
        physical = [n for n in names if os.path.exists(f"/sys/class/net/{n}/device")]
        for name in physical or names:
            macs.append(read_first_line(f"/sys/class/net/{name}/address").lower())
    else:
        try:
            macs = [str(n.get("mac") or "").lower() for n in networks()]
        except Exception as e:  # noqa: BLE001 -- the fallback below still gives one
            log.debug("interfaces unavailable: %s", describe_error(e))
    found = sorted({m for m in macs if re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", m)
                    and m != "00:00:00:00:00:00"})[:MAX_MACS]
    if not found:
        node = uuid.getnode()
        if not node & (1 << 40):  # the multicast bit: uuid made the number up
            found = [":".join(f"{(node >> shift) & 0xFF:02x}" for shift in range(40, -8, -8))]
    return found


def build_facts() -> JsonDict:
    """What the server shows an administrator who decides on an enrollment, and what
    selectors match (`os=windows,arch=x86_64`): told with the enrollment and with every
    hello, so it stays current. `os` and `os_version` as the inventory names them."""
    return {
        "hostname": socket.gethostname(),
        "machine_id": machine_id(),
        "os": os_family(),
        "os_version": os_version(),
        "arch": platform.machine(),
        "macs": mac_addresses(),
        "agent_version": __version__,
    }


# --------------------------------------------------------------------------- results

TRUNCATABLE_FIELDS = ("output", "stderr", "contents", "procs")


def encode_json(value: JsonDict) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        # File names that are not valid UTF-8 arrive as lone surrogates; \u escapes carry
        # them through the server and back, so a later task can still name that file.
        return json.dumps(value, allow_nan=False).encode("ascii")


def encode_result(result: JsonDict, limit: int) -> bytes:
    """The result as JSON within `limit` bytes: long outputs and lists are cut (and say so)."""
    try:
        body = encode_json(result)
    except (TypeError, ValueError) as e:
        return encode_json({"error": True, "msg": f"agent error: result not serialisable: {e}"})
    result = dict(result)
    for _ in range(8):
        if len(body) <= limit:
            return body
        excess = len(body) - limit
        longest = max((f for f in TRUNCATABLE_FIELDS if isinstance(result.get(f), (str, list))),
                      key=lambda f: len(encode_json({"x": result[f]})), default=None)
        if longest is None or not result[longest]:
            break
        value = result[longest]
        encoded_len = len(encode_json({"x": value}))
        # Keep the share of the field that fits, with room for escapes and the new flag.
        keep = max(0, int(len(value) * max(0, encoded_len - excess - 256) / encoded_len))
        result[longest] = value[:keep]
        result["truncated"] = True
        body = encode_json(result)
    if len(body) <= limit:
        return body
    return encode_json({"error": True, "msg": f"result too large: {len(body)} bytes, "
                                              f"the limit is {limit} bytes"})


def summarize(task_type: str, result: JsonDict) -> str:
    if result.get("error"):
        return "error: " + excerpt(str(result.get("msg", "")).encode(), 200)
    if task_type == "execute_cmd":
        extra = ", output truncated" if result.get("truncated") else ""
        return f"ok (exit status {result.get('status_code')}{extra})"
    return "ok"


# --------------------------------------------------------------------------- the agent

class TaskRun:
    """One task the agent took from the server, from delivery until its result is posted."""

    def __init__(self, task_id: int, task: JsonDict) -> None:
        self.id = task_id
        self.task = task
        self.type = task.get("type") if isinstance(task.get("type"), str) else "?"
        self.started = False
        self.cancel = threading.Event()


def parse_task_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    return None


class Agent:
    """Polls the server, runs tasks in threads, posts their results, stops cleanly."""

    def __init__(self, settings: Settings, policy: Policy | None = None,
                 config: ConfigFile | None = None) -> None:
        self.settings = settings
        self.policy = policy or Policy()
        self.config = config  # None: no config file (settings from flags or the environment)
        pins = PinStore(settings.pins, config) if uses_pinning(settings) else None
        context = make_ssl_context(settings.ca_file, settings.insecure, pins is not None)
        self.servers = ServerList(split_servers(settings.server), context, settings.server_seed,
                                  pins)
        self.can_rekey = (not settings.classic and config is not None
                          and settings.origins.get("secret") == "file" and can_rewrite(config.path))
        self.capabilities = capabilities(self.policy, self.can_rekey)
        self.facts = build_facts()
        self._rekey_lock = threading.Lock()
        self.download_context = ssl.create_default_context()
        if settings.ca_file:
            self.download_context.load_verify_locations(settings.ca_file)
        self.headers = {
            "Authorization": auth_header(settings.name, settings.secret, settings.classic),
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        self.result_path = "/task_result" if settings.classic else "/tasks_result"
        # One poll channel per server, made up front, so that a stop aborts whichever is in use.
        self._poll_channels = [HttpChannel(endpoint, settings.poll_timeout_s)
                               for endpoint in self.servers.endpoints]
        self._idle_channels: dict[int, list[HttpChannel]] = {}
        self._all_channels: list[HttpChannel] = []
        self._signals = 0
        self._stopping = threading.Event()
        self._give_up_posting = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._runs: dict[int, TaskRun] = {}
        self._slots = threading.Semaphore(settings.max_tasks)

    # ---- lifecycle

    def run(self) -> int:
        s = self.settings
        if s.insecure:
            log.warning("*** --insecure: the server's TLS certificate is NOT verified. Anyone on the "
                        "network path can pose as the server and run commands on this machine. ***")
        self._install_signal_handlers()
        servers = self.servers
        where = servers.url(servers.current())
        if servers.several:
            where += f" (first of {len(servers)} servers: " + \
                ", ".join(e.url for e in servers.endpoints) + ")"
        log.info("dutagent %s (Python %s) polling %s as %s%s, up to %d tasks at once",
                 __version__, platform.python_version(), where, s.name,
                 " (classic protocol)" if s.classic else "", s.max_tasks)
        refused = sorted(self.policy.deny)
        if refused:
            log.info("local policy %s: refusing %s", self.policy.path, ", ".join(refused))
        poller = threading.Thread(target=self._poll_loop, name="poller", daemon=True)
        poller.start()
        while not self._signals:
            time.sleep(0.05)
        return self._shutdown(poller)

    def request_stop(self) -> None:
        self._signals += 1

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        wanted = [signal.SIGTERM, signal.SIGINT]
        if IS_WINDOWS and hasattr(signal, "SIGBREAK"):
            wanted.append(signal.SIGBREAK)
        for signum in wanted:
            # The handler only counts: the main loop does the work outside signal context.
            signal.signal(signum, lambda signum, frame: self.request_stop())

    def _shutdown(self, poller: threading.Thread) -> int:
        started = time.monotonic()
        log.info("stopping: no new tasks; running tasks get %.3g s to finish", self.settings.grace_s)
        self._stopping.set()
        for channel in self._poll_channels:
            channel.abort()
        with self._changed:
            self._changed.notify_all()
        poller.join(1.0)
        deadline = started + self.settings.grace_s
        while self._unfinished() and time.monotonic() < deadline:
            if self._signals > 1:
                log.warning("second stop signal: not waiting for the grace period")
                break
            with self._changed:
                self._changed.wait(0.05)
        leftover = self._unfinished()
        if leftover:
            running = [r for r in leftover if r.started]
            if running:
                log.warning("grace period over: stopping tasks %s", ", ".join(str(r.id) for r in running))
            for run in leftover:
                run.cancel.set()
            final = time.monotonic() + KILL_POST_WINDOW_S
            while self._unfinished() and time.monotonic() < final:
                with self._changed:
                    self._changed.wait(0.05)
        self._give_up_posting.set()
        for channel in list(self._all_channels):
            channel.abort()
        for run in self._unfinished():
            log.error("task %d %s: no result reached the server before the agent stopped", run.id, run.type)
        log.info("dutagent stopped")
        return 0

    def _unfinished(self) -> list[TaskRun]:
        with self._lock:
            return list(self._runs.values())

    # ---- polling

    def _poll_loop(self) -> None:
        s = self.settings
        servers = self.servers
        backoff = Backoff(s.backoff_min_s, s.backoff_max_s)
        troubled = False
        failed_in_row = 0  # servers that failed one after the other since the last answer
        greeted: int | None = None  # the server told our capabilities since polling it went well
        while not self._stopping.is_set():
            self._wait_for_room()
            if self._stopping.is_set():
                break
            delay: float | None = None
            index = servers.current()
            endpoint = servers.endpoints[index]
            try:
                started = time.monotonic()
                # A hello answered 5xx counts as that server failing, as a poll answered so would.
                reply = self._say_hello(index) if greeted != index and not s.classic else None
                if reply is None or reply.status < 500:
                    greeted = index
                    reply = self._poll_channels[index].request(
                        "GET", endpoint.path("/tasks"), self.headers, max_body=s.max_task_bytes)
                if reply.status >= 500 or reply.status == 403:
                    greeted = None  # it restarts polling this server after the trouble: hello again
                if servers.several and reply.status >= 500:
                    failed_in_row += 1
                    delay = self._poll_failed_at(index, f"HTTP {reply.status} {reply.message()}",
                                                 failed_in_row, backoff, logging.WARNING,
                                                 reply.retry_after_s)
                    troubled = True
                else:
                    delay = self._handle_poll_reply(reply, backoff, time.monotonic() - started)
                    failed_in_row = 0
                    if delay is None and troubled:
                        log.info("the server answers again" + (f" ({endpoint.url})"
                                                               if servers.several else ""))
                    troubled = delay is not None and reply.status != 200
            except Aborted:
                break
            except (OSError, http.client.HTTPException, BadAnswer) as e:
                if self._stopping.is_set():
                    break
                greeted = None
                level = logging.ERROR if isinstance(e, (BadAnswer, ssl.SSLError)) else logging.WARNING
                if servers.several:
                    failed_in_row += 1
                    delay = self._poll_failed_at(index, describe_error(e), failed_in_row, backoff,
                                                 level, None)
                else:
                    delay = backoff.next_delay()
                    log.log(level, "poll failed: %s; retrying in %.1f s", describe_error(e), delay)
                troubled = True
            except Exception:
                delay = backoff.next_delay()
                log.exception("unexpected error while polling; retrying in %.1f s", delay)
                troubled = True
            if delay is not None and self._stopping.wait(delay):
                break

    def _say_hello(self, index: int) -> Reply:
        """Tells the server which task types this agent runs (and the machine's facts), each
        time it starts polling a server. A server older than that (404) is not told."""
        endpoint = self.servers.endpoints[index]
        body = encode_json({"capabilities": self.capabilities, "facts": self.facts})
        headers = dict(self.headers, **{"Content-Type": "application/json"})
        reply = self._poll_channels[index].request("POST", endpoint.path("/api/v1/agent/hello"),
                                                   headers, body)
        if 200 <= reply.status < 300:
            log.debug("told %s the task types %s", endpoint.url, ", ".join(self.capabilities))
        elif reply.status in (404, 405):
            log.debug("%s does not take hello (HTTP %d): an older server", endpoint.url, reply.status)
        elif reply.status != 403:  # a refused credential: the poll says so
            log.warning("hello answered HTTP %d (%s)", reply.status, reply.message())
        return reply

    def _poll_failed_at(self, index: int, problem: str, failed_in_row: int, backoff: Backoff,
                        level: int, retry_after_s: float | None) -> float:
        """A poll of one of several servers failed: moves on to the next one, at once while some
        server of the list has not failed yet, else after a backoff. Returns the delay."""
        servers = self.servers
        new = servers.failed(index)
        if new != index:
            self._poll_channels[index].close()  # no idle connection kept to a failing server
        if failed_in_row % len(servers):
            log.log(level, "poll failed at %s: %s; moving to %s", servers.url(index), problem,
                    servers.url(new))
            return 0.0
        delay = backoff.next_delay()
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.settings.backoff_max_s))
        log.log(level, "poll failed at %s: %s; all %d servers failed, retrying at %s in %.1f s",
                servers.url(index), problem, len(servers), servers.url(new), delay)
        return delay

    def _handle_poll_reply(self, reply: Reply, backoff: Backoff, took_s: float) -> float | None:
        """Acts on one poll answer; returns how long to wait before the next poll, None for at once."""
        s = self.settings
        if reply.status == 200:
            try:
                data = json.loads(reply.body)
            except (ValueError, RecursionError) as e:
                raise BadAnswer(f"poll answer is not JSON ({e}): {excerpt(reply.body)}") from None
            if not isinstance(data, dict):
                raise BadAnswer(f"poll answer is not a JSON object: {excerpt(reply.body)}")
            if not data:
                if took_s < FAST_EMPTY_POLL_S:
                    delay = backoff.next_delay()
                    log.debug("empty poll answer after %.3f s; the server is not long-polling", took_s)
                    return delay
                backoff.reset()
                return None
            backoff.reset()
            self._accept(data)
            return None
        message = reply.message()
        if reply.status == 403:
            delay = random.uniform(0.5, 1.0) * s.forbidden_backoff_s
            log.error("the server refused the agent's credentials (403 %s): check name and secret "
                      "of agent %r; retrying in %.0f s", message, s.name, delay)
            return delay
        delay = backoff.next_delay()
        if reply.status == 429 and reply.retry_after_s is not None:
            delay = max(delay, min(reply.retry_after_s, max(s.backoff_max_s, s.forbidden_backoff_s)))
        level = logging.WARNING if reply.status >= 500 or reply.status == 429 else logging.ERROR
        log.log(level, "poll answered HTTP %d (%s); retrying in %.1f s", reply.status, message, delay)
        return delay

    def _wait_for_room(self) -> None:
        """Pauses polling while max_tasks tasks already wait for a free slot."""
        with self._changed:
            while not self._stopping.is_set() and sum(
                    1 for r in self._runs.values() if not r.started) >= self.settings.max_tasks:
                self._changed.wait(0.1)

    def _accept(self, task: JsonDict) -> None:
        task_id = parse_task_id(task.get("id"))
        if task_id is None:
            # Only id and type: the rest may hold command text, which is not for the log.
            log.error("the server sent a task without a valid id (id %s, type %s); it cannot be "
                      "answered", excerpt(json.dumps(task.get("id")).encode(), 40),
                      excerpt(json.dumps(task.get("type")).encode(), 40))
            return
        run = TaskRun(task_id, task)
        with self._changed:
            if task_id in self._runs:
                log.warning("task %d delivered again while it is still running; ignored", task_id)
                return
            self._runs[task_id] = run
            self._changed.notify_all()
        try:
            threading.Thread(target=self._run_task, args=(run,), name=f"task-{task_id}", daemon=True).start()
        except RuntimeError:
            # No thread to be had (the system's limit): answer from here rather than never.
            log.error("task %d: cannot start a thread for it", task_id)
            self._post_result(run, {"error": True, "msg": "agent error: cannot start a thread"})
            with self._changed:
                self._runs.pop(task_id, None)
                self._changed.notify_all()

    # ---- running

    def _run_task(self, run: TaskRun) -> None:
        try:
            result = self._execute(run)
            self._post_result(run, result)
        except Exception:
            log.exception("task %d: unexpected agent error", run.id)
        finally:
            with self._changed:
                self._runs.pop(run.id, None)
                self._changed.notify_all()

    def _execute(self, run: TaskRun) -> JsonDict:
        while not self._slots.acquire(timeout=0.05):
            if self._stopping.is_set():
                result = {"error": True, "msg": "the agent is stopping; the task was not started"}
                log.info("task %d %s: not started, the agent is stopping", run.id, run.type)
                return result
        try:
            if self._stopping.is_set():
                log.info("task %d %s: not started, the agent is stopping", run.id, run.type)
                return {"error": True, "msg": "the agent is stopping; the task was not started"}
            with self._changed:
                run.started = True
                self._changed.notify_all()
            started = time.monotonic()
            result = self._dispatch(run)
            log.info("task %d %s: %.3f s, %s", run.id, run.type, time.monotonic() - started,
                     summarize(str(run.type), result))
            return result
        finally:
            self._slots.release()

    def _dispatch(self, run: TaskRun) -> JsonDict:
        """The local policy first (whatever the server sent), then the agent's own task (rekey)
        or the task table."""
        if not self.policy.permits(str(run.type)):
            return {"error": True, "msg": f"refused by local policy: {run.type}"}
        if run.type == "rekey":
            return self._rekey()
        return run_handler(run.task, TaskContext(self.settings, run.cancel, self.download_context))

    def _rekey(self) -> JsonDict:
        """Replaces the agent's secret by a new random one: the server learns it first (asked with
        the old one), then the config file, then the agent switches. The server keeps the old
        secret valid until the new one is used, so an agent that dies half-way loses nothing; one
        that cannot save the new secret keeps the old one. The result goes out with the new."""
        config = self.config
        if not self.can_rekey or config is None:
            return {"error": True, "msg": "this agent cannot change its secret: it does not come "
                                          "from a config file the agent may rewrite"}
        with self._rekey_lock:
            try:
                config.check_writable()  # before the server hears of a secret that cannot be kept
            except OSError as e:
                return {"error": True, "msg": f"cannot write the config file {config.path}: "
                                              f"{os_error_message(e)}; the secret is unchanged"}
            secret = secrets.token_urlsafe(32)
            problem = self._send_new_secret(secret)
            if problem:
                return {"error": True, "msg": f"the server did not take the new secret ({problem}); "
                                              "the secret is unchanged"}
            try:
                config.update(lambda data: data.__setitem__("secret", secret))
            except OSError as e:
                return {"error": True, "msg": f"cannot write the config file {config.path}: "
                                              f"{os_error_message(e)}; the secret is unchanged"}
            self.settings.secret = secret
            self.headers = dict(self.headers, Authorization=auth_header(
                self.settings.name, secret, self.settings.classic))
        log.info("new secret in use, saved in %s", config.path)
        return {"rekeyed": True}

    def _send_new_secret(self, secret: str) -> str | None:
        """POST /api/v1/agent/rekey with the old secret; None when taken, else the problem."""
        index = self.servers.current()
        endpoint = self.servers.endpoints[index]
        headers = dict(self.headers, **{"Content-Type": "application/json"})
        channel = self._take_channel(index)
        try:
            reply = channel.request("POST", endpoint.path("/api/v1/agent/rekey"), headers,
                                    encode_json({"credential": secret}))
        except (OSError, http.client.HTTPException, BadAnswer, Aborted) as e:
            channel.close()
            return describe_error(e) if not isinstance(e, Aborted) else "the agent is stopping"
        finally:
            self._return_channel(index, channel)
        if not 200 <= reply.status < 300 or reply.says_error():
            return f"HTTP {reply.status} {reply.message()}"
        return None

    def _take_channel(self, index: int) -> HttpChannel:
        with self._lock:
            idle = self._idle_channels.setdefault(index, [])
            if idle:
                return idle.pop()
            channel = HttpChannel(self.servers.endpoints[index], self.settings.poll_timeout_s)
            self._all_channels.append(channel)
            return channel

    def _return_channel(self, index: int, channel: HttpChannel) -> None:
        with self._lock:
            self._idle_channels.setdefault(index, []).append(channel)

    def _post_result(self, run: TaskRun, result: JsonDict) -> None:
        """Posts until the server takes the result or says it never will (404, 409).

        With several servers, a server that fails (unreachable, 5xx) hands the result over to
        the next one at once; the backoff applies when every server failed in a row."""
        s = self.settings
        servers = self.servers
        body = encode_result(result, s.max_result_bytes)
        backoff = Backoff(s.backoff_min_s, s.backoff_max_s)
        replaced = False
        failed_in_row = 0  # servers that failed one after the other for this result
        while True:
            index = servers.current()
            endpoint = servers.endpoints[index]
            path = endpoint.path(f"{self.result_path}?id={run.id}")
            # Read at every attempt: a rekey task may have changed the secret meanwhile.
            headers = dict(self.headers, **{"Content-Type": "application/json"})
            channel = self._take_channel(index)
            server_failed = False
            try:
                reply = channel.request("POST", path, headers, body)
            except Aborted:
                channel.close()
                problem = "the agent is stopping"
                reply = None
            except (OSError, http.client.HTTPException, BadAnswer) as e:
                channel.close()
                problem = describe_error(e)
                reply = None
                server_failed = True
            finally:
                self._return_channel(index, channel)
            delay: float | None = None if servers.several else backoff.next_delay()
            if reply is not None:
                if 200 <= reply.status < 300:
                    log.debug("task %d: result posted", run.id)
                    return
                message = reply.message()
                if reply.status in (404, 409):
                    log.warning("task %d: the server no longer takes its result (%d %s); dropped",
                                run.id, reply.status, message)
                    return
                if reply.status in (400, 413):
                    if replaced:
                        log.error("task %d: the server refuses even an error result (%d %s); "
                                  "result lost", run.id, reply.status, message)
                        return
                    log.error("task %d: the server refused the result (%d %s); posting an error "
                              "result instead", run.id, reply.status, message)
                    body = encode_json({"error": True, "msg": f"the server refused the agent's "
                                        f"result: HTTP {reply.status} {message}"[:1000]})
                    replaced = True
                    continue
                if delay is None:
                    delay = backoff.next_delay()
                if reply.status == 403 and headers["Authorization"] != self.headers["Authorization"]:
                    delay = 0.0  # sent with the secret a rekey just replaced: again with the new one
                elif reply.status == 403:
                    delay = random.uniform(0.5, 1.0) * s.forbidden_backoff_s
                elif reply.status == 429 and reply.retry_after_s is not None:
                    delay = max(delay, min(reply.retry_after_s, s.forbidden_backoff_s))
                problem = f"HTTP {reply.status} {message}"
                server_failed = reply.status >= 500
            if self._give_up_posting.is_set():
                log.error("task %d: result not posted (%s) and the agent is stopping: result lost",
                          run.id, problem)
                return
            if servers.several and server_failed:
                failed_in_row += 1
                new = servers.failed(index)
                if failed_in_row % len(servers):
                    log.warning("task %d: result not posted at %s (%s); moving to %s", run.id,
                                endpoint.url, problem, servers.url(new))
                    continue
                delay = backoff.next_delay()
                log.warning("task %d: result not posted at %s (%s); all %d servers failed, "
                            "retrying at %s in %.1f s", run.id, endpoint.url, problem,
                            len(servers), servers.url(new), delay)
            else:
                if delay is None:
                    delay = backoff.next_delay()
                failed_in_row = 0
                log.warning("task %d: result not posted (%s); retrying in %.1f s", run.id, problem,
                            delay)
            if self._give_up_posting.wait(delay or 0.0):
                log.error("task %d: result not posted (%s) and the agent is stopping: result lost",
                          run.id, problem)
                return


# --------------------------------------------------------------------------- enrollment

ENROLL_FINAL_STATES = ("rejected", "revoked", "expired")


class EnrollmentFailed(Exception):
    """The enrollment cannot succeed: printed as one line, exit status 1."""


def uses_pinning(s: Settings, enrolling: bool = False) -> bool:
    """Whether the server's key is pinned on first contact instead of verified by CAs: by
    default for an agent that enrolls (its server often has a certificate of its own making),
    never with a CA file (the CA decides) or --insecure (nothing is verified)."""
    if s.ca_file or s.insecure:
        return False
    return s.pin if s.pin is not None else enrolling


def can_rewrite(path: str) -> bool:
    """The file may be replaced: written, and its directory too (for the temporary file)."""
    return os.access(path, os.W_OK) and os.access(os.path.dirname(path) or ".", os.W_OK)


def is_loopback(host: str) -> bool:
    """This machine itself (127.0.0.0/8, ::1, localhost): no network between agent and server."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_enrollment_transport(urls: list[str], insecure: bool) -> None:
    """Plain http:// only to this machine itself, unless the operator accepts the risk."""
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "http" and not is_loopback(parts.hostname or "") and not insecure:
            raise UsageError(
                f"refusing to enroll over plain http:// ({url}): the enrollment token and this "
                f"agent's new secret would cross the network in clear text, and anyone on the "
                f"way could read them, or pose as the server and run commands on this PC. Use "
                f"an https:// URL (or --insecure if you accept that risk)")


def jittered(ceiling: float) -> float:
    """A delay between half the ceiling and all of it: spread out, but never close to zero."""
    return random.uniform(0.5, 1.0) * ceiling


class Enroller:
    """Enrolls this machine: offers a token and a fresh secret of its own making, waits for an
    administrator's decision, and keeps in the config file what it needs to resume after a
    restart (the enrollment's id and secret, written before the server hears of them)."""

    def __init__(self, s: Settings, config: ConfigFile, policy: Policy) -> None:
        self.s = s
        self.config = config
        self.facts = build_facts()
        self.capabilities = capabilities(policy, can_rekey=True)  # its secret is in its file
        self.pinning = uses_pinning(s, enrolling=True)
        self.pins = PinStore(s.pins, config) if self.pinning else None
        context = make_ssl_context(s.ca_file, s.insecure, self.pinning)
        self.servers = ServerList(split_servers(s.server), context, s.server_seed, self.pins)
        self._channels = [HttpChannel(e, 30.0) for e in self.servers.endpoints]

    def run(self, force: bool) -> tuple[str, str]:
        """Enrolls (or resumes the pending enrollment) until accepted: (name, secret)."""
        try:
            state = None if force else self._pending()
            first: JsonDict | None = None
            if state is None or "id" not in state:
                state, first = self._start(state, force)
            name = self._wait(state, first)
            self._save_account(name, state["credential"])
            return name, str(state["credential"])
        finally:
            for channel in self._channels:
                channel.close()

    # ---- state in the config file

    def _pending(self) -> JsonDict | None:
        """The enrollment a previous start left in the config file, if it is usable here."""
        state = self.s.enrollment
        if not state:
            return None
        credential, number = state.get("credential"), state.get("id")
        if not isinstance(credential, str) or len(credential) < 16 or (
                number is not None and (isinstance(number, bool) or not isinstance(number, int))):
            log.warning("the config file's pending enrollment is unusable: enrolling anew")
            return None
        here, there = self.facts["machine_id"], state.get("machine_id")
        if here and there and here != there:
            # A disk image made while an enrollment was pending: each copy needs its own.
            log.warning("the config file's pending enrollment was made on another machine "
                        "(machine id %s, this one is %s): enrolling this machine anew", there, here)
            return None
        return dict(state)

    def _save(self, change: Callable[[JsonDict], Any], what: str) -> None:
        try:
            self.config.update(change)
        except OSError as e:
            raise EnrollmentFailed(f"cannot write the config file {self.config.path} ({what}): "
                                   f"{os_error_message(e)}") from None

    def _settings_to_keep(self) -> JsonDict:
        """What `dutagent run` needs later that was given only on this command line."""
        s = self.s
        keep: JsonDict = {}
        if s.origins.get("server") != "file":
            keep["server"] = s.server
        for key in ("ca_file", "policy"):
            if getattr(s, key) and s.origins.get(key) != "file":
                keep[key] = os.path.abspath(getattr(s, key))
        if s.insecure and s.origins.get("insecure") != "file":
            keep["insecure"] = True
        return keep

    def _forget(self) -> None:
        """Drops a refused enrollment from the config file (its secret is of no use)."""
        try:
            self.config.update(lambda data: data.pop("enrollment", None))
        except OSError as e:
            log.warning("cannot update the config file %s: %s", self.config.path, os_error_message(e))

    def _save_account(self, name: str, secret: str) -> None:
        keep = self._settings_to_keep()

        def change(data: JsonDict) -> None:
            data.update(keep)
            data.update(name=name, secret=secret)
            if self.pinning and any(e.https for e in self.servers.endpoints):
                data["pin"] = True  # `run` pins too (its default is the system's CAs)
            data.pop("enrollment", None)
            data.pop("token", None)  # done with; it may let other machines enroll

        # Should this fail, the pending enrollment stays in the file: the next start resumes it.
        self._save(change, "the new account")

    # ---- the exchanges

    def _start(self, state: JsonDict | None, force: bool) -> tuple[JsonDict, JsonDict]:
        """Posts the enrollment: (the state kept in the config file, the server's first answer)."""
        s = self.s
        if not s.token:
            raise UsageError("no enrollment token: give it as `dutagent enroll URL TOKEN`, --token, "
                             "DUTAGENT_TOKEN or the config file's \"token\"")
        # A secret saved by a start that died before the answer is offered again, so that a
        # server that did record it may recognise the same enrollment.
        credential = state["credential"] if state else secrets.token_urlsafe(32)
        state = {"credential": credential, "machine_id": self.facts["machine_id"]}
        keep = self._settings_to_keep()
        pending = dict(state)

        def change(data: JsonDict) -> None:
            data.update(keep)
            data["enrollment"] = pending
            if force:
                data.pop("name", None)
                data.pop("secret", None)

        self._save(change, "the pending enrollment")  # before the secret leaves this machine
        body = {"token": s.token, "credential": credential, "facts": self.facts,
                "capabilities": self.capabilities}
        log.info("enrolling this machine (%s) at %s", self.facts["hostname"],
                 self.servers.url(self.servers.current()))
        reply = self._request("POST", "/api/v1/enroll", body)
        if 200 <= reply.status < 300 and not reply.says_error():
            answer = self._enrollment_of(reply)
            state["id"] = answer["id"]
            saved = dict(state)
            self._save(lambda data: data.__setitem__("enrollment", saved), "the enrollment's id")
            return state, answer
        self._forget()
        message = f"HTTP {reply.status} {reply.message()}"
        if reply.status == 403:
            raise EnrollmentFailed(f"the server refused the enrollment token ({message}): it is "
                                   f"unknown, expired, used up or revoked. Ask an administrator "
                                   f"for a new one")
        if reply.status == 400:
            raise EnrollmentFailed(f"the server refused this machine's facts ({message})")
        if reply.status in (404, 405):
            raise EnrollmentFailed(f"the server does not offer enrollment ({message}): it is older "
                                   f"than this agent. Use `dutagent register`, or ask an "
                                   f"administrator for an account")
        raise EnrollmentFailed(f"the server refused the enrollment ({message})")

    def _wait(self, state: JsonDict, answer: JsonDict | None) -> str:
        """Asks for the enrollment's state, less and less often, until decided: the name."""
        s = self.s
        number = int(state["id"])
        headers = {"Authorization": "Bearer " + str(state["credential"])}
        ceiling = s.enroll_poll_min_s
        told = ""
        while True:
            if answer is None:
                reply = self._request("GET", f"/api/v1/enroll/{number}", None, headers)
                if reply.status == 200 and not reply.says_error():
                    answer = self._enrollment_of(reply)
                elif reply.status in (403, 404):
                    raise EnrollmentFailed(
                        f"the server does not know enrollment {number} with this agent's secret "
                        f"(HTTP {reply.status} {reply.message()}): it may have been deleted. "
                        f"`dutagent enroll --force URL TOKEN` enrolls this machine anew")
                else:
                    raise EnrollmentFailed(f"unexpected answer about enrollment {number}: "
                                           f"HTTP {reply.status} {reply.message()}")
            state_now, name = answer["state"], answer.get("name")
            if state_now == "accepted" and isinstance(name, str) and NAME_RE.match(name):
                return name
            if state_now in ENROLL_FINAL_STATES:
                raise EnrollmentFailed(
                    f"enrollment {number} was {state_now} on the server: this machine gets no "
                    f"account. With a new token, `dutagent enroll --force URL TOKEN` tries again")
            if state_now != told:
                told = state_now
                if state_now == "pending":
                    log.info("enrollment %d is pending: an administrator must accept it (host %s, "
                             "machine id %s)", number, self.facts["hostname"],
                             self.facts["machine_id"] or "unknown")
                else:
                    log.warning("enrollment %d: state %r with name %r is not what this agent "
                                "expects; asking again", number, state_now, name)
            time.sleep(jittered(ceiling))
            ceiling = min(s.enroll_poll_max_s, ceiling * 2)
            answer = None

    @staticmethod
    def _enrollment_of(reply: Reply) -> JsonDict:
        """{"enrollment": {"id", "state", "name"}} from an answer; EnrollmentFailed if absent."""
        try:
            data = json.loads(reply.body)
            enrollment = data["enrollment"]
            number = enrollment["id"]
            if isinstance(number, bool) or not isinstance(number, int) or \
                    not isinstance(enrollment["state"], str):
                raise TypeError("id or state of the wrong type")
        except (ValueError, RecursionError, KeyError, TypeError) as e:
            raise EnrollmentFailed(f"the server's answer is not an enrollment ({e}): "
                                   f"{excerpt(reply.body)}") from None
        return dict(enrollment)

    def _request(self, method: str, path: str, body: JsonDict | None,
                 auth: dict[str, str] | None = None) -> Reply:
        """One exchange with the first server that answers: unreachable servers and 5xx move to
        the next (backing off after a whole round), 429 waits; every other answer is returned.
        A server that cannot prove who it is (pin, CA) ends the enrollment."""
        s = self.s
        servers = self.servers
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **(auth or {})}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = encode_json(body)
        backoff = Backoff(s.backoff_min_s, s.backoff_max_s)
        failed_in_row = 0
        while True:
            index = servers.current()
            endpoint = servers.endpoints[index]
            try:
                reply = self._channels[index].request(method, endpoint.path(path), headers, data)
            except (PinMismatch, ssl.SSLCertVerificationError) as e:
                raise EnrollmentFailed(f"{endpoint.url}: {describe_error(e)}") from None
            except (OSError, http.client.HTTPException, BadAnswer) as e:
                problem = describe_error(e)
            else:
                if reply.status == 429:
                    delay = max(backoff.next_delay(), min(reply.retry_after_s or 0.0, 600.0))
                    log.warning("%s: too many attempts from this address (HTTP 429); trying again "
                                "in %.1f s", endpoint.url, delay)
                    time.sleep(delay)
                    continue
                if reply.status < 500:
                    return reply
                problem = f"HTTP {reply.status} {reply.message()}"
            failed_in_row += 1
            new = servers.failed(index)
            if servers.several and failed_in_row % len(servers):
                log.warning("%s: %s; trying %s", endpoint.url, problem, servers.url(new))
                continue
            delay = backoff.next_delay()
            log.warning("%s: %s; trying again in %.1f s", endpoint.url, problem, delay)
            time.sleep(delay)


def command_enroll(s: Settings, config: ConfigFile, policy: Policy, force: bool) -> Settings:
    """Enrolls (or resumes), writes the account into the config file: the settings to run with."""
    if s.classic:
        raise UsageError("enrollment needs the native protocol: drop --classic (or \"classic\" "
                         "in the config file)")
    if not s.server:
        raise UsageError("enrollment needs the server's URL: `dutagent enroll URL TOKEN` (or "
                         "--server, DUTAGENT_SERVER, the config file's \"server\")")
    check_enrollment_transport(split_servers(s.server), s.insecure)
    if s.name and s.secret and not force:
        raise UsageError(f"this agent already has an account ({s.name!r}); `dutagent run` runs "
                         f"it, `dutagent enroll --force URL TOKEN` enrolls it anew")
    if s.insecure:
        log.warning("*** --insecure: the server is not verified (no certificate check, or plain "
                    "http://): anyone on the network path can pose as the server. ***")
    enroller = Enroller(s, config, policy)
    name, secret = enroller.run(force)
    print(f"enrolled as agent {name!r}; config written to {config.path}", flush=True)
    log.info("enrolled as agent %r; config written to %s", name, config.path)
    s.name, s.secret = name, secret
    s.origins.update(name="file", secret="file")
    if enroller.pins is not None:
        s.pin, s.pins = True, dict(enroller.pins.pins)
    s.enrollment, s.token = None, None
    return s


def command_trust(s: Settings, config_path: str, reset: bool) -> int:
    """Lists the pinned server keys, or forgets them (--reset) after a deliberate key change."""
    pins = s.pins or {}
    if not reset:
        if not pins:
            print(f"no server key pinned in {config_path}")
        for host_port, pin in sorted(pins.items()):
            print(f"{host_port} {pin}")
        return 0
    config = ConfigFile(config_path)
    if not config.exists():
        print(f"no config file at {config_path}: no pinned key to forget")
        return 0
    try:
        config.update(lambda data: data.pop("pins", None))
    except OSError as e:
        print(f"dutagent: cannot write the config file {config_path}: {os_error_message(e)}",
              file=sys.stderr)
        return 1
    print(f"forgot {len(pins)} pinned server key(s) in {config_path}. Restart the agent: it trusts "
          f"each server's key again at its first contact")
    return 0


# --------------------------------------------------------------------------- command line

def setup_logging(level: str, log_file: str | None) -> None:
    root = logging.getLogger()
    root.handlers[:] = []
    root.setLevel(level.upper())
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    if sys.stderr is not None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    if log_file:
        directory = os.path.dirname(os.path.abspath(log_file))
        os.makedirs(directory, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=5 * MIB, backupCount=3,
                                                            encoding="utf-8")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dutagent",
        description="The dutserver agent: runs tasks from a dutserver on this machine.",
        epilog="Every option can also be set as DUTAGENT_<OPTION> in the environment (e.g. "
               "DUTAGENT_SERVER, DUTAGENT_SECRET) and, except --config, as a key of the JSON "
               "config file (e.g. \"server\"). Flags win over the environment, the environment "
               "over the file. Default config file: ~/.config/dutagent/agent.json, "
               "/etc/dutagent/agent.json for root, %APPDATA%\\dutagent\\agent.json or "
               "%PROGRAMDATA%\\dutagent\\agent.json for administrators on Windows.")
    parser.add_argument("--version", action="version", version=f"dutagent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    register = commands.add_parser("register", help="create this agent's account on the server "
                                   "(self-registration) and write the config file")
    run = commands.add_parser("run", help="poll the server and run its tasks until stopped (with "
                              "a token but no account: enroll first)")
    enroll = commands.add_parser("enroll", help="ask the server for an account with an enrollment "
                                 "token, wait until an administrator accepts it, write the config "
                                 "file, then run as `run` does")
    enroll.add_argument("url", nargs="?", metavar="URL", help="the server (same as --server)")
    enroll.add_argument("token_arg", nargs="?", metavar="TOKEN",
                        help="the enrollment token (same as --token)")
    enroll.add_argument("--force", action="store_true", help="enroll anew even though the config "
                        "file holds an account or an enrollment already")
    trust = commands.add_parser("trust", help="list the pinned keys of the servers, or forget "
                                "them with --reset")
    trust.add_argument("--reset", action="store_true", help="forget every pinned server key")
    for name, sub in (("register", register), ("run", run), ("enroll", enroll), ("trust", trust)):
        for option in OPTIONS:
            if name not in option.commands:
                continue
            if option.kind is bool:
                sub.add_argument(option.flag, dest=option.name, action=argparse.BooleanOptionalAction,
                                 default=None, help=option.help)
            else:
                default = "" if option.default is None else f" (default {option.default})"
                sub.add_argument(option.flag, dest=option.name, type=option.kind, default=None,
                                 metavar=option.name.upper(), help=option.help + default)
    register.add_argument("--force", action="store_true",
                          help="overwrite an existing config file")
    return parser


def host_agent_name() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "agent"


def write_private_file(path: str, data: JsonDict) -> str:
    """Writes JSON that only the owner may read to a temp file beside `path`; returns its name."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    if IS_WINDOWS:
        restrict_windows_acl(temp)
    else:
        os.chmod(temp, 0o600)
    return temp


def restrict_windows_acl(path: str) -> None:
    """Only SYSTEM, Administrators and the current user may read the file (by SID, so
    that it works in every language)."""
    user = os.environ.get("USERNAME", "")
    domain = os.environ.get("USERDOMAIN", "")
    grants = ["*S-1-5-18:F", "*S-1-5-32-544:F"]
    if user:
        grants.append(f"{domain}\\{user}:F" if domain else f"{user}:F")
    try:
        run_quiet(["icacls", path, "/inheritance:r", "/grant:r", *grants])
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not restrict access to %s (%s): protect it by hand", path, e)


def command_register(s: Settings, config_path: str, force: bool) -> int:
    if not s.server:
        raise UsageError("register needs --server URL (or DUTAGENT_SERVER)")
    name = s.name or host_agent_name()
    if not NAME_RE.match(name):
        raise UsageError(f"invalid agent name {name!r}: use 1..64 characters of A-Z a-z 0-9 . _ -")
    if os.path.exists(config_path) and not force:
        raise UsageError(f"config file {config_path} already exists; use --force to replace it")
    secret = secrets.token_urlsafe(32)
    data: JsonDict = {"server": s.server, "name": name, "secret": secret}
    if s.classic:
        data["classic"] = True
    if s.ca_file:
        data["ca_file"] = os.path.abspath(s.ca_file)
    if s.insecure:
        data["insecure"] = True
        log.warning("*** --insecure: the server's TLS certificate is NOT verified. ***")
    try:
        # Write first, register second: a registered name whose secret could not be
        # saved would be lost for good.
        temp = write_private_file(config_path, data)
    except OSError as e:
        print(f"dutagent: cannot write the config file {config_path}: {os_error_message(e)}", file=sys.stderr)
        return 1
    context = make_ssl_context(s.ca_file, s.insecure)
    urls = split_servers(s.server)
    for number, url in enumerate(urls, 1):
        last = number == len(urls)
        endpoint = Endpoint(url, context)
        channel = HttpChannel(endpoint, 30.0)
        try:
            # Several servers (one fleet): the first that can be reached and does not answer
            # 5xx registers the agent. Only a failure to connect moves on: a registration
            # that may have reached a server is not sent again.
            try:
                channel.open()
            except (OSError, http.client.HTTPException) as e:
                if last:
                    raise
                log.warning("cannot reach %s: %s; trying %s", url, describe_error(e), urls[number])
                continue
            headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
            if s.classic:
                # The classic server reads only the query string.
                query = urllib.parse.urlencode({"user": name, "pass": secret})
                reply = channel.request("POST", endpoint.path("/agents?" + query), headers, b"")
            else:
                headers["Content-Type"] = "application/json"
                body = json.dumps({"user": name, "pass": secret}).encode("utf-8")
                reply = channel.request("POST", endpoint.path("/agents"), headers, body)
        except (OSError, http.client.HTTPException, BadAnswer) as e:
            remove_quietly(temp)
            print(f"dutagent: cannot reach {url}: {describe_error(e)}", file=sys.stderr)
            return 1
        finally:
            channel.close()
        if reply.status >= 500 and not last:
            log.warning("%s answered HTTP %d (%s); trying %s", url, reply.status, reply.message(),
                        urls[number])
            continue
        break
    if not 200 <= reply.status < 300 or reply.says_error():
        remove_quietly(temp)
        explanations = {
            405: "self-registration is disabled on the server. Ask an administrator to turn it on "
                 "(POST /agent_selfreg?enabled=1) or to create the agent account, then run "
                 "`dutagent run --server URL --name NAME --secret SECRET`.",
            409: f"an agent named {name!r} already exists on the server. Choose another name with --name.",
            429: "too many attempts from this address; wait a minute and try again.",
        }
        detail = explanations.get(reply.status, "the server refused the registration.")
        print(f"dutagent: registration failed (HTTP {reply.status} {reply.message()}): {detail}",
              file=sys.stderr)
        return 1
    os.replace(temp, config_path)
    print(f"registered agent {name!r} at {url}; config written to {config_path}")
    program = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else ""
    command = f"{sys.executable} {program}" if program else "dutagent"
    print(f"start it with: {command} run --config {config_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    no_console = sys.stderr is None  # pythonw.exe, as a Windows background task
    if no_console:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "enroll":
            take_enroll_arguments(args)
        settings, config_path, found = resolve_settings(args, args.command, dict(os.environ))
        validate_settings(settings)
        if no_console and not settings.log_file:
            settings.log_file = os.path.join(os.path.dirname(config_path), "dutagent.log")
        setup_logging(settings.log_level, settings.log_file)
        if args.command == "register":
            return command_register(settings, config_path, args.force)
        if args.command == "trust":
            return command_trust(settings, config_path, args.reset)
        policy = load_policy(settings.policy)  # before anything is sent: a bad one stops the agent
        config = ConfigFile(config_path)
        has_account = bool(settings.name and settings.secret)
        if args.command == "enroll" or (not has_account and (settings.token or settings.enrollment)):
            settings = command_enroll(settings, config, policy, getattr(args, "force", False))
            found = True
        missing = [o.flag for o in OPTIONS if o.name in ("server", "name", "secret")
                   and not getattr(settings, o.name)]
        if missing:
            where = f"config file {config_path}" if found else f"no config file at {config_path}"
            raise UsageError(f"missing {', '.join(missing)} ({where}); run `dutagent register "
                             f"--server URL` first (or `dutagent enroll URL TOKEN`), or give "
                             f"--server, --name and --secret")
        return Agent(settings, policy, config if found else None).run()
    except UsageError as e:
        print(f"dutagent: {e}", file=sys.stderr)
        return 2
    except EnrollmentFailed as e:
        log.error("enrollment failed: %s", e)
        print(f"dutagent: enrollment failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dutagent: interrupted (a pending enrollment resumes at the next start)",
              file=sys.stderr)
        return 130


def take_enroll_arguments(args: argparse.Namespace) -> None:
    """`dutagent enroll URL TOKEN`: the positional arguments are --server and --token."""
    for positional, option in (("url", "server"), ("token_arg", "token")):
        value = getattr(args, positional)
        if value is None:
            continue
        if getattr(args, option) not in (None, value):
            raise UsageError(f"the {positional.split('_')[0].upper()} argument and "
                             f"--{option} disagree: give one of them")
        setattr(args, option, value)


if __name__ == "__main__":
    sys.exit(main())
