"""RDFM's device API (docs/protocols/rdfm-device.md), served when the `rdfm_devices` setting is
on (app.py lists these routes only then; otherwise their paths answer 404 like any other).

Parse, one call into the core (core/devices.py), shape: successful answers in RDFM's own shape,
errors in ours (RDFM clients look only at the status codes).
"""

from __future__ import annotations

from dutserver.core import codec
from dutserver.http.answer import Reply, raw_json
from dutserver.http.endpoint import Endpoint, Route
from dutserver.http.request import Request

SIGNATURE_HEADER = b"x-rdfm-device-signature"


async def auth_device(req: Request) -> Reply:
    """An RDFM device enrolls and asks for a token: its metadata, RSA public key and a
    timestamp, signed (X-RDFM-Device-Signature) over the exact bytes of the body. 401 while an
    admin has not accepted it (see GET /api/v1/enrollments?kind=rdfm), then 200 {"token",
    "expires"}: a JWT for `Authorization: Bearer token=<T>`, valid `expires` seconds."""
    raw = await req.body()  # the signature covers these bytes: never a re-serialisation
    signature = req.header(SIGNATURE_HEADER)
    answer = await req.services.devices.authenticate(raw, signature, req.address)
    return raw_json(codec.compact(answer).encode())


def routes() -> list[Route]:
    return [
        Route("/api/v1/auth/device", Endpoint({"POST": auth_device}, public=("POST",))),
    ]
