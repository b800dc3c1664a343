"""What keeps web pages in a user's browser away from a control plane that has no token.

A control plane without a token trusts whoever reaches it, which on 127.0.0.1 is only this host's
users, except through their browsers: any page may send simple cross-site requests (forms, `fetch`
without preflight) to 127.0.0.1, and a DNS-rebinding page may even read the answers. So, while no
token is set:

- the Host header must name this control plane (loopback names, the bound host, the public URL's
  host, or --allowed-hosts); a rebound page's Host is its own domain, refused with 421;
- a state-changing request (POST, PUT, PATCH, DELETE) must carry `Content-Type: application/json`
  or the `X-DFlash-Client` header, which a page can send cross-site only after a CORS preflight
  that this service never grants; otherwise 403, before any route or body is read.

With a token the bearer header does this work (browsers never attach it on their own). An ASGI
middleware, so the checks run before FastAPI parses anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

CLIENT_HEADER = "X-DFlash-Client"
_UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def allowed_hosts(*, bind_host: str, public_url: str | None, extra: Iterable[str]) -> set[str]:
    hosts = set(_LOOPBACK_NAMES) | {h.strip().lower() for h in extra if h.strip()}
    if bind_host not in ("0.0.0.0", "::", ""):
        hosts.add(bind_host.lower())
    if public_url:
        name = urlsplit(public_url).hostname
        if name:
            hosts.add(name.lower())
    return hosts


def host_name(header: str) -> str:
    """`example.org:8600` -> `example.org`; `[::1]:8600` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BrowserGuard:
    def __init__(self, app: Any, *, token_set: bool, hosts: set[str]) -> None:
        self.app, self.token_set = app, token_set
        self.hosts = {host_name(h) for h in hosts}
        self.any_host = "*" in hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.token_set:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._problem(scope["method"], headers)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, detail = problem
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _problem(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        if not self.any_host and host_name(headers.get("host", "")) not in self.hosts:
            return 421, (
                f"Host {headers.get('host', '')!r} is not this control plane's: with no token set it answers "
                "only to its own names (add others with --allowed-hosts, or set a token)"
            )
        if method in _UNSAFE_METHODS and "authorization" not in headers:
            json_body = headers.get("content-type", "").split(";")[0].strip() == "application/json"
            if not json_body and CLIENT_HEADER.lower() not in headers:
                return 403, (
                    "a state-changing request needs `Content-Type: application/json` or an "
                    f"`{CLIENT_HEADER}` header (a cross-site page cannot send either without a preflight "
                    "this service refuses)"
                )
        return None
