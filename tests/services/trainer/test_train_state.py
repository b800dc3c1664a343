"""Tests for services.trainer.train_state: the saved keys, old files, and the best-epoch bookkeeping."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

from services.trainer.train_state import TrainState

HISTORY = [
    {"epoch": -1, "val/loss": 9.0},
    {"epoch": 0, "val/loss": 2.0},
    {"epoch": 1, "val/loss": 3.0},
]
EVAL_HISTORY = [
    {"step": 0, "end_of_epoch": None, "eval/tau": 1.0},
    {"step": 5, "end_of_epoch": None, "eval/tau": 3.5},  # mid-epoch: no checkpoint to point at
    {"step": 10, "end_of_epoch": 0, "eval/tau": 1.5},
    {"step": 20, "end_of_epoch": 1, "eval/tau": 2.5},
]


def test_best_epoch_by_each_metric_reads_the_histories():
    state = TrainState(best_metric="val_loss", history=HISTORY, eval_history=EVAL_HISTORY)
    assert state.best_epoch_by("val_loss") == 0
    assert state.best_epoch_by("tau") == 1


def test_state_dict_has_the_training_state_keys_and_round_trips_through_json():
    state = TrainState(
        best_metric="tau",
        epoch=2,
        step_in_epoch=3,
        global_step=23,
        best_val_loss=2.0,
        best_tau=2.5,
        best_epoch=1,
        history=HISTORY,
        eval_history=EVAL_HISTORY,
        stopped_by="SIGTERM",
    )
    saved = state.state_dict()
    assert set(saved) == {
        "epoch", "step_in_epoch", "global_step", "best_val_loss", "best_tau", "best_metric", "best_epoch",
        "history", "eval_history",
    }  # fmt: skip
    restored = TrainState(best_metric="tau")
    restored.load_state_dict(json.loads(json.dumps(saved)))
    assert restored == replace(state, stopped_by=None)  # the signal that stopped a call is not saved


def test_no_best_yet_is_saved_as_null_and_read_back_as_infinity():
    saved = TrainState(best_metric="val_loss").state_dict()
    assert saved["best_val_loss"] is None and saved["best_tau"] is None
    restored = TrainState(best_metric="val_loss", best_val_loss=1.0, best_tau=1.0)
    restored.load_state_dict(saved)
    assert restored.best_val_loss == math.inf and restored.best_tau == -math.inf


def test_a_file_from_before_live_acceptance_loads_with_an_empty_history(caplog):
    old = {"epoch": 1, "step_in_epoch": 0, "global_step": 10, "best_val_loss": 2.0, "best_epoch": 0,
           "history": HISTORY[:2]}  # fmt: skip
    state = TrainState(best_metric="val_loss")
    with caplog.at_level(logging.INFO, logger="services.trainer.train_state"):
        state.load_state_dict(old)
    assert "no live-acceptance history" in caplog.text
    assert (state.epoch, state.global_step, state.best_epoch) == (1, 10, 0)
    assert state.eval_history == [] and state.best_tau == -math.inf


def test_another_best_metric_on_resume_re_picks_the_best_epoch(caplog):
    saved = TrainState(
        best_metric="val_loss", best_epoch=0, history=HISTORY, eval_history=EVAL_HISTORY
    ).state_dict()
    state = TrainState(best_metric="tau")
    with caplog.at_level(logging.WARNING, logger="services.trainer.train_state"):
        state.load_state_dict(saved)
    assert state.best_epoch == 1 and "--best-metric changed from val_loss to tau" in caplog.text
    del saved["best_metric"]  # files from before --best-metric were picked by val loss
    state = TrainState(best_metric="val_loss")
    state.load_state_dict(saved)
    assert state.best_epoch == 0


def test_record_best_follows_the_run_metric_and_never_takes_a_missing_value():
    state = TrainState(best_metric="tau")
    assert state.record_best(epoch=0, val={"val/loss": 3.0}, live={"eval/tau": 1.5})
    assert not state.record_best(epoch=1, val={"val/loss": 2.0}, live={"eval/tau": 1.2})  # loss only
    assert not state.record_best(epoch=2, val={}, live={"eval/tau": math.nan})
    assert (state.best_epoch, state.best_val_loss, state.best_tau) == (0, 2.0, 1.5)
    by_loss = TrainState(best_metric="val_loss")
    assert by_loss.record_best(epoch=0, val={"val/loss": 3.0}, live={})
    assert not by_loss.record_best(epoch=1, val={}, live={"eval/tau": 9.0})
    assert by_loss.best_epoch == 0
