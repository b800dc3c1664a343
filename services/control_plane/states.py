"""Job states and the one table of legal transitions.

    queued ──► starting ──► running ──► succeeded | failed | cancelled
       │           │                         ▲           ▲
       └──cancel───┴─────────────────────────┼───────────┘
                                   resume: failed | cancelled ──► queued

`starting` means the trainer process exists but has not reported a metric row yet (loading the
verifier, preflight); `running` starts with its first row. A run that ends before its first row
reached us (a crash at start-up, or a very short run whose rows were lost) may go from `starting`
straight to an end state, so `starting → succeeded` is legal too.

Jobs run by a cluster's scheduler (the slurm executor) take two more moves, both the cluster's
doing: `queued → failed` (it refused the submission, or failed the job before it ran) and
`starting | running → queued` (it requeued the job after a preemption or a node failure; the
trainer resumes from its last checkpoint when the cluster runs it again).
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Every legal (from, to) move; nothing else ever happens to a job's state.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.FAILED}),
    JobState.STARTING: frozenset(
        {JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}

# A process may exist for these (the GPUs they hold are busy).
ACTIVE_STATES = frozenset({JobState.STARTING, JobState.RUNNING})
TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# The user-facing actions and the states each is allowed from.
ACTIONS: dict[str, frozenset[JobState]] = {
    "cancel": frozenset({JobState.QUEUED, JobState.STARTING, JobState.RUNNING}),
    "resume": frozenset({JobState.FAILED, JobState.CANCELLED}),
    # A job with a live process cannot be deleted: its GPUs and files are still in use.
    "delete": frozenset({JobState.QUEUED, *TERMINAL_STATES}),
}


class IllegalTransition(Exception):
    """An action or move the job's current state does not allow (HTTP 409)."""

    def __init__(self, *, job_id: str, state: JobState, action: str) -> None:
        allowed = ", ".join(sorted(s.value for s in ACTIONS.get(action, ()))) or "no state"
        super().__init__(
            f"cannot {action} job {job_id}: it is {state.value} ({action} is allowed from {allowed})"
        )
        self.job_id = job_id
        self.state = state
        self.action = action


def can_move(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]


def check_action(*, job_id: str, state: JobState, action: str) -> None:
    """Raise IllegalTransition unless `action` is allowed from `state`."""
    if state not in ACTIONS[action]:
        raise IllegalTransition(job_id=job_id, state=state, action=action)
