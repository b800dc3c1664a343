"""The web dashboard: static files in `static/`, served by the control plane itself.

    mount_dashboard(app)        # in create_app(), after the API routers

Pages (one HTML shell; app.js routes by path, with client-side routing, to one module per view):

    /                  jobs.js: jobs table: state, progress, ETA, created, GPUs; filter by state
    /jobs/<id>         job.js: live charts (Server-Sent Events), logs, checkpoints, config, actions
    /new[?from=<id>]   new-job.js: a JSON TrainConfig plus name and GPUs; 422s shown by field
    /services          services.js: hidden-state services (gRPC health, what they serve), agents

Assets are under /dashboard/: ES modules loaded by the browser as they are (no build step; shared
ones: api.js, meta.js, dom.js, format.js, plot.js the SVG charts), and style.css. Nothing is loaded
from another host, so the dashboard works offline. Everything it shows comes from the public /v1
API; what it would otherwise repeat from the server (job states, the example config) it reads
from /v1/meta.
These files are open to anyone; with a token configured, every API call needs it: the user
enters it once, the tab keeps it in sessionStorage (gone when the tab closes) and sends it as
`Authorization: Bearer` on every request, live streams included (stream.js reads them with
fetch(), as EventSource cannot send a header). It never goes into a URL.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import Response

STATIC = Path(__file__).resolve().parent / "static"
PAGES = ("/", "/new", "/jobs/{job_id}", "/services")  # client-side routes: each serves index.html
ASSET_ROUTE = "/dashboard/{name}"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
IfNoneMatch = Annotated[str | None, Header()]  # the ETag the browser has (a 304 when it is current)


class Asset:
    """One file, read once; answered with an ETag so a reload costs a 304 (and an upgrade is seen
    at once: `no-cache` makes the browser ask every time instead of guessing freshness)."""

    def __init__(self, path: Path) -> None:
        self.body = path.read_bytes()
        self.media_type = f"{MEDIA_TYPES[path.suffix]}; charset=utf-8"
        self.etag = f'"{hashlib.sha256(self.body).hexdigest()[:16]}"'

    def response(self, if_none_match: str | None) -> Response:
        headers = {"ETag": self.etag, "Cache-Control": "no-cache"}
        if if_none_match == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at `/` (and its client-side routes) and its assets under `/dashboard/`.

    Plain routes rather than a static mount, so the Prometheus request metrics label them by route
    like every other request."""
    assets = {path.name: Asset(path) for path in STATIC.iterdir() if path.suffix in MEDIA_TYPES}
    index = assets.pop("index.html")

    async def page(if_none_match: IfNoneMatch = None) -> Response:
        return index.response(if_none_match)

    async def asset(name: str, if_none_match: IfNoneMatch = None) -> Response:
        if name not in assets:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return assets[name].response(if_none_match)

    for path in PAGES:
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
    app.add_api_route(ASSET_ROUTE, asset, methods=["GET"], include_in_schema=False)
