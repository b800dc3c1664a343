"""dflash_core.capture: every layer id 0..N (docs/architecture.md) matches what the verifier computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dflash_core.capture import capture_hidden_states, capture_sequences, find_decoder_layers
from tests.factories.verifiers import make_tiny_verifier

ARCHS = ["qwen3", "llama"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return make_tiny_verifier(arch=request.param, num_layers=4, seed=3)


def _reference(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    with torch.no_grad():
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
        if attention_mask is not None:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids, output_hidden_states=True, **kwargs)


def test_all_layer_ids_match_the_verifier(tiny):
    model = tiny.model
    n = model.config.num_hidden_layers
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    planes = capture_hidden_states(model, ids, layer_ids=list(range(n + 1)))
    assert planes.shape == (2, 11, n + 1, model.config.hidden_size)
    out = _reference(model, ids)
    # id L < N: the residual stream entering layer L = HF hidden_states[L] (id 0 = embeddings).
    for layer in range(n):
        torch.testing.assert_close(planes[:, :, layer], out.hidden_states[layer], rtol=0, atol=0)
    torch.testing.assert_close(planes[:, :, 0], model.model.embed_tokens(ids), rtol=0, atol=0)
    # id N: BEFORE the final norm. HF's hidden_states[N] is after it, so norm(ours) == theirs ...
    last = planes[:, :, n]
    torch.testing.assert_close(model.model.norm(last), out.hidden_states[n])
    torch.testing.assert_close(model.lm_head(model.model.norm(last)), out.logits)
    # ... and ours is NOT theirs: the silent pre- vs post-norm failure this module exists to avoid.
    assert not torch.allclose(last, out.hidden_states[n], atol=1e-3)


def test_order_duplicates_and_subset(tiny):
    model = tiny.model
    n = model.config.num_hidden_layers
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    full = capture_hidden_states(model, ids, layer_ids=list(range(n + 1)))
    picked = capture_hidden_states(model, ids, layer_ids=[n, 1, 3, 1])
    for k, layer in enumerate([n, 1, 3, 1]):
        torch.testing.assert_close(picked[:, :, k], full[:, :, layer], rtol=0, atol=0)
    # Ids below N stop the forward early; the result is the same.
    early = capture_hidden_states(model, ids, layer_ids=[0, 2])
    torch.testing.assert_close(early, full[:, :, [0, 2]], rtol=0, atol=0)


def test_lm_head_is_not_run(tiny):
    model = tiny.model

    def boom(*args, **kwargs):
        raise AssertionError("the LM head ran")

    handle = model.lm_head.register_forward_pre_hook(boom)
    try:
        capture_hidden_states(model, torch.tensor([[1, 2, 3]]), layer_ids=[model.config.num_hidden_layers])
    finally:
        handle.remove()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_real_rows(tiny, side):
    model = tiny.model
    n = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(2)
    long_row = torch.randint(3, 300, (9,), generator=gen)
    short_row = torch.randint(3, 300, (5,), generator=gen)
    pad = tiny.tokenizer.pad_token_id
    ids = torch.full((2, 9), pad)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = long_row, 1
    if side == "right":
        ids[1, :5], mask[1, :5] = short_row, 1
        real = slice(0, 5)
    else:
        ids[1, 4:], mask[1, 4:] = short_row, 1
        real = slice(4, 9)
    layer_ids = list(range(n + 1))
    batched = capture_hidden_states(model, ids, attention_mask=mask, layer_ids=layer_ids)
    alone_short = capture_hidden_states(model, short_row[None], layer_ids=layer_ids)
    alone_long = capture_hidden_states(model, long_row[None], layer_ids=layer_ids)
    torch.testing.assert_close(batched[1, real], alone_short[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[0], alone_long[0], rtol=1e-5, atol=1e-5)
    # And against the verifier's own padded forward (same mask and positions).
    out = _reference(model, ids, mask)
    for layer in range(n):
        torch.testing.assert_close(batched[1, real, layer], out.hidden_states[layer][1, real])
    torch.testing.assert_close(model.model.norm(batched[1, real, n]), out.hidden_states[n][1, real])


def test_hooks_are_removed_even_when_the_forward_fails(tiny):
    model = tiny.model
    layers = model.model.layers

    def hook_counts() -> list[int]:
        return [len(layer._forward_pre_hooks) + len(layer._forward_hooks) for layer in layers]

    before = hook_counts()
    with pytest.raises(IndexError):
        capture_hidden_states(model, torch.tensor([[10_000]]), layer_ids=[1, 4])  # id beyond the embedding
    assert hook_counts() == before
    capture_hidden_states(model, torch.tensor([[1, 2]]), layer_ids=[0, 4])
    assert hook_counts() == before


def test_bad_layer_ids_and_unknown_models(tiny):
    n = tiny.model.config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"0\.\.{n}"):
        capture_hidden_states(tiny.model, torch.tensor([[1]]), layer_ids=[n + 1])
    with pytest.raises(ValueError, match="empty"):
        capture_hidden_states(tiny.model, torch.tensor([[1]]), layer_ids=[])
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        find_decoder_layers(nn.Linear(2, 2))


def test_base_model_can_be_passed_directly(tiny):
    model = tiny.model
    ids = torch.tensor([[5, 6, 7, 8]])
    n = model.config.num_hidden_layers
    via_causal_lm = capture_hidden_states(model, ids, layer_ids=[1, n])
    via_base = capture_hidden_states(model.model, ids, layer_ids=[1, n])
    torch.testing.assert_close(via_causal_lm, via_base, rtol=0, atol=0)


def test_result_is_usable_by_autograd(tiny):
    planes = capture_hidden_states(tiny.model, torch.tensor([[1, 2, 3]]), layer_ids=[1])
    assert not planes.requires_grad and not planes.is_inference()
    weight = torch.randn(planes.shape[-1], 2, requires_grad=True)
    (planes @ weight).sum().backward()  # would fail on inference-mode tensors
    assert weight.grad is not None


def test_capture_sequences_groups_by_length_and_keeps_input_order(tiny):
    """Long and short samples alternate: grouped in input order, every group would be as wide as a
    long one (8 forwards under this budget); grouped by length, the shorts share one (5)."""
    model = tiny.model
    gen = torch.Generator().manual_seed(4)
    sequences = [torch.randint(3, 300, (40 if i % 2 == 0 else 5,), generator=gen) for i in range(16)]
    base, _ = find_decoder_layers(model)
    forwards = []
    handle = base.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        planes = capture_sequences(model, sequences, layer_ids=[1, 4], max_batch_tokens=100)
    finally:
        handle.remove()
    assert sorted(forwards) == [(2, 40)] * 4 + [(8, 5)]
    for sequence, got in zip(sequences, planes, strict=True):
        alone = capture_hidden_states(model, sequence[None], layer_ids=[1, 4])[0]
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-6)
