"""Metric sinks behind one interface, `log(metrics, step)`, and `build_metric_sinks` to pick them.

Metric names use a `train/` or `val/` prefix; per-slot accuracy is `train/acc_slot_{k}` for
k = 1..B-1 and the acceptance length is `train/eal` (1 + leading run of correct slots, vLLM's
convention).

Where they go (--report-to, rank 0 only): the log always; `jsonl` <save_path>/metrics.jsonl;
`tensorboard` <save_path>/tensorboard; `wandb`, `trackio`, `mlflow` when asked for and installed;
and the control plane when --control-plane-url and --job-id are set. The sinks themselves live in
`services.trainer.metric_sinks`, one module per backend.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dflash_core.config import TrainConfig
from services.trainer.metric_sinks.base import MetricSink, MetricSinks
from services.trainer.metric_sinks.control_plane import ControlPlaneSink, read_token
from services.trainer.metric_sinks.jsonl import JsonlSink
from services.trainer.metric_sinks.log_line import LoggingSink
from services.trainer.metric_sinks.mlflow import MlflowSink
from services.trainer.metric_sinks.tensorboard import TensorBoardSink
from services.trainer.metric_sinks.trackio import TrackioSink
from services.trainer.metric_sinks.wandb import WandbSink

__all__ = [
    "ControlPlaneSink",
    "JsonlSink",
    "LoggingSink",
    "MetricBackendMissing",
    "MetricSink",
    "MetricSinks",
    "MlflowSink",
    "TensorBoardSink",
    "TrackioSink",
    "WandbSink",
    "build_metric_sinks",
    "check_backends_installed",
]

# --report-to value -> the module it imports, which is also the pip package that provides it.
BACKEND_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


class MetricBackendMissing(ImportError):
    """--report-to names a tracker whose package is not installed."""


def check_backends_installed(report_to: list[str]) -> None:
    """Fail now, naming the pip package, rather than at the first metric row of a long run."""
    missing = [
        BACKEND_PACKAGES[name]
        for name in dict.fromkeys(report_to)
        if name in BACKEND_PACKAGES and importlib.util.find_spec(BACKEND_PACKAGES[name]) is None
    ]
    if missing:
        raise MetricBackendMissing(
            f"--report-to {' '.join(report_to)} needs {', '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)} (or leave {', '.join(missing)} out of --report-to)"
        )


def build_metric_sinks(config: TrainConfig, *, rank: int) -> MetricSinks:
    """The sinks `config` asks for. Rank 0 gets them (and the log line always); other ranks get none.

    Every rank checks the packages and the token file, so a missing one stops all ranks at
    start-up instead of leaving the others waiting in a collective.
    """
    check_backends_installed(list(config.report_to))
    token = read_token(config.control_plane_token_file) if config.control_plane_url else None
    if rank != 0:
        return MetricSinks([])
    save_path = Path(config.save_path)
    run_name = config.run_name or config.job_id
    run_config = config.model_dump(mode="json")
    sinks: list[MetricSink] = [LoggingSink()]
    try:
        for backend in dict.fromkeys(config.report_to):
            if backend == "jsonl":
                sinks.append(JsonlSink(save_path / "metrics.jsonl"))
            elif backend == "tensorboard":
                sinks.append(TensorBoardSink(save_path / "tensorboard"))
            elif backend == "wandb":
                sinks.append(WandbSink(run_name=run_name, run_config=run_config, directory=save_path))
            elif backend == "trackio":
                sinks.append(TrackioSink(run_name=run_name, run_config=run_config))
            elif backend == "mlflow":
                sinks.append(MlflowSink(run_name=run_name, run_config=run_config))
        if config.control_plane_url and config.job_id:
            sinks.append(ControlPlaneSink(url=config.control_plane_url, job_id=config.job_id, token=token))
    except BaseException:
        MetricSinks(sinks).close()  # a tracker that failed to start must not leave the others open
        raise
    return MetricSinks(sinks)
