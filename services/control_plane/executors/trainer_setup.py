"""What every executor hands a trainer: its environment and its config file in the job's folder."""

from __future__ import annotations

import os

import yaml

from dflash_core.config import TrainConfig
from dflash_core.config_args import ENV_SWITCH
from services.control_plane.executors.base import TrainerJob
from services.control_plane.job_logs import JobFiles
from services.trainer.metric_sinks.control_plane import TOKEN_ENV


def trainer_environment(token: str | None) -> dict[str, str]:
    """This process's environment for a trainer: our token out, the job attempt's `token` in."""
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    # A job's config is its YAML file alone: without the switch, DFLASH_<FIELD> variables on the
    # control plane's or agent's host are inert in the trainer (dflash_core/config_args.py).
    env.pop(ENV_SWITCH, None)
    if token is not None:
        env[TOKEN_ENV] = token
    return env


def write_trainer_config(job: TrainerJob, files: JobFiles, *, nproc: int | None) -> TrainConfig:
    """The job's config as the YAML its trainer reads (`files.trainer_config`); returns it parsed
    back, as the trainer will see it. `nproc`: the trainer's processes (per node), when known."""
    config = job.train_config()
    if job.attempt > 1:
        # A resume continues from <save_path>/latest, whatever the first attempt asked for.
        config = config.model_copy(update={"resume": True})
    fields = config.model_dump(mode="json", exclude={"control_plane_url", "job_id"})
    if nproc is not None:
        fields["nproc"] = nproc
    files.trainer_config.write_text(yaml.safe_dump(fields, sort_keys=True))
    return TrainConfig.model_validate(yaml.safe_load(files.trainer_config.read_text()))
