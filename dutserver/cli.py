"""The command line, compatible with the classic server: server, addaccount, remove, passwd…"""

from __future__ import annotations

import getpass
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from dutserver import __version__, store
from dutserver.auth import check_name, check_secret, hash_secret, load_key
from dutserver.config import SETTING_FIELDS, load_settings
from dutserver.errors import ApiError

_SERVER_OPTIONS = [name for name in SETTING_FIELDS if name not in ("db_path", "port")]


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
@click.argument("dbfile", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file with settings (flags and DUTSERVER_* variables win)")
@_setting_options
def server(port: int, dbfile: Path, config_file: Path | None, **flags: Any) -> None:
    """Start the server on PORT with the database DBFILE (created if needed)."""
    from dutserver import server as server_module
    try:
        settings = load_settings({**flags, "port": port, "db_path": dbfile}, config_file)
        _open(dbfile).close()  # fail here, with one clear line, if the database is unusable
        load_key(settings.key_path)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    server_module.run(settings)


@main.command("compile")
@click.option("--force", is_flag=True, help="Rebuild even if the build is up to date.")
def compile_(force: bool) -> None:
    """Compile the hot path to C with mypyc (dutserver/native.py); needs a C compiler."""
    import subprocess

    from dutserver import native
    if native.is_fresh() and not force:
        click.echo(f"dutserver: the compiled hot path in {native.NATIVE_DIR} is up to date")
        return
    click.echo("dutserver: compiling the hot path (mypyc, about half a minute)…")
    try:
        native.build()
    except (OSError, ImportError, subprocess.CalledProcessError) as exc:
        _fail(f"the hot path was not compiled ({exc}); the server runs it interpreted")
    click.echo(f"dutserver: compiled into {native.NATIVE_DIR}")


def _fail(msg: str) -> None:
    click.echo(f"dutserver: {msg}", err=True)
    sys.exit(1)


def _open(dbfile: Path) -> sqlite3.Connection:
    try:
        return store.connect(dbfile)
    except sqlite3.Error as exc:
        _fail(f"cannot open database {dbfile}: {exc}")
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


def _key(dbfile: Path) -> bytes:
    """The same key file the server uses (DBFILE.key unless DUTSERVER_KEY_FILE says otherwise)."""
    return load_key(load_settings({"db_path": dbfile}).key_path)


@main.command()
@click.argument("dbfile", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("name")
@click.argument("kind", metavar="admin|agent")
def addaccount(dbfile: Path, name: str, kind: str) -> None:
    """Add an account; the password is read from standard input."""
    if kind not in ("admin", "agent"):
        _fail(f"bad account type {kind!r}: use admin or agent")
    try:
        check_name(name)
    except ApiError as exc:
        _fail(exc.msg)
    conn = _open(dbfile)
    password = _read_password(kind)
    try:
        digest = hash_secret(kind, password, _key(dbfile))
        conn.execute("BEGIN IMMEDIATE")
        store.account_add(conn, name, kind, digest, store.now_ms())
        store.audit_write(conn, "cli", "account_create", f"{kind} {name}", None)
        conn.execute("COMMIT")
    except store.AccountExists:
        _fail(f"account {name} already exists")
    except (sqlite3.Error, OSError) as exc:
        _fail(f"cannot write {dbfile}: {exc}")
    click.echo(f"Added {kind} account {name}")


def _change(dbfile: Path, name: str, action: str) -> None:
    if not dbfile.exists():
        _fail(f"no database at {dbfile}")
    conn = _open(dbfile)
    account = store.account_get(conn, name)
    if account is None:
        _fail(f"unknown account: {name}")
        return
    try:
        if action == "remove":
            conn.execute("BEGIN IMMEDIATE")
            store.account_remove(conn, name)
        else:
            digest = hash_secret(account[1], _read_password(account[1]), _key(dbfile))
            conn.execute("BEGIN IMMEDIATE")
            store.account_set_secret(conn, name, digest, store.now_ms())
        store.audit_write(conn, "cli", f"account_{action}", name, None)
        conn.execute("COMMIT")
    except (sqlite3.Error, OSError) as exc:
        _fail(f"cannot write {dbfile}: {exc}")


@main.command()
@click.argument("dbfile", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("name")
def remove(dbfile: Path, name: str) -> None:
    """Remove an account (its sessions end within a second, also in a running server)."""
    _change(dbfile, name, "remove")
    click.echo(f"Removed account {name}")


main.add_command(remove, "delaccount")


@main.command()
@click.argument("dbfile", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("name")
def passwd(dbfile: Path, name: str) -> None:
    """Set an account's password, read from standard input."""
    _change(dbfile, name, "password")
    click.echo(f"Changed the password of {name}")


@main.command()
@click.argument("dbfile", type=click.Path(dir_okay=False, path_type=Path))
def accounts(dbfile: Path) -> None:
    """List the accounts: name and type."""
    if not dbfile.exists():
        _fail(f"no database at {dbfile}")
    rows = store.accounts_all(_open(dbfile))
    width = max([4, *(len(r[0]) for r in rows)])
    click.echo(f"{'NAME':<{width}}  TYPE")
    for row in rows:
        click.echo(f"{row[0]:<{width}}  {row[1]}")
