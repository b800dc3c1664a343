"""The bearer token: required on every mutating route and on checkpoint downloads when configured.

    Authorization: Bearer <token>

No header (or not a bearer one): 401 with `WWW-Authenticate: Bearer`; a wrong token: 403. The
comparison takes the same time whatever the token, and the token is never echoed, logged or
stored. Without a configured token every route is open (the embedded default on 127.0.0.1).
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status


def check_bearer(request: Request, token: str | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="this route needs `Authorization: Bearer <token>` (the control plane's token)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN, detail="the bearer token is not this control plane's"
        )
