"""The drafter's module tree is the checkpoint contract (docs/architecture.md); verifier heads frozen."""

from __future__ import annotations

import torch

from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads


def _config(**overrides: object) -> DrafterConfig:
    base: dict = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, block_size=4, aux_hidden_state_layer_ids=[1, 2, 3],
        mask_token_id=7, vocab_size=40, draft_vocab_size=40,
    )  # fmt: skip
    base.update(overrides)
    return DrafterConfig(**base)


LAYER_TENSORS = {
    "input_layernorm.weight": (32,),
    "post_attention_layernorm.weight": (32,),
    "self_attn.q_proj.weight": (32, 32),
    "self_attn.k_proj.weight": (16, 32),
    "self_attn.v_proj.weight": (16, 32),
    "self_attn.o_proj.weight": (32, 32),
    "self_attn.q_norm.weight": (8,),
    "self_attn.k_norm.weight": (8,),
    "mlp.gate_proj.weight": (48, 32),
    "mlp.up_proj.weight": (48, 32),
    "mlp.down_proj.weight": (32, 48),
}


def _expected_names(num_layers: int) -> dict[str, tuple[int, ...]]:
    names = {"fc.weight": (32, 96), "hidden_norm.weight": (32,), "norm.weight": (32,)}
    for i in range(num_layers):
        names.update({f"layers.{i}.{k}": v for k, v in LAYER_TENSORS.items()})
    return names


def test_state_dict_names_full_vocab() -> None:
    state = DFlashDrafter(_config()).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _expected_names(2)


def test_state_dict_names_reduced_vocab() -> None:
    drafter = DFlashDrafter(_config(draft_vocab_size=10))
    shapes = {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
    assert shapes == {**_expected_names(2), "lm_head.weight": (10, 32), "d2t": (10,), "t2d": (40,)}
    assert (
        drafter.state_dict()["d2t"].dtype == torch.int64 and drafter.state_dict()["t2d"].dtype == torch.bool
    )
    trainable = {n for n, p in drafter.named_parameters() if p.requires_grad}
    assert "lm_head.weight" not in trainable and "fc.weight" in trainable
    # a saved state loads back strictly, buffers included
    other = DFlashDrafter(_config(draft_vocab_size=10))
    other.load_state_dict(drafter.state_dict(), strict=True)


def test_verifier_heads_are_frozen_and_target_logits_use_the_final_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    embed, lm_head, norm = (
        torch.randn(40, 32, generator=gen),
        torch.randn(40, 32, generator=gen),
        torch.rand(32) + 0.5,
    )
    heads = VerifierHeads.from_tensors(embed=embed, lm_head=lm_head, norm=norm, eps=1e-6)
    assert all(not p.requires_grad for p in heads.parameters())
    assert heads.embed_tokens.weight.data_ptr() == embed.data_ptr()  # wrapped, not copied
    h = 4 * torch.randn(5, 32, generator=gen)
    expected = (norm * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) @ lm_head.T
    torch.testing.assert_close(heads.target_logits(h), expected)
    torch.testing.assert_close(heads.embed(torch.tensor([3, 0])), embed[[3, 0]])
