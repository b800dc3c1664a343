"""Server-Sent Events framing (text/event-stream), for the live metric and log streams.

Browsers' EventSource reconnects by itself and sends the last `id:` it saw as `Last-Event-ID`;
the streams resume from there.
"""

from __future__ import annotations

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
KEEPALIVE = ": keep-alive\n\n"
KEEPALIVE_S = 15.0


def event(data: str, *, name: str | None = None, event_id: str | int | None = None) -> str:
    lines = []
    if name is not None:
        lines.append(f"event: {name}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return "\n".join(lines) + "\n\n"


def last_event_id(header: str | None) -> int | None:
    if header is None or not header.strip().isdigit():
        return None
    return int(header.strip())
