"""MLflow (`pip install mlflow`): the tracking server or store from $MLFLOW_TRACKING_URI; the
experiment from $MLFLOW_EXPERIMENT_NAME (or _ID), else `dflash`."""

from __future__ import annotations

import os
from typing import Any


class MlflowSink:
    def __init__(self, *, run_name: str | None, run_config: dict[str, Any]) -> None:
        import mlflow

        self._mlflow = mlflow
        if not (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
            mlflow.set_experiment("dflash")
        self.run_id: str = mlflow.start_run(run_name=run_name).info.run_id
        mlflow.log_params(run_config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()
