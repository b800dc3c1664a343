"""GET /v1/meta: what the dashboard would otherwise repeat from the server (job states, the
fields a clone leaves out, the new-job form's example config). Needs the token like the API."""

from __future__ import annotations

from fastapi import APIRouter

from dflash_core.config import EMBEDDED_VERIFIER, DemoConfig
from services.control_plane.schemas import CONTROL_PLANE_OWNED, MetaPublic
from services.control_plane.states import ACTIVE_STATES, TERMINAL_STATES, JobState

router = APIRouter(prefix="/v1/meta", tags=["system"])

# Set per job: the control plane's own fields, the job's checkpoint folder (a clone gets its own)
# and `resume` (a clone starts fresh in it, whatever the job it came from was told).
NOT_COPIED = (*CONTROL_PLANE_OWNED, "save_path", "resume")


def example_config() -> dict[str, object]:
    """The demo's drafter for one epoch on the demo's data (`dflash demo` writes it to output/demo/data,
    under the default data root): a job a CPU-only control plane finishes in minutes."""
    demo = DemoConfig()
    return {
        "verifier_name_or_path": EMBEDDED_VERIFIER,
        "data_path": "demo/data",
        "block_size": demo.block_size,
        "num_layers": demo.num_layers,
        "max_anchors": demo.max_anchors,
        "total_seq_len": demo.total_seq_len,
        "epochs": 1,
        "lr": demo.lr,
    }


@router.get("")
def meta() -> MetaPublic:
    """Job states (all, active, terminal, in lifecycle order), the config fields a clone leaves out,
    and the example config the dashboard's new-job form starts with."""
    return MetaPublic(
        job_states=list(JobState),
        active_states=[s for s in JobState if s in ACTIVE_STATES],
        terminal_states=[s for s in JobState if s in TERMINAL_STATES],
        not_copied=list(NOT_COPIED),
        example_config=example_config(),
    )
