"""One drafter of the quality benchmark, in its own process: train for a wall-clock budget, then tau.

`train_and_eval(job)` is the target of a spawned process (one per block size, run side by side on
the one GPU). The budget may span several commands (one command on the lent H200 may run 10
minutes, the issue's budget is 20): `<workdir>/progress.json` carries what is done from one
command to the next, and every phase picks up where the last command left it.

1. Timing run: `run_training` for `calibration_steps` optimizer steps (its own short warmup and
   cosine). The wall time between its last log lines gives the pace of a step, the rest of its
   wall time the cost of starting a run (data, verifier, compilation, validation, checkpoint).
2. Main run: `run_training` from the timing run's weights (`--from-pretrained`: fresh AdamW and
   schedule) with `max_steps` set to the steps that fit what is left of the budget (minus one
   start-up per command it will take), so the cosine schedule ends when the budget does. Its
   config is kept in progress.json; a later command runs the same config and `run_training`
   resumes it exactly from `<main>/latest`. A watchdog sends this process SIGTERM at the end of
   the command's share (or of the budget, should the estimate be off): the trainer then stops
   after its current step with a checkpoint.
3. tau: `run_evaluation` (dflash_core.evaluation, transformers engine, greedy) of the final weights
   (`<main>/latest`) on the held-out prompts, without the baseline (speed is measured later, by
   the parent, with the GPU to itself), in the command where training ends when the evaluation
   fits, else in the next.

The budget counts from the first `run_training` call of each command: loading, compilation, the
timing run and every validation are inside it, as they would be in `dflash train`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("quality.train")


@dataclass
class TrainJob:
    """Everything a child needs (picklable: it crosses a spawn)."""

    block_size: int
    workdir: Path  # this drafter's folder: calib/, main/, progress.json, result.json
    log_file: Path
    budget_s: float  # training wall time over all commands, run_training calls end to end
    command_end: float  # time.time() by which this command's training and tau must be over
    command_s: float  # the wall time of one whole command: how many commands the budget needs
    train: dict[str, Any]  # TrainConfig fields shared by both runs (no block_size/save_path/max_steps)
    eval: dict[str, Any]  # EvalConfig fields (no checkpoint): the held-out prompts of another source
    eval_chitchat: dict[str, Any] | None  # the same on chitchat prompts held out of training
    eval_s: float  # what the tau runs are expected to take (they start only when they fit)
    calibration_steps: int
    threads: int
    known_pace: float | None = None  # seconds per step: skip the timing run (its process start-up)
    known_startup: float = 120.0  # with known_pace: seconds a command's trainer takes to its first step
    grace_s: float = 20.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Progress:
    """What earlier commands did for this drafter (`<workdir>/progress.json`)."""

    train_s: float = 0.0  # training wall time spent, all commands
    commands: int = 0  # commands that trained
    calibration: dict[str, Any] | None = None  # steps, seconds, pace, start-up of the timing run
    main_config: dict[str, Any] | None = None  # the main run's TrainConfig, identical in every command
    main_steps_done: int = 0
    main_done: bool = False
    stopped_by_budget: bool = False  # the budget ran out before max_steps (the estimate was off)

    @classmethod
    def load(cls, path: Path) -> Progress:
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1, default=str) + "\n")


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
    """The last value of each train/, val/ and eval/ (live tau) metric in metrics.jsonl."""
    out: dict[str, float] = {}
    for row in _log_rows(metrics):
        for key, value in row.items():
            if key.startswith(("train/", "val/", "eval/")) and isinstance(value, (int, float)):
                out[key] = float(value)
    return out


class EpochPlans:
    """The trainer's own deterministic epoch plans for `config`'s data (what `run_training` follows)."""

    def __init__(self, config: Any) -> None:
        from dflash_core.data.prepare import load_prepared
        from services.trainer.batches import TokenRows
        from services.trainer.data import split_indices

        self.config = config
        self.lengths = TokenRows(load_prepared(config.data_path)[0], max_length=config.total_seq_len).lengths
        self.train, _ = split_indices(len(self.lengths), val_fraction=config.val_fraction, seed=config.seed)

    def steps(self, epoch: int) -> list:
        from services.trainer.data import plan_epoch

        config = self.config
        return plan_epoch(
            self.train, [self.lengths[i] for i in self.train], epoch=epoch, seed=config.seed,
            total_seq_len=config.total_seq_len, batch_size=config.batch_size,
        ).steps  # fmt: skip


def plans_and_samples(config: Any, steps: int) -> tuple[int, int, float]:
    """(train rows, samples trained in `steps` steps, epochs) from the trainer's own deterministic plan."""
    plans = EpochPlans(config)
    samples, epochs, left, epoch = 0, 0.0, steps, 0
    while left > 0:
        planned = plans.steps(epoch)
        if not planned:  # no training rows: nothing was trained
            break
        taken = planned[:left]
        samples += sum(len(row) for step in taken for row in step)
        epochs += len(taken) / max(1, len(planned))
        left -= len(taken)
        epoch += 1
    return len(plans.train), samples, epochs


def epochs_for(config: Any, steps: int) -> int:
    """Epochs enough for `steps` optimizer steps, so `max_steps` is what ends the run.

    One spare epoch: packing differs a little between epochs' shuffles. (The trainer plans every
    epoch of `epochs` up front, so a huge number would cost time.)
    """
    return math.ceil(steps / max(1, len(EpochPlans(config).steps(0)))) + 1


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
        logger.warning("stop time reached (budget or command): asking the trainer to stop after this step")
        self.fired = True
        os.kill(os.getpid(), signal.SIGTERM)

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join()


def train_and_eval(job: TrainJob) -> None:
    """The spawned process: timing run, main run (or their rest), tau. Writes `<workdir>/result.json`."""
    _setup_logging(job.log_file, job.block_size)
    import torch

    torch.set_num_threads(job.threads)
    out = job.workdir / "result.json"
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    result.update(block_size=job.block_size, notes=list(job.notes))
    result.pop("error", None)
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

    state_file = job.workdir / "progress.json"
    progress = Progress.load(state_file)
    trained_now = not progress.main_done
    if progress.calibration is None:
        _calibrate(job, progress)
        progress.save(state_file)
        if progress.calibration is None:
            return  # the timing run was cut short by this command's end: the next one repeats it
    if not progress.main_done:
        main = TrainConfig.model_validate(progress.main_config)
        _train_main(job, progress, main)
        progress.save(state_file)
    main = TrainConfig.model_validate(progress.main_config)
    calib = progress.calibration
    rows, samples, epochs = plans_and_samples(main, progress.main_steps_done)
    result.update(
        calibration_steps=calib["steps"],
        calibration_s=calib["seconds"],
        step_s=calib["pace"],
        startup_s=calib["startup"],
        planned_steps=main.max_steps,
        main_steps=progress.main_steps_done,
        main_done=progress.main_done,
        stopped_by_budget=progress.stopped_by_budget,
        commands=progress.commands,
        train_s=progress.train_s,
        train_rows=rows,
        samples_trained=samples + calib["samples"],
        epochs=epochs,
        checkpoint=str(_resolve(main.save_path / "latest")),
        final=final_metrics(main.save_path / "metrics.jsonl"),
        train_config=json.loads(main.model_dump_json()),
    )
    out.write_text(json.dumps(result, indent=1) + "\n")  # kept should the evaluation be cut short
    if not progress.main_done or "eval" in result:
        return
    # A command that trained may leave tau to the next one; a command that only evaluates runs it
    # whatever its time (a next command would not have more).
    if trained_now and time.time() + job.eval_s > job.command_end:
        logger.info(
            "block %d: trained; tau is left to the next command (%.0f s needed)", job.block_size, job.eval_s
        )
        return
    _evaluate(job, result, checkpoint=_resolve(main.save_path / "latest"))


def _calibrate(job: TrainJob, progress: Progress) -> None:
    """The pace of a step (a timing run, or `job.known_pace`), then the main run's plan."""
    from dflash_core.config import TrainConfig

    if job.known_pace is not None:
        progress.calibration = dict(
            steps=0, seconds=0.0, pace=job.known_pace, startup=job.known_startup, samples=0, measured=False
        )
        _plan_main(job, progress, first_startup=job.known_startup, from_pretrained=None)
        return
    calib = TrainConfig(
        **{**job.train, "warmup_steps": max(1, job.calibration_steps // 2)},
        block_size=job.block_size,
        save_path=job.workdir / "calib",
        max_steps=job.calibration_steps,
        resume=False,
    )
    calib = calib.model_copy(update={"epochs": epochs_for(calib, job.calibration_steps)})
    timing = _timing_run(calib)
    progress.train_s += timing["seconds"]
    if timing["steps"] < calib.max_steps:
        # A pace taken from a run stopped early is mostly start-up: planning on it sizes the main
        # run to a handful of steps.
        logger.warning(
            "block %d: the timing run stopped at step %d of %d; the next command runs it again",
            job.block_size, timing["steps"], calib.max_steps,
        )  # fmt: skip
        return
    progress.calibration = timing
    # The main run follows the timing run in this process (flex_attention, the block mask and the
    # page cache are warm): half its start-up, at least 10 s, is the guess for the first command.
    overhead = progress.calibration["startup"]
    _plan_main(
        job,
        progress,
        first_startup=max(0.5 * overhead, min(overhead, 10.0)),
        from_pretrained=_resolve(calib.save_path / "latest"),
    )


def _timing_run(calib: Any) -> dict[str, Any]:
    """`calib`'s steps; the steady pace from its log lines, the rest of its wall time as start-up."""
    from services.trainer.main import run_training

    started = time.time()
    done = run_training(calib).state.global_step
    seconds = time.time() - started
    pace = step_pace(calib.save_path / "metrics.jsonl")
    if pace is None:  # too few log lines: fall back to the whole run's average (an overestimate)
        pace = seconds / max(1, done)
    return dict(
        steps=done,
        seconds=seconds,
        pace=pace,
        startup=max(0.0, seconds - done * pace),
        samples=plans_and_samples(calib, done)[1],
        measured=True,
    )


def _plan_main(
    job: TrainJob, progress: Progress, *, first_startup: float, from_pretrained: Path | None
) -> None:
    """The main run's config: `max_steps` that fit the budget left, so its cosine ends with it.

    Every command the main run takes pays a start-up (loading, compiling); 5% spare covers the
    epoch ends (validation, checkpoint).
    """
    from dflash_core.config import TrainConfig

    pace, overhead = progress.calibration["pace"], progress.calibration["startup"]
    left = job.budget_s - progress.train_s
    first_left = job.command_end - time.time() - job.eval_s
    # A command that does not end the run trains to its end: the tau runs need time in the last one
    # only, so n commands hold first_left + (n - 1) * command_s seconds of training.
    commands = 1 + max(0, math.ceil((left - first_left) / max(60.0, job.command_s)))
    startup = first_startup + (commands - 1) * overhead
    main_steps = max(1, int(0.95 * (left - startup) / pace))
    logger.info(
        "pace %.3f s/step (%s), start-up %.1f s; %.0f s left over ~%d command(s) -> %d steps",
        pace, "timing run" if progress.calibration["measured"] else "given", overhead, left, commands,
        main_steps,
    )  # fmt: skip
    warmup = min(job.train.get("warmup_steps", 50), max(1, main_steps // 10))
    main = TrainConfig(
        **{**job.train, "warmup_steps": warmup},
        block_size=job.block_size,
        save_path=job.workdir / "main",
        max_steps=main_steps,
        from_pretrained=from_pretrained,
        resume=True,
    )
    main = main.model_copy(update={"epochs": epochs_for(main, main_steps)})
    progress.main_config = json.loads(main.model_dump_json())


def _train_main(job: TrainJob, progress: Progress, main: Any) -> None:
    """The main run, or its rest, until max_steps, the budget or this command's share ends."""
    from services.trainer.main import run_training

    budget_end = time.time() + job.budget_s - progress.train_s
    # Leave the tau run its time when the budget ends in this command; otherwise train to the end.
    command_stop = job.command_end - (job.eval_s if budget_end + job.eval_s <= job.command_end else 0.0)
    stop_at = min(budget_end, command_stop)
    watchdog = Deadline(stop_at)
    began = time.time()
    try:
        state = run_training(main).state
    finally:
        watchdog.cancel()
    progress.train_s += time.time() - began
    progress.commands += 1
    progress.main_steps_done = state.global_step
    budget_spent = progress.train_s >= job.budget_s - job.grace_s
    progress.stopped_by_budget = state.global_step < main.max_steps and budget_spent
    progress.main_done = state.global_step >= main.max_steps or budget_spent
    logger.info(
        "block %d: main run at step %d of %d after %.1f min of training (%s)",
        job.block_size, state.global_step, main.max_steps, progress.train_s / 60,
        "done" if progress.main_done else f"stopped for this command ({state.stopped_by})",
    )  # fmt: skip


def _evaluate(job: TrainJob, result: dict[str, Any], *, checkpoint: Path) -> None:
    """tau on the held-out prompts, then on the held-out chitchat prompts when there are some.

    No baseline: the other drafter may share the GPU now.
    """
    from dflash_core.eval_config import EvalConfig
    from dflash_core.evaluation import run_eval

    for key, fields in (("eval", job.eval), ("eval_chitchat", job.eval_chitchat)):
        if fields is None:
            continue
        t0 = time.time()
        report = run_eval(EvalConfig(**fields, checkpoint=checkpoint, baseline=False))
        result[key], result[f"{key}_s"] = report.to_json(), time.time() - t0
        logger.info(
            "tau (block %d) = %.3f over %d prompts of %s",
            job.block_size, report.tau, report.num_prompts, fields["prompts"],
        )  # fmt: skip


def _resolve(path: Path) -> Path:
    return path.resolve() if path.exists() else path
