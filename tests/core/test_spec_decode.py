"""Speculative decoding (dflash_core.spec_decode): lossless, exact counters, a cache that equals recomputing.

Real parts only: a tiny random Qwen3 verifier, a drafter trained on its own replies for a few
seconds (tests/factories/on_policy.py), SmolLM2 (the embedded verifier) for the slow test, and scripted
proposers that draft from the verifier's own greedy continuation with a chosen number of right
tokens per round, so every counter has a value known in advance.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dflash_core.capture import capture_hidden_states, layer_taps
from dflash_core.checkpoint import load_checkpoint
from dflash_core.config import EMBEDDED_DATA, EMBEDDED_VERIFIER
from dflash_core.eval_prompts import load_prompts
from dflash_core.masks import BlockVisibility, dense_mask
from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.spec_decode import (
    DFlashProposer,
    Proposal,
    rejection_accept,
    speculative_generate,
    verifier_generate,
)
from dflash_core.verifier import default_target_layer_ids, load_verifier, load_verifier_heads_from_model
from tests.factories.on_policy import make_on_policy_workspace, train_on_policy_drafter

BLOCK = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny verifier and a drafter trained on its replies (block 4, one layer, aux ids [1, 2, 4])."""
    workspace = make_on_policy_workspace(tmp_path_factory.mktemp("spec"))
    loaded = load_checkpoint(train_on_policy_drafter(workspace, block_size=BLOCK))
    drafter = DFlashDrafter(loaded.config)
    drafter.load_state_dict(loaded.state_dict)
    model, tokenizer = load_verifier(str(workspace["verifier"]))
    prompts = [p.token_ids for p in load_prompts(str(workspace["data"]), tokenizer=tokenizer, limit=12)]
    return {"drafter": drafter, "model": model, "tokenizer": tokenizer, "prompts": prompts}


def drafter_config_for(model_config, tokenizer, **overrides) -> DrafterConfig:
    values: dict = dict(
        hidden_size=model_config.hidden_size, intermediate_size=model_config.intermediate_size,
        num_hidden_layers=1, num_attention_heads=model_config.num_attention_heads,
        num_key_value_heads=model_config.num_key_value_heads,
        head_dim=getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads,
        rope_theta=(getattr(model_config, "rope_parameters", None) or {}).get("rope_theta")
        or getattr(model_config, "rope_theta", None) or 10000.0, block_size=BLOCK,
        aux_hidden_state_layer_ids=default_target_layer_ids(model_config.num_hidden_layers),
        mask_token_id=min(len(tokenizer), model_config.vocab_size - 1), vocab_size=model_config.vocab_size,
        draft_vocab_size=model_config.vocab_size,
    )  # fmt: skip
    values.update(overrides)
    return DrafterConfig(**values)


class ScriptedProposer:
    """Drafts the verifier's greedy continuation with the first `right(round)` slots right, the rest wrong."""

    def __init__(
        self, reference: list[int], *, block_size: int, vocab_size: int, right: Callable[[int], int]
    ):
        self.reference, self.block_size, self.vocab_size, self.right = (
            reference,
            block_size,
            vocab_size,
            right,
        )
        self.round = 0
        self.aux_layer_ids: list[int] = []  # reads no hidden states

    def start(self, *, max_positions: int) -> None:
        self.round = 0

    def append_context(self, aux_hidden_states: torch.Tensor) -> None:
        raise AssertionError("a proposer without aux layer ids gets no context")

    def propose(self, *, anchor_token: int, position: int, temperature: float, generator) -> Proposal:
        assert anchor_token == self.reference[position], (
            "the anchor is not the committed token at its position"
        )
        truth = self.reference[position + 1 : position + self.block_size]
        k = self.right(self.round)
        self.round += 1
        return Proposal(tokens=truth[:k] + [(t + 1) % self.vocab_size for t in truth[k:]])


def expected_rounds(max_new_tokens: int, accepted: Callable[[int], int]) -> list[int]:
    """Accepted drafts per round when round r accepts accepted(r): rounds run until max_new_tokens exist."""
    tokens, rounds = 1, []
    while tokens < max_new_tokens:
        rounds.append(accepted(len(rounds)))
        tokens += rounds[-1] + 1
    return rounds


def chat_prompt(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered)


# --------------------------------------------------------------------------------------------
# Lossless
# --------------------------------------------------------------------------------------------


def test_greedy_output_equals_the_verifiers_own_greedy_output(trained):
    model, tokenizer = trained["model"], trained["tokenizer"]
    proposer = DFlashProposer(trained["drafter"], load_verifier_heads_from_model(model))
    prompts = trained["prompts"] + [chat_prompt(tokenizer, q) for q in ("one two three", "the cat sat on")]
    committed: list[int] = []
    for prompt in prompts:
        reference, _ = verifier_generate(model, prompt, max_new_tokens=40)
        result = speculative_generate(model, proposer, prompt, max_new_tokens=40)
        assert result.tokens == reference
        committed += result.stats.committed_per_draft
    # The drafter must actually be accepted, partly and wholly, or the cache crops were not exercised.
    assert sum(c > 1 for c in committed) > len(committed) // 5
    assert max(committed) >= 3


def test_an_eos_stops_both_at_the_same_token(trained):
    model, prompt = trained["model"], trained["prompts"][0]
    proposer = DFlashProposer(trained["drafter"], load_verifier_heads_from_model(model))
    continuation, _ = verifier_generate(model, prompt, max_new_tokens=30)
    eos = continuation[17]  # a token the verifier really produces, taken as its end of turn
    reference, _ = verifier_generate(model, prompt, max_new_tokens=30, eos_token_ids=[eos])
    result = speculative_generate(model, proposer, prompt, max_new_tokens=30, eos_token_ids=[eos])
    assert result.tokens == reference
    assert result.tokens[-1] == eos and eos not in result.tokens[:-1] and len(result.tokens) <= 18


@pytest.mark.slow
def test_lossless_with_smollm2():
    model, tokenizer = load_verifier(EMBEDDED_VERIFIER)
    heads = load_verifier_heads_from_model(model)
    torch.manual_seed(0)
    drafter = DFlashDrafter(drafter_config_for(model.config, tokenizer, block_size=8))  # untrained
    proposer = DFlashProposer(drafter, heads)
    prompts = [p.token_ids for p in load_prompts(EMBEDDED_DATA, tokenizer=tokenizer, limit=2)]
    for index, prompt in enumerate(prompts):
        reference, _ = verifier_generate(model, prompt, max_new_tokens=32 + 8)
        assert speculative_generate(model, proposer, prompt, max_new_tokens=32).tokens == reference[:32]
        if index == 0:
            # Every acceptance length 0..7 in turn, on the real model: crops of every size stay lossless.
            scripted = ScriptedProposer(
                prompt + reference, block_size=8, vocab_size=model.config.vocab_size, right=lambda r: r % 8
            )
            result = speculative_generate(model, scripted, prompt, max_new_tokens=32)
            assert result.tokens == reference[:32]
            assert result.stats.committed_per_draft == [a + 1 for a in expected_rounds(32, lambda r: r % 8)]


# --------------------------------------------------------------------------------------------
# Counters: tau = B for a drafter that is always right, 1 for one that is always wrong
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "right", "tau"),
    [("always right", lambda r: BLOCK - 1, float(BLOCK)), ("always wrong", lambda r: 0, 1.0)],
)
def test_tau_of_an_always_right_and_an_always_wrong_drafter(trained, name, right, tau):
    model, vocab = trained["model"], trained["model"].config.vocab_size
    max_new = 1 + 5 * BLOCK
    for prompt in trained["prompts"][:3]:
        reference, _ = verifier_generate(model, prompt, max_new_tokens=max_new + BLOCK)
        proposer = ScriptedProposer(prompt + reference, block_size=BLOCK, vocab_size=vocab, right=right)
        result = speculative_generate(model, proposer, prompt, max_new_tokens=max_new)
        stats = result.stats
        assert result.tokens == reference[:max_new]
        assert stats.tau == tau
        assert stats.drafts == (5 if tau == BLOCK else max_new - 1)
        assert stats.verifier_forwards == stats.drafts + 1  # + the prefill
        assert stats.accepted_per_position == [stats.drafts if tau == BLOCK else 0] * (BLOCK - 1)
        assert stats.acceptance_per_position == [1.0 if tau == BLOCK else 0.0] * (BLOCK - 1)


def test_counters_follow_the_acceptance_of_every_round(trained):
    model, prompt = trained["model"], trained["prompts"][1]
    reference, _ = verifier_generate(model, prompt, max_new_tokens=40 + BLOCK)
    right = lambda r: (r * 2) % BLOCK  # noqa: E731 - 0, 2, 0, 2, ... with block 4
    proposer = ScriptedProposer(
        prompt + reference, block_size=BLOCK, vocab_size=model.config.vocab_size, right=right
    )
    result = speculative_generate(model, proposer, prompt, max_new_tokens=40)
    rounds = expected_rounds(40, right)
    assert result.tokens == reference[:40]
    assert result.stats.committed_per_draft == [a + 1 for a in rounds]
    assert result.stats.tau == 1 + sum(rounds) / len(rounds)
    assert result.stats.accepted_per_position == [sum(a >= k for a in rounds) for k in (1, 2, 3)]


# --------------------------------------------------------------------------------------------
# The drafter's context cache and the verifier's aux states
# --------------------------------------------------------------------------------------------


class RecomputingProposer(DFlashProposer):
    """Proposes from the cache, and checks each round against the TRAINING forward over all the context."""

    def start(self, *, max_positions: int) -> None:
        super().start(max_positions=max_positions)
        self.aux: list[torch.Tensor] = []
        self.max_error = 0.0
        self.rounds = 0

    def append_context(self, aux_hidden_states: torch.Tensor) -> None:
        super().append_context(aux_hidden_states)
        self.aux.append(aux_hidden_states.clone())

    def draft_logits(self, *, anchor_token: int, position: int) -> torch.Tensor:
        cached = super().draft_logits(anchor_token=anchor_token, position=position)
        config, B = self.drafter.config, self.block_size
        # The training layout: the context rows of one document, the anchor row itself included
        # (masked: a query sees rows < anchor), then one block at the anchor.
        aux = torch.cat([*self.aux, torch.zeros_like(self.aux[0][:1])]).unsqueeze(0)
        assert aux.shape[1] == position + 1
        ids = torch.full((1, B), config.mask_token_id)
        ids[0, 0] = anchor_token
        masks = [
            dense_mask(
                BlockVisibility(
                    anchors=torch.tensor([[position]]), anchor_valid=torch.ones(1, 1, dtype=torch.bool),
                    document_ids=torch.zeros(1, position + 1, dtype=torch.long), block_size=B,
                    window=config.layer_window(i), causal=config.layer_is_causal_in_block(i),
                )
            )
            for i in range(config.num_hidden_layers)
        ]  # fmt: skip
        with torch.no_grad():
            out = self.drafter(
                block_embeds=self.heads.embed(ids),
                aux_hidden_states=aux,
                block_position_ids=torch.arange(position, position + B).unsqueeze(0),
                context_position_ids=torch.arange(position + 1).unsqueeze(0),
                masks=masks,
            )
            recomputed = self.drafter.compute_logits(out.hidden[:, 1:], verifier_lm_head=self.heads.lm_head)[
                0
            ]
        assert torch.equal(recomputed.argmax(-1), cached.argmax(-1)), f"round {self.rounds}: other proposals"
        self.max_error = max(self.max_error, float((recomputed - cached).abs().max()))
        self.rounds += 1
        return cached


@pytest.mark.parametrize(
    "variant",
    ["trained", "sliding window, causal in-block", "sliding window, bidirectional in-block", "reduced vocab"],
)
def test_incremental_context_cache_proposes_what_recomputing_the_context_proposes(trained, variant):
    model, tokenizer = trained["model"], trained["tokenizer"]
    heads = load_verifier_heads_from_model(model)
    if variant == "trained":
        drafter = trained["drafter"]
    else:
        torch.manual_seed(1)
        overrides: dict = {"num_hidden_layers": 2}
        if variant.startswith("sliding"):
            bidirectional = variant.endswith("bidirectional in-block")
            overrides.update(
                layer_types=["sliding_attention"] * 2,
                sliding_window=7,
                sliding_window_non_causal=bidirectional,
            )
        else:
            overrides.update(draft_vocab_size=64)
        drafter = DFlashDrafter(drafter_config_for(model.config, tokenizer, **overrides))
        if variant == "reduced vocab":
            d2t = torch.arange(64) * 5 - torch.arange(64)  # draft id i -> verifier id 5i (an offset)
            t2d = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            t2d[torch.arange(64) * 5] = True
            drafter.set_draft_vocab(d2t=d2t, t2d=t2d, verifier_lm_head=heads.lm_head.weight)
    proposer = RecomputingProposer(drafter, heads)
    committed: list[int] = []
    for prompt in trained["prompts"][:4]:
        result = speculative_generate(model, proposer, prompt, max_new_tokens=30)
        assert proposer.rounds == result.stats.drafts
        assert proposer.max_error < 1e-4
        committed += result.stats.committed_per_draft
        # The aux states appended round by round (from block forwards over the verifier's cache)
        # are what one capture of the whole committed sequence gives, at our layer ids.
        sequence = torch.tensor([prompt + result.tokens])
        captured = capture_hidden_states(model, sequence, layer_ids=drafter.config.aux_hidden_state_layer_ids)
        # (The last round's aux may run past max_new_tokens: its tokens were cut, not its states.)
        appended = torch.cat(proposer.aux)[: sequence.shape[1]]
        torch.testing.assert_close(
            appended, captured[0, : appended.shape[0]].flatten(-2), atol=1e-5, rtol=1e-5
        )
    if variant == "trained":
        assert max(committed) >= 3, "no multi-token acceptance: the cache never grew by several positions"


def test_layer_taps_take_design_2_1_planes_during_a_cached_forward(trained):
    model = trained["model"]
    num_layers = model.config.num_hidden_layers
    ids = torch.tensor([trained["prompts"][0]])
    layer_ids = [0, 2, num_layers]  # the embedding output, an inner plane, the last layer before the norm
    with layer_taps(model, layer_ids) as taps, torch.no_grad():
        model(input_ids=ids, use_cache=True)  # a full forward that fills a KV cache, as decoding runs
    expected = capture_hidden_states(model, ids, layer_ids=layer_ids)
    for k, layer_id in enumerate(layer_ids):
        torch.testing.assert_close(taps[layer_id], expected[:, :, k], atol=0, rtol=0)
    with torch.no_grad():
        normed = model(input_ids=ids, output_hidden_states=True).hidden_states[num_layers]
    assert not torch.allclose(taps[num_layers], normed), "id N must be taken before the final norm"


# --------------------------------------------------------------------------------------------
# Sampling (temperature > 0)
# --------------------------------------------------------------------------------------------


def test_rejection_sampling_commits_tokens_distributed_as_the_verifier():
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.7, 0.1, 0.1, 0.1]])  # a poor drafter: many rejections
    trials = 20000
    first = torch.zeros(4)
    second_given_first_accepted = torch.zeros(4)
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[k], 1, generator=generator)) for k in range(2)]
        accepted, token = rejection_accept(p, q, drafts, generator=generator)
        committed = [*drafts[:accepted], token]
        first[committed[0]] += 1
        if accepted >= 1:
            second_given_first_accepted[committed[1]] += 1
    # The first committed token is distributed as p[0]; given the first draft stood, the next as p[1].
    assert (first / trials - p[0]).abs().max() < 0.015
    second = second_given_first_accepted / second_given_first_accepted.sum()
    assert (second - p[1]).abs().max() < 0.025


def test_sampling_at_a_vanishing_temperature_is_greedy(trained):
    model = trained["model"]
    proposer = DFlashProposer(trained["drafter"], load_verifier_heads_from_model(model))
    generator = torch.Generator().manual_seed(0)
    for prompt in trained["prompts"][:4]:
        reference, _ = verifier_generate(model, prompt, max_new_tokens=30)
        result = speculative_generate(
            model, proposer, prompt, max_new_tokens=30, temperature=1e-4, generator=generator
        )
        assert result.tokens == reference
        assert result.stats.accepted_tokens > 0


def test_sampling_is_reproducible_from_its_seed(trained):
    model, prompt = trained["model"], trained["prompts"][2]
    proposer = DFlashProposer(trained["drafter"], load_verifier_heads_from_model(model))

    def sample(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        result = speculative_generate(
            model, proposer, prompt, max_new_tokens=30, temperature=1.0, generator=generator
        )
        assert len(result.tokens) == 30
        assert sum(result.stats.committed_per_draft) >= 29  # every forward's commit is counted, cut or not
        return result.tokens

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_empty_prompt_is_refused(trained):
    model = trained["model"]
    proposer = DFlashProposer(trained["drafter"], load_verifier_heads_from_model(model))
    with pytest.raises(ValueError, match="empty"):
        speculative_generate(model, proposer, [], max_new_tokens=4)
