"""`dflash train --hidden-states-endpoint` end to end: a real service on 127.0.0.1 feeds the trainer.

The trainer loads no decoder layers in this mode (only config, tokenizer and the three head
tensors); the hidden states come over gRPC, can be kept in the cache, and a later run trains
from that cache with no service at all. `dflash generate-offline` fills the same cache. A
service killed mid-epoch and restarted costs nothing; one gone for good ends the run after
--service-timeout-s with a checkpoint. The tutorial's train commands (single process and
torchrun) run as written against the service, with only the model, paths and sizes scaled down.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dflash_core.config import PrepareDataConfig, TrainConfig
from dflash_core.data.prepare import prepare_data
from dflash_core.verifier import tokenizer_fingerprint
from services.cli.main import main as dflash
from services.trainer.data import split_indices
from services.trainer.grpc_source import HiddenStateServiceError
from services.trainer.main import run_training
from tests.factories.chats import write_chats
from tests.factories.services import running_service, start_service_process
from tests.factories.training import ROOT, final_weights, run_train_command
from tests.factories.training import train_config as workspace_train_config
from tests.factories.verifiers import make_tiny_verifier

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("online")
    tiny = make_tiny_verifier(root / "verifier", num_layers=4, hidden_size=128, intermediate_size=256)
    data = root / "data"
    prepare_data(
        PrepareDataConfig(
            model=str(tiny.path),
            data=[str(write_chats(root / "c.jsonl", count=40))],
            output=data,
            seq_length=96,
        ),
        tokenizer=tiny.tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(tiny.tokenizer),
    )
    return {"root": root, "verifier": tiny.path, "data": data}


def train_config(setup: dict, save: str, **overrides) -> TrainConfig:
    """The tiny CPU run of tests/factories/training.py, on the layers the services here serve."""
    return workspace_train_config(
        setup, save, **{"max_anchors": 8, "epochs": 1, "target_layer_ids": LAYERS, **overrides}
    )


def test_trains_from_the_service_then_offline_from_the_cache_it_filled(setup):
    cache = setup["root"] / "cache-online"
    with running_service(setup["verifier"], target_layer_ids=LAYERS) as server:
        online = run_training(
            train_config(
                setup,
                "ckpt-online",
                vllm_endpoint=[server.address],
                on_generate="cache",
                hidden_states_cache=cache,
            )
        )
        served = server.scheduler.samples_served
    assert online.state.global_step > 0 and (online.save_path / "checkpoint_best" / "config.json").exists()
    cached = list(cache.glob("*/*.safetensors"))
    assert served > 0 and len(cached) == 40  # every row, train and val, came over the wire once

    # The service is gone: --on-missing raise reads everything from the cache.
    offline = run_training(
        train_config(setup, "ckpt-offline", on_missing="raise", hidden_states_cache=cache, vllm_endpoint=None)
    )
    assert offline.state.global_step == online.state.global_step


def test_a_float32_trainer_reads_a_bf16_service(setup):
    """The service's default wire dtype is bf16; a CPU run trains in float32 and casts on arrival."""
    with running_service(setup["verifier"], target_layer_ids=LAYERS, dtype="bfloat16") as server:
        result = run_training(train_config(setup, "ckpt-bf16-wire", hidden_states_endpoint=[server.address]))
    assert result.state.global_step > 0


def test_generate_offline_fills_the_cache_and_resumes(setup, capsys):
    cache: Path = setup["root"] / "cache-offline"
    with running_service(setup["verifier"], target_layer_ids=LAYERS) as server:
        argv = ["generate-offline", "--data-path", str(setup["data"]), "--vllm-endpoint", server.address,
                "--hidden-states-cache", str(cache)]  # fmt: skip
        assert dflash(argv) == 0
        assert "40 sample(s) written, 0 already there" in capsys.readouterr().out
        assert dflash(argv) == 0
        assert "0 sample(s) written, 40 already there" in capsys.readouterr().out
    # The default layer ids are every served id but N: the trainer's [1, 2] finds this cache.
    offline = run_training(
        train_config(setup, "ckpt-from-offline", on_missing="raise", hidden_states_cache=cache)
    )
    assert offline.state.global_step > 0


def test_train_refuses_a_service_serving_other_layers(setup, capsys):
    with running_service(setup["verifier"], target_layer_ids=[3]) as server:
        code = dflash(
            ["train", "--verifier-name-or-path", str(setup["verifier"]), "--data-path", str(setup["data"]),
             "--save-path", str(setup["root"] / "ckpt-refused"), "--target-layer-ids", "1", "2",
             "--vllm-endpoint", server.address, "--device", "cpu"]
        )  # fmt: skip
    assert code == 2
    out = capsys.readouterr().out
    assert "does not serve [1, 2]; it serves [3, 4]" in out
    assert not (setup["root"] / "ckpt-refused" / "latest").exists()


def metrics_rows(save_path: Path) -> list[dict]:
    path = save_path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill_after_first_step(save_path: Path, service, then=None) -> threading.Thread:
    """A thread that SIGKILLs `service` once the run has logged a training step, then calls `then`."""

    def run() -> None:
        deadline = time.monotonic() + 300
        while not any("train/loss" in row for row in metrics_rows(save_path)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        service.kill()  # no goodbye on the wire, requests in flight
        if then is not None:
            time.sleep(2.0)
            then()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_service_killed_mid_epoch_and_restarted_costs_no_sample(setup):
    services = [start_service_process(setup["verifier"], LAYERS)]
    port = services[0].port
    config = train_config(
        setup, "ckpt-restart", hidden_states_endpoint=[services[0].address], epochs=2, log_freq=1,
        service_timeout_s=120,
    )  # fmt: skip
    restart = lambda: services.append(start_service_process(setup["verifier"], LAYERS, port=port))  # noqa: E731
    killer = kill_after_first_step(Path(config.save_path), services[0], then=restart)
    try:
        result = run_training(config)
    finally:
        killer.join(timeout=60)
        for service in services:
            service.stop()
    assert len(services) == 2, "the service was not restarted during the run"
    assert result.state.epoch == 2
    # Every sample reached the trainer exactly once per use: the train rows once per epoch, the
    # val rows once per validation (before training and after each epoch); none dropped.
    train, val = split_indices(40, val_fraction=config.val_fraction, seed=config.seed)
    counters = next(
        row for row in reversed(metrics_rows(Path(config.save_path))) if "hidden_states/generated" in row
    )
    assert counters["hidden_states/generated"] == 2 * len(train) + 3 * len(val)
    assert counters["hidden_states/dropped"] == 0


def test_a_service_gone_for_good_ends_the_run_after_the_deadline_with_a_checkpoint(setup):
    service = start_service_process(setup["verifier"], LAYERS)
    config = train_config(
        setup,
        "ckpt-gone",
        hidden_states_endpoint=[service.address],
        epochs=2,
        log_freq=1,
        service_timeout_s=4,
    )
    killer = kill_after_first_step(Path(config.save_path), service)
    try:
        with pytest.raises(
            HiddenStateServiceError, match=r"no hidden states arrived for 4 s.*progress saved in"
        ):
            run_training(config)
    finally:
        killer.join(timeout=60)
        service.stop()
    saved = json.loads((Path(config.save_path) / "latest" / "training_state.json").read_text())
    assert saved["global_step"] >= 1


def tutorial_train_flags(setup: dict, address: str, save: str) -> list[str]:
    """The tutorial's `scripts/train.py` flags, word for word; model, paths and sizes scaled down."""
    return [
        "--verifier-name-or-path", str(setup["verifier"]),
        "--data-path", str(setup["data"]),
        "--vllm-endpoint", f"http://{address}/v1",
        "--save-path", str(setup["root"] / save),
        "--speculator-type", "dflash",
        "--block-size", "8",
        "--max-anchors", "24",
        "--num-layers", "1",
        "--draft-vocab-size", "64",
        "--target-layer-ids", *map(str, LAYERS),
        "--epochs", "1",
        "--lr", "3e-4",
        "--total-seq-len", "192",
        "--on-missing", "generate",
        "--on-generate", "delete",
    ]  # fmt: skip


def test_the_tutorials_train_commands_run_as_written_against_the_service(setup):
    torchrun = shutil.which("torchrun") or shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    service = start_service_process(setup["verifier"], LAYERS)
    try:
        commands = {
            # python scripts/train.py ...            (Single-GPU Training)
            "tutorial-single": [sys.executable, "-m", "services.cli.main", "train"],
            # torchrun --standalone --nproc_per_node 2 scripts/train.py ...   (Multi-GPU Training)
            "tutorial-fsdp": [
                torchrun,
                "--standalone",
                "--nproc_per_node",
                "2",
                "-m",
                "services.cli.main",
                "train",
            ],
        }
        for save, command in commands.items():
            done = subprocess.run(
                [*command, *tutorial_train_flags(setup, service.address, save)],
                cwd=ROOT, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            output = done.stdout + done.stderr
            assert done.returncode == 0, output[-6000:]
            assert "--vllm-endpoint" in output and "taken as --hidden-states-endpoint" in output
            assert (setup["root"] / save / "checkpoint_best" / "model.safetensors").exists()
    finally:
        service.stop()
    # Two complete drafters in the same layout, reduced vocab included (2 ranks = a global batch of 2).
    single, fsdp = (
        final_weights(setup["root"] / "tutorial-single"),
        final_weights(setup["root"] / "tutorial-fsdp"),
    )
    assert single.keys() == fsdp.keys() and "d2t" in single


def test_the_four_gpu_layout_scaled_to_cpu_two_replicas_feed_two_fsdp_ranks(setup):
    """The tutorial's layout (2 service replicas, a 2-rank FSDP trainer pulling from both), on CPU."""
    replicas = [start_service_process(setup["verifier"], LAYERS) for _ in range(2)]
    config = train_config(setup, "ckpt-layout", hidden_states_endpoint=[r.address for r in replicas])
    try:
        run_train_command(config, nproc=2)
    finally:
        for replica in replicas:
            replica.stop()
    served = [
        int(line.split("stopped after serving ")[1].split()[0])
        for replica in replicas
        for line in replica.output
        if "stopped after serving" in line
    ]
    train, val = split_indices(40, val_fraction=config.val_fraction, seed=config.seed)
    # Both replicas worked, and between them every use of a sample was computed exactly once:
    # the train rows once, the val rows before training and after the epoch.
    assert len(served) == 2 and min(served) > 0, served
    assert sum(served) == len(train) + 2 * len(val)
