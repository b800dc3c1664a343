"""`dflash control-plane`: the REST service that runs training jobs (FastAPI, served by uvicorn).

    dflash control-plane --db jobs.db --data-root output --checkpoint-root output/checkpoints
    dflash control-plane --host 0.0.0.0 --port 8600 --token-file /run/secrets/token --gpus 0,1,2,3

Then `curl http://127.0.0.1:8600/v1/jobs`, or open http://127.0.0.1:8600/docs. `--db` takes a
SQLite file or any SQLAlchemy URL. The bearer token comes from --token-file or
$DFLASH_CONTROL_PLANE_TOKEN (never a flag: flags show in `ps`). Every flag can also be set as
DFLASH_CONTROL_PLANE_<FLAG> (e.g. DFLASH_CONTROL_PLANE_DB). Stopping the service leaves running
trainers alone; the next start re-attaches them (docs/control_plane.md).
"""

from __future__ import annotations

import argparse

from services.cli.settings_args import add_settings_arguments, settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Settings are imported here only for their field list (pydantic-settings, no heavy imports).
    from services.control_plane.settings import ControlPlaneSettings

    add_settings_arguments(parser, ControlPlaneSettings, title="control plane")


def run(args: argparse.Namespace) -> int:
    import gc

    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from services.control_plane.main import create_app
    from services.control_plane.migrations import SchemaTooNew
    from services.control_plane.settings import ControlPlaneSettings
    from services.hidden_states.credentials import is_loopback

    settings = settings_from_args(ControlPlaneSettings, args)
    if settings is None:
        return 2
    if settings.token is None and not is_loopback(settings.host):
        if not settings.insecure:
            print(
                f"error: --host {settings.host} lets other machines submit and cancel jobs, and no token is "
                "set: give one with --token-file FILE (or $DFLASH_CONTROL_PLANE_TOKEN), or pass --insecure"
            )
            return 2
        print(f"warning: --insecure: anyone who reaches {settings.host}:{settings.port} may run jobs here")
    try:
        app = create_app(settings)
    except (SchemaTooNew, SQLAlchemyError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    # The app, its imports (torch among them) and its state live as long as the process: freezing
    # them keeps every full garbage collection from walking ~230k objects (a 100-200 ms pause,
    # and so every request's p99, under load).
    gc.collect()
    gc.freeze()
    print(f"control plane on {settings.own_url} (API docs: {settings.own_url}/docs)", flush=True)
    # timeout_graceful_shutdown: live streams (SSE, log follow) never end on their own.
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=5)
    return 0
