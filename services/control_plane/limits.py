"""Request body size limit, as ASGI middleware: 413 before a large body is read into memory.

A declared Content-Length over the limit is refused at once; a chunked body is counted as it
arrives and refused when it passes the limit. Each route may have its own limit (the trainer's
metric batches are larger than anything a person sends).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from `receive` while the app reads the body: FastAPI passes HTTPExceptions through
    its body parsing (anything else would become a 400), so the app answers 413 itself."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body over the {limit}-byte limit")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str, str], int]) -> None:
        """`limit_for(method, path)` gives the limit in bytes for a request."""
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await _refuse(send, limit)


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body over the {limit}-byte limit"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def route_limits(*, default: int, metrics: int) -> Callable[[str, str], int]:
    metrics_post = re.compile(r"^/v1/jobs/[^/]+/metrics$")

    def limit_for(method: str, path: str) -> int:
        return metrics if method == "POST" and metrics_post.match(path) else default

    return limit_for
