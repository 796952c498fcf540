"""The web client's files (web/), served with revalidation, and errors in our shape."""

from __future__ import annotations

from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from dutserver.assets import web_dir
from dutserver.core.errors import ApiError
from dutserver.http.answer import error_reply, refuse_websocket, send_reply


class WebFiles:
    """The web client's files; any other method than GET/HEAD is 405 on a file, 404 elsewhere.

    (StaticFiles alone answers 405 for every path, so a mistyped API path would look like a
    wrong method.)"""

    def __init__(self) -> None:
        self.root = web_dir()
        self.files = StaticFiles(directory=self.root, html=True, check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the catch-all route: a WebSocket to a path nobody serves
            await refuse_websocket(scope, receive, send, ApiError(404, "Not found"))
            return
        if scope["method"] in ("GET", "HEAD"):
            async def revalidate(message: Message) -> None:
                # no-cache: the browser keeps the files but asks (ETag) whether they changed,
                # so an upgraded server never runs with yesterday's scripts.
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()),
                                          (b"cache-control", b"no-cache")]
                await send(message)
            await self.files(scope, receive, revalidate)
            return
        relative = scope["path"][len(scope.get("root_path", "")):].lstrip("/") or "index.html"
        try:
            target = (self.root / relative).resolve()
            exists = target.is_file() and target.is_relative_to(self.root.resolve())
        except (ValueError, OSError):  # a NUL byte, a name too long: no such file
            exists = False
        error = (ApiError(405, f"Method {scope['method']} not allowed; use GET", {"Allow": "GET"})
                 if exists else ApiError(404, "Not found"))
        await send_reply(send, error_reply(error))
