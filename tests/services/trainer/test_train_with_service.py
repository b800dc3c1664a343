"""`dflash train --vllm-endpoint` end to end: a real service on 127.0.0.1 feeds the trainer.

The trainer loads no decoder layers in this mode (only config, tokenizer and the three head
tensors); the hidden states come over gRPC, can be kept in the cache, and a later run trains
from that cache with no service at all. `dflash generate-offline` fills the same cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dflash_core.config import PrepareDataConfig, TrainConfig
from dflash_core.data.prepare import prepare_data
from dflash_core.verifier import tokenizer_fingerprint
from services.cli.main import main as dflash
from services.trainer.main import run_training
from tests.factories.chats import write_chats
from tests.factories.services import running_service
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
    values = dict(
        verifier_name_or_path=str(setup["verifier"]),
        data_path=setup["data"],
        save_path=setup["root"] / save,
        block_size=4,
        max_anchors=8,
        num_layers=1,
        epochs=1,
        total_seq_len=192,
        target_layer_ids=LAYERS,
        device="cpu",
        val_fraction=0.1,
    )
    values.update(overrides)
    return TrainConfig(**values)


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
