"""A small training workspace (tiny verifier saved to disk + prepared chats) and run configs for it.

workspace = make_training_workspace(tmp_path)
config = train_config(workspace, "run-a", epochs=1)       # a TrainConfig on CPU
run_training(config)  |  run_train_command(config, nproc=2)  # in-process | CLI (torchrun)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from dflash_core.config import PrepareDataConfig, TrainConfig
from dflash_core.data.prepare import prepare_data
from dflash_core.verifier import tokenizer_fingerprint
from tests.factories.chats import write_chats
from tests.factories.verifiers import make_tiny_verifier

ROOT = Path(__file__).resolve().parents[2]


def make_training_workspace(root: Path, *, chats: int = 120, seq_length: int = 96) -> dict[str, Path]:
    tiny = make_tiny_verifier(root / "verifier", arch="qwen3", num_layers=4)
    conversations = write_chats(root / "chats.jsonl", count=chats)
    data = root / "data"
    config = PrepareDataConfig(
        model=str(tiny.path), data=[str(conversations)], output=data, seq_length=seq_length
    )
    prepare_data(
        config, tokenizer=tiny.tokenizer, tokenizer_fingerprint=tokenizer_fingerprint(tiny.tokenizer)
    )
    return {"root": root, "verifier": tiny.path, "data": data}


def train_config(workspace: dict[str, Path], save: str, **overrides) -> TrainConfig:
    values = dict(
        verifier_name_or_path=str(workspace["verifier"]),
        data_path=workspace["data"],
        save_path=workspace["root"] / save,
        block_size=4,
        max_anchors=12,
        num_layers=1,
        epochs=2,
        lr=2e-3,
        warmup_steps=3,
        total_seq_len=192,
        log_freq=5,
        val_fraction=0.1,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def final_weights(save_path: Path, checkpoint: str = "latest") -> dict[str, torch.Tensor]:
    return load_file(str(Path(save_path) / checkpoint / "model.safetensors"))


def train_command(config: TrainConfig, *, nproc: int = 1) -> list[str]:
    """`python -m services.cli.main train --config <yaml> [--nproc N]` for `config` (YAML beside it)."""
    path = Path(config.save_path).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    return [sys.executable, "-m", "services.cli.main", "train", "--config", str(path), "--nproc", str(nproc)]


def start_train_command(config: TrainConfig, *, nproc: int = 1) -> subprocess.Popen:
    """The CLI in its own process group (so a test can signal torchrun and its ranks together)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        train_command(config, nproc=nproc),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_train_command(config: TrainConfig, *, nproc: int = 1, timeout_s: float = 600) -> str:
    """Run the CLI to the end; returns its output; fails the test (with the output) on a non-zero exit."""
    process = start_train_command(config, nproc=nproc)
    output, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, f"`dflash train` exited {process.returncode}:\n{output[-6000:]}"
    return output
