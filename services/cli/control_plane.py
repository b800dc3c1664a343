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
import typing
from pathlib import Path
from typing import Any

from services.cli.args import strip_optional

# The settings field that is never a flag.
SECRET_FIELDS = {"token"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Settings are imported here only for their field list (pydantic-settings, no heavy imports).
    from services.control_plane.settings import ControlPlaneSettings

    group = parser.add_argument_group("control plane")
    for name, field in ControlPlaneSettings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        annotation = strip_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        default = field.get_default(call_default_factory=True)
        kwargs["help"] = f"{field.description} (default: {default})"
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        elif annotation in (int, float, Path):
            kwargs["type"] = annotation
        # str, and `--gpus 0,1,2` (parsed by the settings' validator)
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from services.cli.args import format_validation_error
    from services.control_plane.main import create_app
    from services.control_plane.migrations import SchemaTooNew
    from services.control_plane.settings import ControlPlaneSettings

    given = {
        name: getattr(args, name)
        for name in ControlPlaneSettings.model_fields
        if name not in SECRET_FIELDS and name in vars(args)
    }
    try:
        settings = ControlPlaneSettings(**given)  # flags > DFLASH_CONTROL_PLANE_* > defaults
        app = create_app(settings)
    except ValidationError as exc:
        print(format_validation_error(exc))
        return 2
    except (SchemaTooNew, SQLAlchemyError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"control plane on {settings.own_url} (API docs: {settings.own_url}/docs)", flush=True)
    # timeout_graceful_shutdown: live streams (SSE, log follow) never end on their own.
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=5)
    return 0
