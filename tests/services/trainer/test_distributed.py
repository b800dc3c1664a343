"""Data-parallel training under torchrun: 2 CPU ranks (gloo, FSDP2) through the real CLI.

What must hold: two ranks compute what one rank computes with twice the batch (same global
batch, per-row anchors, loss normalised over both ranks' slots); two "nodes" (two torchruns
meeting at a c10d rendezvous, as on a Slurm allocation) compute what one node's two ranks do;
SIGTERM checkpoints and exits, whether it reaches torchrun alone or every process at once (as
Slurm signals a job step), and the same command then resumes to the very weights of an
uninterrupted run; so does kill -9 of torchrun and its ranks (the last step checkpoint is whole);
a two-rank checkpoint resumes on one rank when the global batch is kept, and is refused, naming
the fix, when it is not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dflash_core.checkpoint import update_link
from services.trainer.main import run_training
from tests.factories.training import (
    ROOT,
    final_weights,
    make_training_workspace,
    run_train_command,
    start_train_command,
    train_command,
    train_config,
)

# One data plan for every run here: 2 ranks x 1 row or 1 rank x 2 rows per step.
RUN = dict(epochs=2, log_freq=2, lr=3e-3)
# Float32 on CPU; the two layouts only differ in the order of a few reductions.
ATOL = 1e-5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return make_training_workspace(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def two_ranks(workspace) -> Path:
    """An uninterrupted 2-rank run: the reference for every test here."""
    config = train_config(workspace, "two-ranks", batch_size=1, **RUN)
    output = run_train_command(config, nproc=2)
    assert "relaunching under torchrun with 2 processes" in output
    return Path(config.save_path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def metric_rows(save_path: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def wait_for_step_checkpoint(save_path: Path, process, timeout_s: float = 300) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(save_path.glob("step-*"))
        if found and (found[0] / "training_state.json").exists():
            return found[0]
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its first step checkpoint:\n{process.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("no step checkpoint appeared")


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, exact: bool) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0, msg=name)


def test_two_ranks_train_like_one_rank_with_twice_the_batch(workspace, two_ranks):
    one_rank = run_training(train_config(workspace, "one-rank", batch_size=2, **RUN)).save_path
    two, one = final_weights(two_ranks), final_weights(one_rank)
    assert_same_weights(two, one, exact=False)
    # ... and training moved the weights far beyond that tolerance, so the check has teeth.
    first_epoch = final_weights(one_rank, "0")
    assert max(float((one[n] - first_epoch[n]).abs().max()) for n in one) > 100 * ATOL
    for key in ("train/loss", "train/acc", "train/grad_norm", "val/loss", "val/eal"):
        want, got = metric_rows(one_rank, key), metric_rows(two_ranks, key)
        assert got.keys() == want.keys() and want, key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), (key, step)
    assert metric_rows(two_ranks, "train/tokens_per_s").keys() == metric_rows(one_rank, "train/loss").keys()


def test_two_nodes_meeting_at_a_c10d_rendezvous_train_like_one_node(workspace, two_ranks):
    """`torchrun --nnodes 2` twice, one rank each: the multi-node launch (what the slurm
    executor's batch script runs on every node), here as two processes on one host."""
    config = train_config(workspace, "two-nodes", batch_size=1, **RUN)
    train = train_command(config)
    yaml_path = train[train.index("--config") + 1]
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
        "-m", "services.cli.main", "train", "--config", yaml_path,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-6000:]
    assert sum("2 ranks (FSDP2)" in output for output in outputs) == 1  # rank 0 speaks for the run
    # Rank r reads rows r, r+2, ... whichever node it landed on; sums of two are the same both ways.
    assert_same_weights(final_weights(Path(config.save_path)), final_weights(two_ranks), exact=True)


@pytest.mark.parametrize("every_process", [False, True], ids=["to torchrun", "to every process"])
def test_sigterm_checkpoints_and_the_same_command_resumes_to_the_same_weights(
    workspace, two_ranks, every_process
):
    config = train_config(workspace, f"sigterm-{every_process}", batch_size=1, checkpoint_freq=3, **RUN)
    process = start_train_command(config, nproc=2)
    wait_for_step_checkpoint(Path(config.save_path), process)
    if every_process:
        # torchrun and both ranks at once (each rank leads a session of its own: a process group
        # signal would miss them), as Slurm signals every process of a step on scancel
        # --signal=TERM, its time limit and preemption. Each rank gets it twice (torchrun passes
        # its own copy on a moment later) and takes the second as the same request, not "die now".
        tree = [process.pid, *descendants(process.pid)]
        assert len(tree) >= 3, tree
        for pid in tree:
            os.kill(pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)  # to torchrun alone, as `docker stop` would
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, "a stopped run must not look finished"
    assert "SIGTERM received: stopping after the current step" in output
    assert "stopped by SIGTERM" in output
    stopped_at = json.loads((Path(config.save_path) / "latest" / "training_state.json").read_text())
    assert 0 < stopped_at["global_step"] < max(metric_rows(two_ranks, "train/loss"))

    output = run_train_command(config, nproc=2)
    assert "resumed from" in output
    assert_same_weights(final_weights(Path(config.save_path)), final_weights(two_ranks), exact=True)


def test_kill_9_of_every_process_then_the_same_command_resumes_to_the_same_weights(workspace, two_ranks):
    config = train_config(workspace, "kill9", batch_size=1, checkpoint_freq=3, **RUN)
    process = start_train_command(config, nproc=2)
    wait_for_step_checkpoint(Path(config.save_path), process)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks, no chance to clean up
    process.communicate(timeout=60)
    run_train_command(config, nproc=2)
    assert_same_weights(final_weights(Path(config.save_path)), final_weights(two_ranks), exact=True)


def test_a_two_rank_checkpoint_resumes_on_one_rank_with_the_same_global_batch(workspace, two_ranks):
    save = Path(workspace["root"]) / "two-then-one"
    shutil.copytree(two_ranks / "0", save / "0")  # the end of epoch 0, written by 2 ranks
    update_link(save, "latest", save / "0")

    with pytest.raises(ValueError, match=r"global_batch_size: checkpoint 2 vs now 1.*ranks x --batch-size"):
        run_training(train_config(workspace, "two-then-one", batch_size=1, **RUN))
    result = run_training(train_config(workspace, "two-then-one", batch_size=2, **RUN))
    assert result.state.epoch == RUN["epochs"]
    assert_same_weights(final_weights(save), final_weights(two_ranks), exact=False)
