"""Correctness of the benchmark's load generator (bench/): framing, keep-alive, error counting,
latency accounting, and its agents against the real server. No timings are asserted here."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from support import ADMIN, ROOT, RunningServer

# bench/ is a directory of the repository, not part of the installed package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.actors import AgentFleet, create_agents, login
from bench.drive import Stats, Window, closed_loop, open_loop
from bench.durable import _account
from bench.loadgen import Connection, ProtocolError, Target
from bench.soak import account, slope_per_min, summarise_samples
from bench import wrkcheck


@dataclass
class Toy:
    """A tiny HTTP/1.1 server whose answers exercise every framing the parser must handle."""

    server: asyncio.Server | None = None
    connections: int = 0
    requests: int = 0
    failures_sent: int = 0
    bodies: list[bytes] = field(default_factory=list)

    @property
    def target(self) -> Target:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return Target.from_url(f"http://127.0.0.1:{port}")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                length = next((int(line.split(":")[1]) for line in lines
                               if line.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests += 1
                self.bodies.append(body)
                if not await self.answer(method, path, body, writer):
                    return
        finally:
            writer.close()

    async def answer(self, method: str, path: str, body: bytes,
                     writer: asyncio.StreamWriter) -> bool:
        """Writes the answer for path; False when the connection must end."""
        if path == "/cl":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        elif path == "/echo":
            writer.write(b"HTTP/1.1 201 Created\r\nX-Echo: yes\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
        elif path == "/chunked":
            # One byte per write, so every boundary of the chunked framing falls between reads.
            raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nhel\r\n6;ext=1\r\nlo wor\r\n2\r\nld\r\n0\r\nX-Trailer: t\r\n\r\n")
            for i in range(len(raw)):
                writer.write(raw[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        elif path == "/split":  # head and body in separate reads: the parser must wait
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b" world")
        elif path == "/until-close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
            await writer.drain()
            return False
        elif path == "/head":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        elif path == "/no-content":
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif path == "/every-third-fails":
            fail = self.requests % 3 == 0
            self.failures_sent += fail
            status = b"500 Internal Server Error" if fail else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/slow-20ms":
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        elif path == "/half":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nonly part")
            await writer.drain()
            return False
        elif path == "/never":
            await asyncio.sleep(30)
        return True


@pytest.fixture
async def toy() -> AsyncIterator[Toy]:
    t = Toy()
    t.server = await asyncio.start_server(t.handle, "127.0.0.1", 0)
    yield t
    t.server.close()
    await t.server.wait_closed()


async def test_frames_every_response_kind_on_one_kept_alive_connection(toy: Toy) -> None:
    conn = Connection(toy.target)
    try:
        r = await conn.request("GET", "/cl")
        assert (r.status, r.body) == (200, b"hello")
        r = await conn.request("POST", "/echo", b'{"a": 1}')
        assert (r.status, r.json(), r.headers["x-echo"]) == (201, {"a": 1}, "yes")
        r = await conn.request("GET", "/chunked")
        assert (r.status, r.body) == (200, b"hello world")
        r = await conn.request("GET", "/split")
        assert (r.status, r.body) == (200, b"hello world")
        r = await conn.request("HEAD", "/head")
        assert (r.status, r.body) == (200, b"")
        r = await conn.request("GET", "/no-content")
        assert (r.status, r.body) == (204, b"")
        r = await conn.request("GET", "/cl")
        assert r.body == b"hello"
        assert toy.connections == 1 and conn.connects == 1
        assert toy.bodies[1] == b'{"a": 1}'
    finally:
        conn.close()


async def test_body_until_close_then_reconnects(toy: Toy) -> None:
    conn = Connection(toy.target)
    try:
        r = await conn.request("GET", "/until-close")
        assert (r.status, r.body) == (200, b"all of it")
        r = await conn.request("GET", "/cl")
        assert r.body == b"hello"
        assert conn.connects == 2 and toy.connections == 2
    finally:
        conn.close()


async def test_truncated_response_and_timeout_raise_and_drop_the_connection(toy: Toy) -> None:
    conn = Connection(toy.target)
    try:
        with pytest.raises(ProtocolError):
            await conn.request("GET", "/half")
        with pytest.raises(TimeoutError):
            await conn.request("GET", "/never", timeout_s=0.1)
        assert not conn.is_open
        r = await conn.request("GET", "/cl")  # the next request gets a fresh connection
        assert r.body == b"hello"
    finally:
        conn.close()


async def test_closed_loop_counts_every_request_and_every_error(toy: Toy) -> None:
    conns = [Connection(toy.target) for _ in range(4)]

    async def call(conn: Connection) -> str | None:
        r = await conn.request("GET", "/every-third-fails", timeout_s=5)
        return None if r.status == 200 else f"http {r.status}"

    stats = await closed_loop(conns, call, Window(0.0, 0.3))
    for c in conns:
        c.close()
    assert stats.errors == {"http 500": toy.failures_sent}
    assert stats.count + toy.failures_sent == toy.requests > 30
    assert toy.connections == 4


async def test_open_loop_latency_includes_waiting_for_a_busy_connection(toy: Toy) -> None:
    """100 arrivals/s on one connection to a server that needs 20 ms each: the queue grows, and
    latency counted from each arrival shows it (a closed loop would report 20 ms throughout)."""
    conn = Connection(toy.target)

    async def call(c: Connection) -> str | None:
        r = await c.request("GET", "/slow-20ms", timeout_s=5)
        return None if r.status == 200 else f"http {r.status}"

    stats = await open_loop([conn], call, 100.0, Window(0.0, 0.4), seed=3)
    conn.close()
    assert stats.count >= 20 and not stats.errors
    assert max(stats.latencies_s) > 0.1  # far beyond one 20 ms service time
    assert min(stats.latencies_s) >= 0.02


def test_percentiles_use_nearest_rank() -> None:
    stats = Stats(latencies_s=[i / 1000 for i in range(100, 0, -1)])
    assert (stats.percentile_ms(50), stats.percentile_ms(99), stats.percentile_ms(100)) == (
        50.0, 99.0, 100.0)
    assert Stats().percentile_ms(50) is None


def test_target_keeps_a_base_path_and_the_host_header() -> None:
    t = Target.from_url("http://[::1]:8080/dut/")
    assert (t.host, t.port, t.base_path, t.host_header) == ("::1", 8080, "/dut", "[::1]:8080")
    with pytest.raises(ValueError):
        Target.from_url("ftp://x")


def test_durable_accounting_finds_lost_and_duplicated_tasks() -> None:
    kill = 1_000_000.0
    before, after = "1970-01-12T13:46:39+00:00", "1970-01-12T13:46:41+00:00"
    acked = {1: "a", 2: "a", 3: "b", 4: "b", 5: "b", 6: "a"}
    states = {
        1: {"state": "done", "result": {"pong": True}},
        2: {"state": "done", "result": {"pong": True}},  # received twice: a duplicate
        3: {"state": "failed", "delivered_at": before},  # in flight at the kill: allowed
        4: {"state": "failed", "delivered_at": after},  # failed with no crash to explain it: lost
        5: {"state": "queued"},  # never drained: lost
    }  # 6 is unknown to the server: lost
    deliveries = {1: ["a"], 2: ["a", "a"], 3: ["b"], 4: ["b"]}
    tally = _account(acked, states, deliveries, acked_results=set(), last_kill_wall=kill)
    assert (tally["lost"], tally["duplicated"], tally["failed_in_flight"], tally["done"]) == (
        3, 1, 1, 2)


def test_soak_slope_is_per_minute_and_needs_two_distinct_times() -> None:
    assert slope_per_min([(0, 10.0), (60, 12.0), (120, 14.0)]) == pytest.approx(2.0)
    assert slope_per_min([(0, 10.0), (30, 9.0), (60, 10.0), (90, 9.0)]) == pytest.approx(-0.4)
    assert slope_per_min([(0, 10.0)]) is None
    assert slope_per_min([(5, 10.0), (5, 11.0)]) is None


def test_soak_summary_takes_the_slope_over_the_second_half_only() -> None:
    # A warm-up climb in the first half, flat after: the slope says flat.
    samples = [(0, 40.0, 230), (10, 45.0, 262), (20, 48.0, 262), (30, 48.0, 262),
               (40, 48.0, 263), (50, 48.0, 262), (60, 48.0, 262)]
    summary = summarise_samples(samples, duration_s=60)
    assert summary["rss_mb"] == {"first": 40.0, "last": 48.0, "max": 48.0}
    assert summary["fds"] == {"first": 230, "last": 262, "max": 263}
    assert summary["rss_slope_mb_per_min_second_half"] == 0.0
    assert summarise_samples([], 60)["rss_mb"] is None


def test_soak_accounting_finds_lost_and_duplicated_tasks() -> None:
    states = {1: {"state": "done"}, 2: {"state": "done"}, 3: {"state": "queued"},
              4: {"state": "failed"}}  # 5 is unknown to the server
    deliveries = {1: ["a"], 2: ["b", "b"], 3: [], 9: ["c", "c", "c"]}  # 9: a blocking submit
    tally = account([1, 2, 3, 4, 5], states, deliveries)
    assert (tally["done"], tally["lost"], tally["duplicated"]) == (2, 3, 3)
    assert tally["lost_examples"] == [3, 4, 5]
    assert tally["states"] == {"done": 2, "queued": 1, "failed": 1, "missing": 1}


@pytest.mark.parametrize("classic_auth", [False, True], ids=["basic-auth", "classic-auth"])
async def test_bench_agents_answer_the_real_server(server: RunningServer,
                                                   classic_auth: bool) -> None:
    target = Target.from_url(server.url)
    token = await login(target, *ADMIN)
    creds = await create_agents(target, token, ["bench-a", "bench-b"], parallel=2)
    fleet = AgentFleet(target, creds, classic_auth=classic_auth)
    fleet.start()
    conn = Connection(target, {"Authorization": token})
    try:
        for cred in creds:
            r = await conn.request("POST", f"/tasks?target={cred.name}",
                                   json.dumps({"type": "ping"}).encode(), timeout_s=10)
            assert r.status == 200, r.body
            assert r.json() == {"pong": True, "agent_version": "dutbench", "error": False}
        # The submit may be answered before the agent has read the 200 for its result.
        for _ in range(500):
            if fleet.counters.results_ok == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        conn.close()
        await fleet.stop()
    assert fleet.counters.tasks == 2 and fleet.counters.results_ok == 2
    assert not fleet.counters.errors and not fleet.counters.result_status


WRK_REPORT = """Running 1s test @ http://127.0.0.1:18090/missing
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   616.43us  281.31us   5.57ms   84.46%
    Req/Sec     3.04k   113.26     3.36k    90.91%
  Latency Distribution
     50%  573.00us
     75%  723.00us
     90%    0.88ms
     99%    1.31ms
  3334 requests in 1.10s, 1.65MB read
  Socket errors: connect 0, read 2, write 1, timeout 4
  Non-2xx or 3xx responses: 3334
Requests/sec:   3030.29
Transfer/sec:      1.50MB
"""


def test_the_wrk_cross_check_reads_wrks_report() -> None:
    """bench.wrkcheck's second opinion: the rate, the p99 in ms, every failed request."""
    assert wrkcheck.parse(WRK_REPORT) == {"per_s": 3030.29, "p99_ms": 1.31,
                                          "errors": 3334 + 2 + 1 + 4}
    fast = WRK_REPORT.replace("1.31ms", "870.00us").replace("Socket errors: connect 0, read 2, "
                                                            "write 1, timeout 4\n", "")
    assert wrkcheck.parse(fast.replace("  Non-2xx or 3xx responses: 3334\n", "")) == {
        "per_s": 3030.29, "p99_ms": 0.87, "errors": 0}
