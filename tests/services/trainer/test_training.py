"""End-to-end training on a tiny random verifier: learning, exact resume, preflight refusals.

Real parts only: a tiny Qwen3 verifier saved to disk and loaded by path, data written by
`prepare_data`, hidden states captured in-process, checkpoints on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dflash_core.checkpoint import find_resume_point
from dflash_core.config import PrepareDataConfig
from dflash_core.data.prepare import prepare_data
from dflash_core.verifier import tokenizer_fingerprint
from services.trainer.main import run_training
from services.trainer.preflight import PreflightError
from tests.factories.chats import write_chats
from tests.factories.tokenizers import make_chat_tokenizer
from tests.factories.training import final_weights, make_training_workspace, train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return make_training_workspace(tmp_path_factory.mktemp("training"))


def test_training_lowers_val_loss_and_raises_acceptance(workspace):
    result = run_training(train_config(workspace, "learn", epochs=3))
    history = {row["epoch"]: row for row in result.state.history}
    before, after = history[-1], history[2]  # -1 = the untrained drafter
    assert after["val/loss"] < before["val/loss"] - 0.2
    assert after["val/eal"] > before["val/eal"] + 0.1
    assert after["val/acc"] > before["val/acc"]
    save = result.save_path
    folders = sorted(p.name for p in save.iterdir() if p.is_dir() and not p.is_symlink())
    assert folders == ["0", "1", "2", "tensorboard"]
    assert (save / "latest").resolve() == (save / "2").resolve()
    best = min((row for row in result.state.history if row["epoch"] >= 0), key=lambda r: r["val/loss"])
    assert (save / "checkpoint_best").resolve().name == str(best["epoch"])
    lines = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in lines if "train/loss" in row]
    assert train_rows and {"train/acc_slot_1", "train/eal", "train/lr", "train/data_wait_frac"} <= set(
        train_rows[0]
    )


def test_interrupted_run_resumes_to_identical_weights(workspace):
    straight = run_training(train_config(workspace, "straight", checkpoint_freq=4))
    # Interrupted after 11 steps: the newest checkpoint is step 8, so steps 9-11 are redone.
    interrupted = train_config(workspace, "interrupted", checkpoint_freq=4)
    run_training(interrupted, stop_after_steps=11)
    assert find_resume_point(interrupted.save_path).name == "step-00000008"
    resumed = run_training(interrupted)
    assert resumed.state.global_step == straight.state.global_step
    expected, actual = final_weights(straight.save_path), final_weights(interrupted.save_path)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert resumed.state.history == straight.state.history
    assert not list(Path(interrupted.save_path).glob("step-*"))  # superseded by the epoch folders


def test_resume_refuses_a_changed_data_plan(workspace):
    config = train_config(workspace, "changed", checkpoint_freq=3)
    run_training(config, stop_after_steps=4)
    with pytest.raises(ValueError, match="total_seq_len"):
        run_training(config.model_copy(update={"total_seq_len": 160}))


def test_reduced_draft_vocab_trains_and_saves_the_mapping(workspace):
    result = run_training(train_config(workspace, "vocab", epochs=1, draft_vocab_size=64))
    weights = final_weights(result.save_path)
    assert weights["d2t"].shape == (64,) and weights["t2d"].dtype == torch.bool
    assert int(weights["t2d"].sum()) == 64 and weights["lm_head.weight"].shape == (64, 64)
    target_ids = torch.arange(64) + weights["d2t"]
    assert torch.equal(torch.nonzero(weights["t2d"]).flatten(), target_ids)


def test_data_from_another_tokenizer_is_refused_naming_both_sides(workspace):
    other = make_chat_tokenizer(vocab_size=300)
    data = workspace["root"] / "other-data"
    config = PrepareDataConfig(
        model="some/other-model",
        data=[str(write_chats(workspace["root"] / "c2.jsonl", count=20))],
        output=data,
        seq_length=200,
    )
    prepare_data(config, tokenizer=other, tokenizer_fingerprint=tokenizer_fingerprint(other))
    with pytest.raises(PreflightError) as exc:
        run_training(train_config(workspace, "refused", data_path=data))
    message = str(exc.value)
    assert "some/other-model" in message and str(workspace["verifier"]) in message


def test_layer_ids_outside_the_verifier_are_refused(workspace):
    with pytest.raises(ValueError, match="--target-layer-ids"):
        run_training(train_config(workspace, "bad-ids", target_layer_ids=[1, 5]))
