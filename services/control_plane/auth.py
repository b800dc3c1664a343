"""The bearer token on every route but `/healthz` and the dashboard's files, checked first.

An ASGI middleware, outside the body size limit: a request without a valid token for its route is
answered before a byte of its body is read or parsed (401 without a token, 403 with a wrong one or
one outside its scope; access.py says which token reaches which route, credentials.py whose a
token is). A request that passes carries its Principal in the scope, for the routes that check
more once the body is read (an agent registering under its own name).

Without an admin token nothing is checked here (browser_guard.py keeps such a control plane to
its own host and clients).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from services.control_plane.access import Access, access_for, refusal, trainer_attempt_refusal
from services.control_plane.credentials import Credentials, Principal, Role, Unauthenticated, UnknownToken

PRINCIPAL_KEY = "dflash.principal"  # in the ASGI scope of a request that passed
NEEDS_TOKEN = "this route needs `Authorization: Bearer <token>` (a token of this control plane)"


def principal_of(scope: Scope) -> Principal | None:
    return scope.get(PRINCIPAL_KEY)


def flat_routes(routes: Sequence[BaseRoute]) -> list[Any]:
    """Every route of an app, those of included routers too: newer FastAPI keeps each included
    router as one entry of `app.routes` (iter_route_contexts opens them), older ones list the
    routes themselves. Each has `path`, `methods`, `path_regex` and `param_convertors`."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(routes)
    return list(iter_route_contexts(routes))


def matched_route(routes: list[Any], path: str, method: str) -> tuple[str | None, dict[str, str]]:
    """The path template of the route a request reaches, and its path parameters; (None, {})
    when no route has this path. A route whose path matches but not its method counts as that
    route (it answers 405, but only to someone allowed to know it exists)."""
    partial: tuple[str | None, dict[str, str]] = (None, {})
    for route in routes:
        found = route.path_regex.match(path)
        if found is None:
            continue
        params = {k: route.param_convertors[k].convert(v) for k, v in found.groupdict().items()}
        if route.methods is None or method in route.methods or (method == "HEAD" and "GET" in route.methods):
            return route.path, params
        if partial[0] is None:
            partial = route.path, params
    return partial


class RequireToken:
    def __init__(
        self,
        app: ASGIApp,
        *,
        credentials: Credentials,
        routes: Sequence[BaseRoute],
        attempt_of: Callable[[str], int | None],
    ) -> None:
        """`attempt_of(job_id)`: the job's current attempt (None for no such job), to refuse
        the token of a trainer whose attempt is over."""
        self.app = app
        self.credentials = credentials
        self._app_routes = routes  # read at the first request: every route is added by then
        self._routes: list[Any] | None = None
        self.attempt_of = attempt_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.credentials.enabled:
            await self.app(scope, receive, send)
            return
        if self._routes is None:
            self._routes = flat_routes(self._app_routes)
        method = scope["method"]
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        template, params = matched_route(self._routes, path, method)
        access = access_for(method, template)
        if access is Access.OPEN:  # whatever it carries: a stale token must not fail a health check
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        try:
            principal = self.credentials.identify(header)
        except Unauthenticated:
            await _refuse(send, 401, NEEDS_TOKEN)
            return
        except UnknownToken:
            await _refuse(send, 403, "the bearer token is not one of this control plane's")
            return
        problem = refusal(principal, access, params, method=method, path=template or path)
        if problem is None and principal.role is Role.TRAINER:
            attempt = await run_in_threadpool(self.attempt_of, params.get("job_id", ""))
            problem = trainer_attempt_refusal(principal, attempt)
        if problem is not None:
            await _refuse(send, 403, problem)
            return
        scope[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
