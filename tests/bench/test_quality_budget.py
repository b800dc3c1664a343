"""bench/quality/run.py --commands N: training gets what N commands leave, fixed once for the run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from bench.quality.run import LATER_COMMAND_SETUP_S, ROWS_RESERVE_S, training_budget_s


def options(**overrides: float | int | None) -> argparse.Namespace:
    return argparse.Namespace(
        **{"commands": 2, "max_minutes": 9.4, "eval_minutes": 3.5, "train_minutes": 20.0, **overrides}
    )


def test_without_commands_the_budget_is_train_minutes(tmp_path: Path):
    assert (
        training_budget_s(options(commands=None), workdir=tmp_path, command_end=time.time() + 100) == 1200.0
    )
    assert not (tmp_path / "train_budget.json").exists()


def test_the_budget_fills_this_command_and_the_later_ones_less_the_tau_runs(tmp_path: Path):
    left_here = 300.0
    budget = training_budget_s(options(), workdir=tmp_path, command_end=time.time() + left_here)
    later = 9.4 * 60 - ROWS_RESERVE_S - LATER_COMMAND_SETUP_S
    assert budget == pytest.approx(left_here + later - 3.5 * 60, abs=2.0)
    # A later command reads the same budget back, whatever its own clock says: the cosine was sized to it.
    again = training_budget_s(options(), workdir=tmp_path, command_end=time.time() + 5000)
    assert again == budget


def test_one_command_is_all_this_one_leaves(tmp_path: Path):
    budget = training_budget_s(options(commands=1), workdir=tmp_path, command_end=time.time() + 400)
    assert budget == pytest.approx(400 - 3.5 * 60, abs=2.0)


def test_too_few_commands_for_the_tau_runs_is_refused(tmp_path: Path):
    with pytest.raises(SystemExit, match="--commands 1 leaves"):
        training_budget_s(options(commands=1), workdir=tmp_path, command_end=time.time() + 200)
    assert not (tmp_path / "train_budget.json").exists()
