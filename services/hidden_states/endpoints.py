"""Service addresses as users write them, and the channels that reach them.

The tutorial points the trainer at `--vllm-endpoint http://localhost:8000/v1` (vLLM's OpenAI URL);
our service speaks gRPC on that host and port, so the scheme and path are dropped:

    parse_endpoint("http://localhost:8000/v1") == "localhost:8000"
    parse_endpoint("10.0.0.5:8000")            == "10.0.0.5:8000"
"""

from __future__ import annotations

from urllib.parse import urlsplit

import grpc

from dflash_core.wire.codec import MAX_MESSAGE_BYTES
from services.hidden_states.credentials import client_credentials, secure_channel

# Both ends raise gRPC's 4 MiB default; frames stay well below this (docs/architecture.md).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Notice a dead peer within ~30 s even when no data moves.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC's own reconnect backoff grows to 120 s by default; the trainer's retry loop and
    # circuit breaker decide how hard to try, so the channel must not sit out a restart.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def parse_endpoint(endpoint: str) -> str:
    """`host:port` from `host:port`, `grpc://host:port` or `http(s)://host:port/anything`."""
    text = endpoint.strip()
    if "://" not in text:
        text = "grpc://" + text
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"endpoint {endpoint!r}: {exc}") from None
    if not parts.hostname or port is None:
        raise ValueError(f"endpoint {endpoint!r} must name a host and a port, e.g. 127.0.0.1:8000")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def open_channel(address: str) -> grpc.Channel:
    """A channel to a hidden-state service, with the credentials the environment gives
    (services/hidden_states/credentials.py: the token on every call, TLS when a CA is set)."""
    return secure_channel(address, CHANNEL_OPTIONS, client_credentials())
