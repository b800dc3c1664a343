"""Architecture of a DFlash drafter: what `config.json` of a checkpoint describes.

This is the in-memory form. `dflash_core.checkpoint` turns it into the speculators layout
(`speculators_model_type: "dflash"`, `transformer_layer_config`, ...) and back; nothing else
reads or writes that JSON, so the mapping lives in one place.

Layer ids follow docs/architecture.md: id `L` is the residual stream ENTERING verifier decoder layer `L`;
id `N` (= the verifier's layer count) is the last decoder layer's output before the final norm.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LayerType = Literal["full_attention", "sliding_attention"]


class DrafterConfig(BaseModel):
    """Geometry and attention of a DFlash drafter plus the verifier facts it depends on."""

    model_config = ConfigDict(extra="forbid")

    # --- decoder-layer geometry (Qwen3 style; by default copied from the verifier) ---
    hidden_size: int = Field(gt=0, description="Width of the residual stream; equals the verifier's.")
    intermediate_size: int = Field(gt=0, description="Width of the SiLU-gated MLP.")
    num_hidden_layers: int = Field(gt=0, description="Number of draft decoder layers.")
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = Field(
        default=None, description="HF `rope_scaling`/`rope_parameters` extras beyond theta, kept verbatim."
    )
    max_position_embeddings: int = 32768
    hidden_act: Literal["silu"] = "silu"

    # --- attention layout: decides causality inside a block, so it MUST reach vLLM intact ---
    layer_types: list[LayerType] = Field(
        default_factory=list, description="Per draft layer; empty means all `full_attention`."
    )
    sliding_window: int | None = Field(
        default=None, description="Context rows a sliding layer sees before its anchor."
    )
    sliding_window_non_causal: bool = Field(
        default=True,
        description="Block slots attend to each other bidirectionally (vLLM: causal = not this flag). "
        "speculators always treats full-attention layers as bidirectional in-block.",
    )

    # --- DFlash ---
    block_size: int = Field(ge=2, description="Tokens per block: the anchor plus block_size-1 drafts.")
    aux_hidden_state_layer_ids: list[int] = Field(
        min_length=1, description="Verifier layer ids (docs/architecture.md) concatenated into the context."
    )
    mask_token_id: int = Field(ge=0, description="Token id placed in block slots 1..B-1.")
    vocab_size: int = Field(gt=0, description="The verifier's vocabulary (embedding rows).")
    draft_vocab_size: int = Field(gt=0, description="Logit width of the drafter; < vocab_size needs d2t/t2d.")
    target_hidden_size: int | None = Field(
        default=None, description="Verifier hidden size when it differs from the drafter's."
    )

    # --- the verifier this drafter belongs to ---
    verifier_name_or_path: str = ""
    verifier_architectures: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> DrafterConfig:
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give one type per draft layer"
            )
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need sliding_window > 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"draft_vocab_size {self.draft_vocab_size} exceeds the verifier vocab {self.vocab_size}"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} has no embedding row (vocab {self.vocab_size})"
            )
        return self

    @property
    def num_aux_layers(self) -> int:
        return len(self.aux_hidden_state_layer_ids)

    @property
    def verifier_hidden_size(self) -> int:
        return self.target_hidden_size or self.hidden_size

    @property
    def has_reduced_vocab(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    def layer_is_causal_in_block(self, layer: int) -> bool:
        """speculators' rule: full layers are bidirectional in-block, sliding ones follow the flag."""
        if self.layer_types[layer] == "full_attention":
            return False
        return not self.sliding_window_non_causal

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
