"""Tests for services.trainer.checkpointing: what a save writes, and a restore into fresh parts.

The Checkpointer is driven with the parts alone (no trainer), on the test vectors' drafter B.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.speculators_config import drafter_config_from_speculators
from services.trainer.checkpointing import Checkpointer, DataPlanInputs
from services.trainer.distributed import DistContext
from services.trainer.train_state import TrainState
from tests.factories import testvectors

# training_state.json's keys as every earlier version of the trainer wrote them: resumes and
# the control plane read these, so a change here is a format change.
TRAINING_STATE_KEYS = {
    "format_version", "epoch", "step_in_epoch", "global_step", "best_val_loss", "best_tau", "best_metric",
    "best_epoch", "history", "eval_history", "data", "world_size", "rng",
}  # fmt: skip
PLAN = DataPlanInputs(seed=0, num_train_rows=10, num_val_rows=2, total_seq_len=64, global_batch_size=2)


@pytest.fixture(scope="module")
def config() -> DrafterConfig:
    return drafter_config_from_speculators(
        json.loads((testvectors.testvectors_dir() / "drafter_B" / "config.json").read_text())
    )


def _parts(config: DrafterConfig, *, seed: int) -> dict:
    """A drafter, optimizer and scheduler one step into training (so every state is non-trivial)."""
    torch.manual_seed(seed)
    model = DFlashDrafter(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    sum((p.float() ** 2).sum() for p in model.parameters()).backward()
    optimizer.step()
    scheduler.step()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler}


def _checkpointer(root: Path, config: DrafterConfig, plan: DataPlanInputs = PLAN) -> Checkpointer:
    return Checkpointer(root=root, drafter_config=config, data_plan=plan, dist=DistContext(), save_best=True)


def _state(**fields) -> TrainState:
    history = [{"epoch": 0, "val/loss": 2.0}, {"epoch": 1, "val/loss": 3.0}]
    eval_history = [
        {"step": 5, "end_of_epoch": 0, "eval/tau": 1.5},
        {"step": 10, "end_of_epoch": 1, "eval/tau": 2.5},
    ]
    values = {"best_metric": "val_loss", "history": history, "eval_history": eval_history, **fields}
    return TrainState(**values)


def test_saves_write_the_training_state_keys_folders_and_links(tmp_path, config):
    checkpointer, parts = _checkpointer(tmp_path, config), _parts(config, seed=0)
    step = checkpointer.save_step(**parts, state=_state(global_step=4, step_in_epoch=4))
    assert step.name == "step-00000004" and (tmp_path / "latest").resolve() == step.resolve()
    saved = json.loads((step / "training_state.json").read_text())
    assert set(saved) == TRAINING_STATE_KEYS
    assert saved["data"] == {
        "seed": 0, "num_train_rows": 10, "num_val_rows": 2, "total_seq_len": 64, "global_batch_size": 2
    }  # fmt: skip
    assert (saved["world_size"], saved["global_step"], saved["best_val_loss"]) == (1, 4, None)

    epoch = checkpointer.save_epoch(**parts, state=_state(epoch=1, global_step=5), epoch=0, is_best=True)
    assert (tmp_path / "checkpoint_best").resolve() == (tmp_path / "latest").resolve() == epoch.resolve()
    assert not step.exists()  # a step folder only serves resumes until a newer checkpoint exists
    checkpointer.save_epoch(**parts, state=_state(epoch=2, global_step=10), epoch=1, is_best=False)
    assert (tmp_path / "checkpoint_best").resolve() == epoch.resolve()


def test_restore_puts_back_weights_optimizer_scheduler_and_state(tmp_path, config):
    checkpointer, parts = _checkpointer(tmp_path, config), _parts(config, seed=0)
    written = _state(epoch=1, step_in_epoch=2, global_step=7, best_val_loss=2.0, best_epoch=0)
    path = checkpointer.save_step(**parts, state=written)

    fresh, state = _parts(config, seed=1), TrainState(best_metric="val_loss")
    checkpointer.restore(path, **fresh, state=state)
    assert state == written
    for name, tensor in parts["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[name], tensor), name
    restored, original = fresh["optimizer"].state_dict(), parts["optimizer"].state_dict()
    torch.testing.assert_close(restored["state"], original["state"], rtol=0, atol=0)
    assert [g["lr"] for g in restored["param_groups"]] == [g["lr"] for g in original["param_groups"]]
    assert fresh["scheduler"].state_dict() == parts["scheduler"].state_dict()


def test_restore_refuses_a_changed_data_plan(tmp_path, config):
    path = _checkpointer(tmp_path, config).save_step(**_parts(config, seed=0), state=_state())
    changed = replace(PLAN, num_train_rows=11)
    with pytest.raises(ValueError, match=r"num_train_rows: checkpoint 10 vs now 11"):
        _checkpointer(tmp_path, config, changed).restore(
            path, **_parts(config, seed=1), state=TrainState(best_metric="val_loss")
        )


def test_restore_under_another_best_metric_moves_checkpoint_best(tmp_path, config):
    checkpointer, parts = _checkpointer(tmp_path, config), _parts(config, seed=0)
    checkpointer.save_epoch(**parts, state=_state(epoch=1, best_epoch=0), epoch=0, is_best=True)
    last = checkpointer.save_epoch(**parts, state=_state(epoch=2, best_epoch=0), epoch=1, is_best=False)
    assert (tmp_path / "checkpoint_best").resolve().name == "0"  # lowest val loss

    state = TrainState(best_metric="tau")
    checkpointer.restore(last, **_parts(config, seed=1), state=state)
    assert state.best_epoch == 1 and (tmp_path / "checkpoint_best").resolve().name == "1"  # highest tau
