"""run(settings): the ASGI server, TLS, and a shutdown that answers parked polls at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator
from types import FrameType
from typing import cast

import uvicorn

from dutserver.app import create_app
from dutserver.config import Settings
from dutserver.core.services import Services
from dutserver.http.protocol import Protocol

log = logging.getLogger("dutserver")


class _Server(uvicorn.Server):
    """uvicorn, except that a stop signal first answers every parked poll with {}.

    uvicorn waits for in-flight requests before the lifespan shutdown runs, so parked polls
    would hold the process for a whole poll timeout; and it re-raises the signal after a
    graceful stop, which would turn a clean SIGTERM into exit status 143.
    """

    _loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        services = getattr(getattr(self.config.app, "state", None), "services", None)
        if services is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._drain, services)
        if not self.should_exit:
            log.info("stop signal %s: answering parked polls, finishing requests", sig)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    def _drain(self, services: Services) -> None:
        """Stop taking connections at once, then answer every parked poll (the protocol closes
        each connection after its answer while the dispatcher is closing). Otherwise 10,000
        agents answered {} poll again at once, on their open connections or new ones, and keep
        the loop too busy to get on with the shutdown for seconds."""
        for server in getattr(self, "servers", ()):
            server.close()
        services.close()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        # uvicorn types this as int, but hands it to asyncio.wait_for: fractions work.
        timeout_graceful_shutdown=cast(int, settings.shutdown_timeout_s),
        # agents and clients reuse their connections between polls (fractions work, as above)
        timeout_keep_alive=cast(int, settings.keep_alive_s),
        backlog=4096,           # a restart herd of thousands of agents reconnecting at once
        server_header=False,
        proxy_headers=False,    # addresses in the audit log and bans are the peers' own
        date_header=False,
        lifespan="on",
        http=Protocol,          # fixed paths skip ASGI (http/protocol.py)
    )


def run(settings: Settings) -> None:
    configure_logging(settings.log_level)
    _Server(uvicorn_config(settings)).run()
