"""The command line, compatible with the classic server: server, addaccount, remove, passwd…"""

from __future__ import annotations

import asyncio
import concurrent.futures
import getpass
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dutserver import __version__
from dutserver.config import SETTING_FIELDS, Settings, load_settings
from dutserver.core.auth import Auth
from dutserver.core.clock import Clock, now_ms
from dutserver.core.credentials import check_name, check_secret, hash_secret, load_key
from dutserver.core.errors import ApiError
from dutserver.core.ports import AccountExists, Store
from dutserver.store import create_store, is_url

T = TypeVar("T")

_SERVER_OPTIONS = [name for name in SETTING_FIELDS if name not in ("db_path", "db_url", "port")]


def _setting_options(fn: Any) -> Any:
    """One --flag per setting, from config.Settings (each also a DUTSERVER_* variable)."""
    for name in reversed(_SERVER_OPTIONS):
        f = SETTING_FIELDS[name]
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [env DUTSERVER_{name.upper()}; default {f.default}]"
        if f.type in ("bool", bool):
            fn = click.option(flag + "/--no-" + name.replace("_", "-"), name, default=None,
                              help=help_text)(fn)
        else:
            fn = click.option(flag, name, default=None, help=help_text)(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dutserver")
def main() -> None:
    """dutserver: run tasks on many PCs from a browser or a terminal."""


@main.command()
@click.argument("port", type=click.IntRange(0, 65535))
@click.argument("database", metavar="DB")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file with settings (flags and DUTSERVER_* variables win)")
@_setting_options
def server(port: int, database: str, config_file: Path | None, **flags: Any) -> None:
    """Start the server on PORT with the database DB: an SQLite file (created if needed) or
    a postgresql://… URL (several servers may share one)."""
    from dutserver import server as server_module
    try:
        settings = load_settings({**flags, "port": port, **_database(database)}, config_file)
        load_key(settings.key_path)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    # Fail here, with one clear line, if the store is unusable or the key is not its key.
    try:
        _with_store(settings, lambda store: Auth(settings, store, Clock()).check_key())
    except ValueError as exc:
        _fail(str(exc))
    server_module.run(settings)


def _fail(msg: str) -> None:
    click.echo(f"dutserver: {msg}", err=True)
    sys.exit(1)


def _with_store(settings: Settings, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Runs fn with the store of settings open (migrated to the current schema), then closes
    it, everything written committed."""
    async def run() -> T:
        store, _ = create_store(settings)
        await store.open()
        try:
            value = await fn(store)
            await store.barrier()
            return value
        finally:
            await store.close()
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: the command line, no loop of its own running
            return asyncio.run(run())
        # Called from code that runs a loop (a test, say): a loop of its own, on a thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(run())).result()
    except (OSError, RuntimeError) as exc:  # ConnectionError says which database, redacted
        _fail(str(exc) if isinstance(exc, ConnectionError)
              else f"cannot use the database {settings.db_path}: {exc}")
        raise
    except Exception as exc:
        if type(exc).__module__.startswith(("sqlite3", "asyncpg")):
            _fail(f"cannot use the database {settings.database}: {type(exc).__name__}")
        raise


async def _nothing(store: Store) -> None:
    return None


def _key(settings: Settings) -> bytes:
    """The same key file the server uses (DBFILE.key unless DUTSERVER_KEY_FILE says)."""
    try:
        return load_key(settings.key_path)
    except OSError as exc:
        _fail(f"cannot use the key file {settings.key_path}: {exc}")
        raise


def _database(database: str) -> dict[str, Any]:
    """The settings a DB argument stands for: a PostgreSQL URL, or an SQLite file."""
    return {"db_url": database} if is_url(database) else {"db_path": Path(database)}


def _settings(database: str) -> Settings:
    """The same settings the server would use (its key file too)."""
    try:
        return load_settings(_database(database))
    except (ValueError, OSError) as exc:
        _fail(str(exc))
        raise


def _read_password(kind: str) -> str:
    """One line from standard input, or a prompt twice without echo on a terminal."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != first:
            _fail("passwords do not match")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        return check_secret(kind, password)
    except ApiError as exc:
        _fail(exc.msg)
        raise


@main.command()
@click.argument("database", metavar="DB")
@click.argument("name")
@click.argument("kind", metavar="admin|agent")
def addaccount(database: str, name: str, kind: str) -> None:
    """Add an account; the password is read from standard input."""
    if kind not in ("admin", "agent"):
        _fail(f"bad account type {kind!r}: use admin or agent")
    try:
        check_name(name)
    except ApiError as exc:
        _fail(exc.msg)
    settings = _settings(database)
    _with_store(settings, _nothing)  # a clear error now, before the password is asked for
    password = _read_password(kind)
    digest = hash_secret(kind, password, _key(settings))

    async def add(store: Store) -> None:
        await store.add_account(name, kind, digest, now_ms())
        store.audit("cli", "account_create", f"{kind} {name}", None)
    try:
        _with_store(settings, add)
    except AccountExists:
        _fail(f"account {name} already exists")
    click.echo(f"Added {kind} account {name}")


def _must_exist(database: str) -> None:
    if not is_url(database) and not Path(database).exists():
        _fail(f"no database at {database}")


def _change(database: str, name: str, action: str) -> None:
    _must_exist(database)
    settings = _settings(database)
    account = _with_store(settings, lambda store: store.account(name))
    if account is None:
        _fail(f"unknown account: {name}")
        return
    digest = ""
    if action != "remove":
        digest = hash_secret(account.kind, _read_password(account.kind), _key(settings))

    async def change(store: Store) -> None:
        if action == "remove":
            await store.remove_account(name)
        else:
            await store.set_secret(name, digest, now_ms())
        store.audit("cli", f"account_{action}", name, None)
    _with_store(settings, change)


@main.command()
@click.argument("database", metavar="DB")
@click.argument("name")
def remove(database: str, name: str) -> None:
    """Remove an account (its sessions end within a second, also in a running server)."""
    _change(database, name, "remove")
    click.echo(f"Removed account {name}")


main.add_command(remove, "delaccount")


@main.command()
@click.argument("database", metavar="DB")
@click.argument("name")
def passwd(database: str, name: str) -> None:
    """Set an account's password, read from standard input."""
    _change(database, name, "password")
    click.echo(f"Changed the password of {name}")


@main.command()
@click.argument("database", metavar="DB")
def accounts(database: str) -> None:
    """List the accounts: name and type."""
    _must_exist(database)
    rows = _with_store(_settings(database), lambda store: store.accounts())
    width = max([4, *(len(r.name) for r in rows)])
    click.echo(f"{'NAME':<{width}}  TYPE")
    for row in rows:
        click.echo(f"{row.name:<{width}}  {row.kind}")


@main.command("enroll-token")
@click.argument("database", metavar="DB")
@click.option("--expires", default="1d", show_default=True,
              help="lifetime: seconds, or 30m, 12h, 7d")
@click.option("--uses", type=click.IntRange(1, 1_000_000), default=1, show_default=True,
              help="how many machines may join with it")
@click.option("--unlimited", is_flag=True, help="any number of machines until it expires")
@click.option("--label", "labels", multiple=True, metavar="NAME=VALUE",
              help="a label the machines joining with it get (repeatable)")
@click.option("--auto-accept", is_flag=True,
              help="machines joining with it are accepted at once (a trusted lab's image)")
@click.option("--note", default="", help="what the token is for")
@click.option("--list", "listing", is_flag=True, help="list the tokens instead")
@click.option("--revoke", type=int, metavar="ID", help="revoke token ID instead")
def enroll_token(database: str, expires: str, uses: int, unlimited: bool, labels: tuple[str, ...],
                 auto_accept: bool, note: str, listing: bool, revoke: int | None) -> None:
    """Create an enrollment token (printed once; `dutagent enroll URL TOKEN` on each PC), or
    list (--list) or revoke (--revoke ID) them."""
    from dutserver.core import enrollment
    _must_exist(database)
    settings = _settings(database)
    if listing:
        rows = _with_store(settings, lambda store: store.enroll_tokens())
        click.echo(f"{'ID':>5}  {'STATE':<9}  {'USES':>9}  {'EXPIRES':<24}  NOTE")
        for t in rows:
            view = enrollment.token_view(t, now_ms())
            used = f"{t.uses}/{t.max_uses if t.max_uses is not None else '-'}"
            click.echo(f"{t.id:>5}  {view['state']:<9}  {used:>9}  {view['expires_at']:<24}  "
                       f"{t.note}")
        return
    if revoke is not None:
        async def end(store: Store) -> bool:
            done = await store.revoke_enroll_token(revoke, now_ms())
            if done:
                store.audit("cli", "enroll_token_revoke", f"token {revoke}", None)
            return done
        if not _with_store(settings, end):
            _fail(f"no active enrollment token {revoke}")
        click.echo(f"Revoked enrollment token {revoke}")
        return
    try:
        body = {"expires_s": enrollment.parse_duration(expires),
                "max_uses": None if unlimited else uses, "auto_accept": auto_accept,
                "note": note, "labels": dict(_label(text) for text in labels)}
    except ValueError as exc:
        _fail(str(exc))
    key = _key(settings)
    try:
        view = _with_store(settings, lambda store: enrollment.create_token(
            store, key, body, "cli", None, now_ms(), settings.enroll_token_max_s))
    except ApiError as exc:
        _fail(exc.msg)
    click.echo(view["token"])
    click.echo(f"# token {view['id']}: {view['max_uses'] or 'unlimited'} use(s), expires "
               f"{view['expires_at']}; shown once. On each PC: dutagent enroll URL TOKEN",
               err=True)


def _label(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"not a label: {text!r} (use NAME=VALUE)")
    return name.strip(), value.strip()
