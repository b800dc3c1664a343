"""Metric sinks, one module per backend; `services.trainer.metrics` picks them from the config.

    base.py           the `MetricSink` interface and `MetricSinks`, the fan-out over sinks
    jsonl.py          <save_path>/metrics.jsonl
    log_line.py       a compact line in the log
    tensorboard.py    <save_path>/tensorboard event files
    wandb.py          Weights & Biases (`pip install wandb`)
    trackio.py        Trackio (`pip install trackio`)
    mlflow.py         MLflow (`pip install mlflow`)
    control_plane.py  rows POSTed to the control plane from a background thread

Third-party trackers are imported inside their sink's constructor, so a run that does not ask
for one never imports it.
"""
