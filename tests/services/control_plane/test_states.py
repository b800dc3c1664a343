"""The state machine: the only legal moves, and the actions each state allows."""

from __future__ import annotations

import itertools

import pytest

from services.control_plane.states import (
    ACTIONS,
    ACTIVE_STATES,
    TERMINAL_STATES,
    IllegalTransition,
    JobState,
    can_move,
    check_action,
)

LEGAL = {
    ("queued", "starting"),
    ("queued", "cancelled"),
    ("queued", "failed"),  # a cluster refused it, or failed it before it ran
    ("starting", "running"),
    ("starting", "succeeded"),
    ("starting", "failed"),
    ("starting", "cancelled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("starting", "queued"),  # a cluster requeued it (preemption, node failure)
    ("running", "queued"),
    ("failed", "queued"),
    ("cancelled", "queued"),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobState, JobState)))
def test_only_the_documented_moves_are_legal(current, target):
    assert can_move(current, target) == ((current.value, target.value) in LEGAL)


def test_actions_and_their_refusals():
    assert ACTIONS["cancel"] == {JobState.QUEUED, *ACTIVE_STATES}
    assert ACTIONS["resume"] == {JobState.FAILED, JobState.CANCELLED}
    assert ACTIONS["delete"] == {JobState.QUEUED, *TERMINAL_STATES}
    check_action(job_id="j", state=JobState.RUNNING, action="cancel")
    with pytest.raises(
        IllegalTransition, match=r"cannot delete job j: it is running \(delete is allowed from"
    ):
        check_action(job_id="j", state=JobState.RUNNING, action="delete")
    # Every state an action is allowed from can actually make that move.
    assert all(can_move(s, JobState.QUEUED) for s in ACTIONS["resume"])
    assert all(can_move(s, JobState.CANCELLED) for s in ACTIONS["cancel"])
