"""The calibration server: hello world in Starlette, the smallest app uvicorn can serve.

Every throughput figure of the benchmark is also given as a ratio to this app's requests/s,
measured by the same generator in the same run, so figures compare across machines.
Run: python -m uvicorn bench.calibrate_app:app --no-access-log
"""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello, world!")


app = Starlette(routes=[Route("/", hello)])
