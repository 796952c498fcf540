"""A real PostgreSQL for the tests: a throw-away database per test, on a server found or started.

The server, in order: DUTSERVER_TEST_PG (a URL of a database that may CREATE DATABASE), the
local service on 127.0.0.1:5432 (user postgres), or a throw-away cluster made with Debian's
initdb/pg_ctl in a temporary directory (as user postgres when run as root). Without any, the
tests that need one skip with the reason; under CI (CI=1) they fail instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import free_port

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _run(make: Any) -> Any:
    """make() as a coroutine, run to its end on a loop of its own (a fixture may be set up
    while a test's loop runs)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def _reachable(url: str) -> bool:
    import asyncpg

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=3)
        except Exception:
            return False
        await conn.close()
        return True
    return bool(_run(probe))


def _throwaway_cluster() -> tuple[str, Path] | None:
    """initdb + pg_ctl on a free port in a temporary directory; (admin URL, its directory)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb:
        return None
    bindir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="dutserver-pg-"))
    port = free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l",
                    str(root / "log"), "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
                    "-c fsync=off -c max_connections=200", "start"], check=True,
                   capture_output=True)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", root


def _stop_cluster(root: Path) -> None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    pg_ctl = found[-1] if found else shutil.which("pg_ctl") or "pg_ctl"
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, pg_ctl, "-D", str(root / "data"), "-m", "immediate", "stop"],
                   capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """An admin URL of a PostgreSQL server the tests may create databases on."""
    url = os.environ.get("DUTSERVER_TEST_PG")
    if url:
        yield url
        return
    if _reachable(LOCAL):
        yield LOCAL
        return
    cluster = None
    try:
        cluster = _throwaway_cluster()
    except (OSError, subprocess.CalledProcessError) as exc:
        reason = f"no PostgreSQL: none at 127.0.0.1:5432 and initdb failed ({exc})"
    else:
        reason = "no PostgreSQL: none at 127.0.0.1:5432 and no initdb (apt-get install postgresql)"
    if cluster is None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield cluster[0]
    finally:
        _stop_cluster(cluster[1])


def _admin(admin_url: str, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    _run(run)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A new, empty database for one test (dropped after it, with its connections)."""
    name = "dut_" + uuid.uuid4().hex[:12]
    _admin(pg_server, f"CREATE DATABASE {name}")
    yield pg_server.rsplit("/", 1)[0] + "/" + name
    for _ in range(3):
        try:
            _admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            return
        except Exception:
            time.sleep(0.2)
