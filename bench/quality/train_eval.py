"""One drafter of the quality benchmark, in its own process: train for a wall-clock budget, then tau.

`train_and_eval(job)` is the target of a spawned process (one per block size, run side by side on
the one GPU). What it does:

1. Timing run: `run_training` for `calibration_steps` optimizer steps (its own short warmup and
   cosine). The wall time between its last log lines gives the pace of a step, the rest of its
   wall time the cost of starting a run (data, verifier, compilation, validation, checkpoint).
2. Main run: `run_training` from the timing run's weights (`--from-pretrained`: fresh AdamW and
   schedule) with `max_steps` set to the steps that fit what is left of the budget, so the cosine
   schedule ends when the budget does. TrainConfig has no time limit, so the budget is kept by the
   step count; a watchdog sends this process SIGTERM at the deadline (plus a grace period) should
   the estimate be off: the trainer then stops after its current step with a checkpoint.
3. tau: `run_evaluation` (dflash_core.evaluation, transformers engine, greedy) of the final weights
   (`<save>/latest`) on the held-out prompts, without the baseline (speed is measured later, by
   the parent, with the GPU to itself).

The budget counts from the first `run_training` call: loading, compilation, the timing run and
every validation are inside it, as they would be in `dflash train`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("quality.train")


@dataclass
class TrainJob:
    """Everything a child needs (picklable: it crosses a spawn)."""

    block_size: int
    workdir: Path  # this drafter's folder: calib/, main/, eval.json, result.json
    log_file: Path
    budget_s: float  # training wall time, from the first run_training call to the end of the main run
    train: dict[str, Any]  # TrainConfig fields shared by both runs (no block_size/save_path/max_steps)
    eval: dict[str, Any]  # EvalConfig fields (no checkpoint)
    calibration_steps: int
    threads: int
    grace_s: float = 20.0
    notes: list[str] = field(default_factory=list)


def _setup_logging(log_file: Path, block_size: int) -> None:
    fmt = logging.Formatter(f"%(asctime)s b{block_size} %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.FileHandler(log_file, mode="a"), logging.StreamHandler()):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _log_rows(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def step_pace(metrics: Path) -> float | None:
    """Wall seconds per optimizer step between the first and the last training log line.

    The first window holds compilation and warm-up; later windows are the steady pace (the
    validation at an epoch end falls between two log lines too, so it is counted in).
    """
    rows = [r for r in _log_rows(metrics) if r.get("train/loss") is not None and "time" in r]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    steps = last["step"] - first["step"]
    return (last["time"] - first["time"]) / steps if steps > 0 else None


def final_metrics(metrics: Path) -> dict[str, float]:
    """The last value of each train/ and val/ metric in metrics.jsonl."""
    out: dict[str, float] = {}
    for row in _log_rows(metrics):
        for key, value in row.items():
            if key.startswith(("train/", "val/")) and isinstance(value, (int, float)):
                out[key] = float(value)
    return out


def plans_and_samples(config: Any, steps: int) -> tuple[int, int, float]:
    """(train rows, samples trained in `steps` steps, epochs) from the trainer's own deterministic plan."""
    from dflash_core.data.prepare import load_prepared
    from services.trainer.data import plan_epoch, split_indices

    dataset, _ = load_prepared(config.data_path)
    lengths = [min(len(ids), config.total_seq_len) for ids in dataset["input_ids"]]
    train, _ = split_indices(len(lengths), val_fraction=config.val_fraction, seed=config.seed)
    samples, epochs, left = 0, 0.0, steps
    epoch = 0
    while left > 0:
        plan = plan_epoch(
            train,
            [lengths[i] for i in train],
            epoch=epoch,
            seed=config.seed,
            total_seq_len=config.total_seq_len,
            batch_size=config.batch_size,
        )
        taken = plan.steps[:left]
        samples += sum(len(row) for step in taken for row in step)
        epochs += len(taken) / max(1, len(plan.steps))
        left -= len(taken)
        epoch += 1
    return len(train), samples, epochs


def epochs_for(config: Any, steps: int) -> int:
    """Epochs enough for `steps` optimizer steps, so `max_steps` is what ends the run.

    One spare epoch: packing differs a little between epochs' shuffles. (The trainer plans every
    epoch of `epochs` up front, so a huge number would cost time.)
    """
    return math.ceil(steps / steps_per_epoch(config)) + 1


def steps_per_epoch(config: Any) -> int:
    from dflash_core.data.prepare import load_prepared
    from services.trainer.data import plan_epoch, split_indices

    dataset, _ = load_prepared(config.data_path)
    lengths = [min(len(ids), config.total_seq_len) for ids in dataset["input_ids"]]
    train, _ = split_indices(len(lengths), val_fraction=config.val_fraction, seed=config.seed)
    plan = plan_epoch(
        train, [lengths[i] for i in train], epoch=0, seed=config.seed,
        total_seq_len=config.total_seq_len, batch_size=config.batch_size,
    )  # fmt: skip
    return max(1, len(plan.steps))


class Deadline:
    """SIGTERM to this process at `at` (time.time()), once the trainer's stop handler is installed.

    Before `StopSignals` takes SIGTERM over, the signal would kill the process, so the watchdog
    waits for the handler. `cancel()` disarms it.
    """

    def __init__(self, at: float) -> None:
        self.at = at
        self.fired = False
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="deadline", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        if self._cancel.wait(max(0.0, self.at - time.time())):
            return
        while signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            if self._cancel.wait(0.5):
                return
        logger.warning("training budget reached: asking the trainer to stop after this step")
        self.fired = True
        os.kill(os.getpid(), signal.SIGTERM)

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join()


def train_and_eval(job: TrainJob) -> None:
    """The spawned process: timing run, main run, tau. Writes `<workdir>/result.json`."""
    _setup_logging(job.log_file, job.block_size)
    import torch

    torch.set_num_threads(job.threads)
    result: dict[str, Any] = {"block_size": job.block_size, "notes": list(job.notes)}
    out = job.workdir / "result.json"
    try:
        _run(job, result, out=out)
    except BaseException as exc:
        logger.exception("block %d failed", job.block_size)
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        out.write_text(json.dumps(result, indent=1) + "\n")


def _run(job: TrainJob, result: dict[str, Any], *, out: Path) -> None:
    from dflash_core.config import TrainConfig
    from dflash_core.eval_config import EvalConfig
    from dflash_core.evaluation import run_eval
    from services.trainer.main import run_training

    started = time.time()
    deadline = started + job.budget_s

    # 1. timing run
    calib = TrainConfig(
        **{**job.train, "warmup_steps": max(1, job.calibration_steps // 2)},
        block_size=job.block_size,
        save_path=job.workdir / "calib",
        max_steps=job.calibration_steps,
    )
    calib = calib.model_copy(update={"epochs": epochs_for(calib, job.calibration_steps)})
    calib_result = run_training(calib)
    calib_s = time.time() - started
    pace = step_pace(calib.save_path / "metrics.jsonl")
    done = calib_result.state.global_step
    if pace is None:  # too few log lines: fall back to the whole run's average (an overestimate)
        pace = calib_s / max(1, done)
    overhead = max(0.0, calib_s - done * pace)
    # The main run starts faster: flex_attention and the block mask are compiled once per process
    # and the page cache is warm. Half the timing run's start-up (at least 10 s, or all of it when
    # shorter) is the guess; 5% spare covers the epoch ends (validation, checkpoint).
    startup = max(0.5 * overhead, min(overhead, 10.0))
    left = deadline - time.time()
    main_steps = max(1, int(0.95 * (left - startup) / pace))
    logger.info(
        "timing run: %d steps in %.1f s (%.3f s/step steady, %.1f s start-up); %.0f s left -> %d steps",
        done, calib_s, pace, overhead, left, main_steps,
    )  # fmt: skip
    result.update(
        calibration_steps=done,
        calibration_s=calib_s,
        step_s=pace,
        startup_s=overhead,
        planned_steps=main_steps,
    )

    # 2. main run, ended by max_steps (the watchdog only if the estimate was off)
    warmup = min(job.train.get("warmup_steps", 50), max(1, main_steps // 10))
    main = TrainConfig(
        **{**job.train, "warmup_steps": warmup},
        block_size=job.block_size,
        save_path=job.workdir / "main",
        max_steps=main_steps,
        from_pretrained=_resolve(calib.save_path / "latest"),
    )
    main = main.model_copy(update={"epochs": epochs_for(main, main_steps)})
    watchdog = Deadline(deadline + job.grace_s)
    try:
        main_result = run_training(main)
    finally:
        watchdog.cancel()
    train_s = time.time() - started
    steps = main_result.state.global_step
    rows, samples, epochs = plans_and_samples(main, steps)
    result.update(
        main_steps=steps,
        stopped_by=main_result.state.stopped_by,
        stopped_by_watchdog=watchdog.fired,
        train_s=train_s,
        train_rows=rows,
        samples_trained=samples + plans_and_samples(calib, done)[1],
        epochs=epochs,
        checkpoint=str(_resolve(main.save_path / "latest")),
        final=final_metrics(main.save_path / "metrics.jsonl"),
        train_config=json.loads(main.model_dump_json()),
    )
    logger.info(
        "trained %d + %d steps in %.1f s (%.2f epochs of %d rows in the main run)",
        done,
        steps,
        train_s,
        epochs,
        rows,
    )

    out.write_text(json.dumps(result, indent=1) + "\n")  # kept should the evaluation be cut short

    # 3. tau on the held-out prompts (no baseline: the other drafter shares the GPU now)
    t0 = time.time()
    report = run_eval(EvalConfig(**job.eval, checkpoint=_resolve(main.save_path / "latest"), baseline=False))
    result["eval"] = report.to_json()
    result["eval_s"] = time.time() - t0
    logger.info("tau (block %d) = %.3f over %d prompts", job.block_size, report.tau, report.num_prompts)


def _resolve(path: Path) -> Path:
    return path.resolve() if path.exists() else path
