"""Speculative decoding with a DFlash drafter and a transformers verifier: what serving measures.

One prompt at a time (batch 1); p is the position of the last committed token (the anchor):

    prefill  verifier(prompt): its argmax is the first new token; aux states of 0..n-1 = context
    round    the drafter, over the context of positions < p, fills [token at p, mask x (B-1)];
             verifier(block) in ONE cached forward; the longest accepted prefix plus the verifier's
             bonus token is committed, its cache cropped, that forward's aux states appended
    stop     max_new_tokens new tokens or an EOS among the newly committed ones (EOS kept)

Greedy is lossless (the verifier's own greedy output, token for token); temperature > 0 uses
rejection sampling, so the output is distributed as the verifier's own sampling. Aux states follow
docs/architecture.md, taken by hooks (`capture.layer_taps`); tau counts as vLLM's (`SpecDecodeStats`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from dflash_core.capture import layer_taps
from dflash_core.masks import BlockVisibility, dense_mask
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass
class SpecDecodeStats:
    """Counters of one or more speculative generations; `merge` adds them up.

    Counted as vLLM's spec-decode counters: a draft is one verifier forward that checked a block
    (the prefill is not one), and tau = 1 + accepted / drafts, the mean tokens committed per such
    forward (vLLM's "mean acceptance length"). A forward's acceptance counts in full even when
    max_new_tokens or an EOS then cuts the committed tokens (vLLM counts before stopping too), so
    an always-right drafter gives tau = B exactly and an always-wrong one 1.
    """

    num_draft_tokens: int  # B - 1
    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens returned (after max_new_tokens / EOS cuts)
    verifier_forwards: int = 0  # prefills + drafts
    drafts: int = 0  # verifier forwards that checked a block (vLLM: spec_decode_num_drafts)
    accepted_tokens: int = 0  # drafted tokens the verifier accepted (vLLM: ..._num_accepted_tokens)
    accepted_per_position: list[int] = field(default_factory=list)  # [B-1]: drafts whose slot k was accepted
    committed_per_draft: list[int] = field(default_factory=list)  # accepted + 1, one entry per draft
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.accepted_per_position:
            self.accepted_per_position = [0] * self.num_draft_tokens

    @property
    def tau(self) -> float:
        """Mean committed tokens per block-checking verifier forward (= 1 + accepted / drafts)."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else float("nan")

    @property
    def acceptance_per_position(self) -> list[float]:
        """Share of drafts whose slot k (1-based position k+1 in the list's index k) was accepted."""
        return [a / self.drafts if self.drafts else float("nan") for a in self.accepted_per_position]

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per verifier forward, the prefill included."""
        return self.new_tokens / self.verifier_forwards if self.verifier_forwards else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    def observe_draft(self, accepted: int) -> None:
        self.drafts += 1
        self.verifier_forwards += 1
        self.accepted_tokens += accepted
        self.committed_per_draft.append(accepted + 1)
        for k in range(accepted):
            self.accepted_per_position[k] += 1

    def merge(self, other: SpecDecodeStats) -> SpecDecodeStats:
        if other.num_draft_tokens != self.num_draft_tokens:
            raise ValueError(
                f"cannot merge stats of {other.num_draft_tokens} and {self.num_draft_tokens} drafts"
            )
        return SpecDecodeStats(
            num_draft_tokens=self.num_draft_tokens,
            prompts=self.prompts + other.prompts,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            new_tokens=self.new_tokens + other.new_tokens,
            verifier_forwards=self.verifier_forwards + other.verifier_forwards,
            drafts=self.drafts + other.drafts,
            accepted_tokens=self.accepted_tokens + other.accepted_tokens,
            accepted_per_position=[
                a + b for a, b in zip(self.accepted_per_position, other.accepted_per_position, strict=True)
            ],
            committed_per_draft=self.committed_per_draft + other.committed_per_draft,
            wall_s=self.wall_s + other.wall_s,
        )


@dataclass
class SpecDecodeResult:
    tokens: list[int]  # the new tokens (prompt excluded)
    stats: SpecDecodeStats


# --------------------------------------------------------------------------------------------
# Proposers: who drafts
# --------------------------------------------------------------------------------------------


@dataclass
class Proposal:
    tokens: list[int]  # B-1 verifier token ids for positions p+1 .. p+B-1
    # [B-1, V] float32: the distribution each token was sampled from, over the VERIFIER vocab
    # (zero outside a reduced draft vocab). None for greedy proposals.
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    """What `speculative_generate` needs from a drafter. A test can implement it with an oracle."""

    block_size: int  # B: the anchor plus B-1 drafts
    aux_layer_ids: Sequence[int]  # verifier layer ids fed to `append_context`; may be empty

    def start(self, *, max_positions: int) -> None:
        """Forget any context; at most `max_positions` positions will be appended."""

    def append_context(self, aux_hidden_states: torch.Tensor) -> None:
        """Aux states [n, K*Hv] (layer-id order) of the next n committed positions, in order."""

    def propose(
        self, *, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        """Draft the B-1 tokens after `anchor_token`, which sits at `position` (= context length)."""


class DFlashProposer:
    """A DFlash drafter with an incremental context KV cache (one (K, V) buffer per layer).

    The verifier's frozen embedding and LM head (`heads`) embed the block and score the drafts
    (through the drafter's own frozen head and d2t with a reduced draft vocab).
    """

    def __init__(self, drafter: DFlashDrafter, heads: VerifierHeads) -> None:
        config = drafter.config
        if heads.hidden_size != config.hidden_size:
            raise ValueError(
                f"the verifier embeds into {heads.hidden_size} dims but the drafter is "
                f"{config.hidden_size} wide"
            )
        self.drafter = drafter.eval()
        self.heads = heads
        self.block_size = config.block_size
        self.aux_layer_ids = list(config.aux_hidden_state_layer_ids)
        param = next(drafter.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self.length = 0  # committed positions whose context k/v are cached

    def start(self, *, max_positions: int) -> None:
        config = self.drafter.config
        shape = (1, config.num_key_value_heads, max_positions, config.head_dim)
        self._keys = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in self.drafter.layers]
        self._values = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in self.drafter.layers]
        self.length = 0

    @torch.no_grad()
    def append_context(self, aux_hidden_states: torch.Tensor) -> None:
        n = aux_hidden_states.shape[0]
        if not self._keys or self.length + n > self._keys[0].shape[2]:
            raise RuntimeError(f"context cache overflow: {self.length} + {n} positions; call start() first")
        positions = torch.arange(self.length, self.length + n, device=self.device).unsqueeze(0)  # [1, n]
        aux = aux_hidden_states.to(device=self.device, dtype=self.dtype).unsqueeze(0)  # [1, n, K*Hv]
        for i, (k, v) in enumerate(self.drafter.context_kv(aux, context_position_ids=positions)):
            self._keys[i][:, :, self.length : self.length + n] = k  # written once, never recomputed
            self._values[i][:, :, self.length : self.length + n] = v
        self.length += n

    def cached_context_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, views of the cached context keys/values [1, Hkv, length, D]."""
        return [
            (k[:, :, : self.length], v[:, :, : self.length])
            for k, v in zip(self._keys, self._values, strict=True)
        ]

    @torch.no_grad()
    def draft_logits(self, *, anchor_token: int, position: int) -> torch.Tensor:
        """Drafter logits [B-1, D] for positions position+1 .. position+B-1 (D = draft vocab)."""
        if position != self.length:
            raise RuntimeError(
                f"the anchor is at position {position} but the drafter's context holds {self.length} "
                "positions; it must hold exactly the committed positions before the anchor"
            )
        config, B = self.drafter.config, self.block_size
        ids = torch.full((1, B), config.mask_token_id, dtype=torch.long, device=self.device)
        ids[0, 0] = anchor_token
        block_positions = torch.arange(position, position + B, device=self.device).unsqueeze(0)
        embeds = self.heads.embed(ids.to(self.heads.embed_tokens.weight.device)).to(self.device, self.dtype)
        hidden = self.drafter.forward_cached(
            block_embeds=embeds,
            block_position_ids=block_positions,
            context_kv=self.cached_context_kv(),
            masks=self._masks(position),
        )  # [1, B, H]
        # Slot 0 (the anchor) drafts nothing; slot k predicts the token at position + k.
        return self.drafter.compute_logits(hidden[:, 1:], verifier_lm_head=self.heads.lm_head)[0]

    def propose(
        self, *, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        logits = self.draft_logits(anchor_token=anchor_token, position=position).float()  # [B-1, D]
        if temperature <= 0:
            draft_ids = logits.argmax(-1)
            return Proposal(tokens=self.drafter.draft_to_target_ids(draft_ids).tolist())
        q = torch.softmax(logits / temperature, dim=-1)  # [B-1, D]
        draft_ids = torch.multinomial(q.cpu(), 1, generator=generator).squeeze(-1).to(q.device)
        target_ids = self.drafter.draft_to_target_ids(draft_ids)
        vocab_ids = self.drafter.draft_to_target_ids(torch.arange(q.shape[-1], device=q.device))
        probs = torch.zeros(q.shape[0], self.drafter.config.vocab_size, device=q.device)
        probs[:, vocab_ids] = q  # draft-vocab probabilities at their verifier ids
        return Proposal(tokens=target_ids.tolist(), probs=probs)

    def _masks(self, position: int) -> list[torch.Tensor | None]:
        """One mask per layer over [context 0..position-1 ; block], from the training definition.

        Full-attention layers that are bidirectional in-block see everything: no mask. Otherwise
        the mask is `dflash_core.masks`' own (window, in-block causality as the config says),
        evaluated for one block anchored at `position` after one document of position + 1 rows,
        minus the anchor's own row (which no query sees: c < anchor).
        """
        config = self.drafter.config
        made: dict[tuple[int | None, bool], torch.Tensor | None] = {}
        masks = []
        for i in range(config.num_hidden_layers):
            key = (config.layer_window(i), config.layer_is_causal_in_block(i))
            if key not in made:
                window, causal = key
                if window is None and not causal:
                    made[key] = None
                else:
                    visibility = BlockVisibility(
                        anchors=torch.tensor([[position]], device=self.device),
                        anchor_valid=torch.ones(1, 1, dtype=torch.bool, device=self.device),
                        document_ids=torch.zeros(1, position + 1, dtype=torch.long, device=self.device),
                        block_size=self.block_size,
                        window=window,
                        causal=causal,
                    )
                    mask = dense_mask(visibility)  # [1, B, position + 1 + B]
                    made[key] = torch.cat((mask[..., :position], mask[..., position + 1 :]), dim=-1)
            masks.append(made[key])
        return masks


# --------------------------------------------------------------------------------------------
# The verifier side: aux hidden states of the forward that scores the block (`layer_taps`)
# --------------------------------------------------------------------------------------------


def _aux_of(captured: dict[int, torch.Tensor], layer_ids: Sequence[int]) -> torch.Tensor:
    """[T, K*H]: the planes of batch row 0 concatenated in layer-id order (the drafter's fc input)."""
    missing = [i for i in layer_ids if i not in captured]
    if missing:
        raise RuntimeError(f"the verifier forward did not reach layer ids {missing}")
    return torch.cat([captured[i][0] for i in layer_ids], dim=-1)


# --------------------------------------------------------------------------------------------
# Acceptance rules
# --------------------------------------------------------------------------------------------


def greedy_accept(target_ids: torch.Tensor | Sequence[int], drafts: Sequence[int]) -> tuple[int, int]:
    """(accepted drafts a, bonus token) for the verifier's argmax ids [B] at the block's positions.

    target_ids[k] is the verifier's choice for the token after block slot k; drafts[k] sits in
    slot k + 1. a = the longest prefix with drafts[k] == target_ids[k]; bonus = target_ids[a].
    """
    targets = target_ids.tolist() if isinstance(target_ids, torch.Tensor) else list(target_ids)
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted, int(targets[accepted])


def rejection_accept(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    drafts: Sequence[int],
    *,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """(accepted drafts a, next token) by speculative rejection sampling.

    target_probs [B, V]: the verifier's distributions after each block slot; draft_probs [B-1, V]:
    the distribution drafts[k] was drawn from. Draft k is accepted with probability
    min(1, p_k(d) / q_k(d)); the first rejection draws from norm(max(p_k - q_k, 0)); if every
    draft is accepted the bonus is drawn from p_{B-1}. The committed tokens are then distributed
    as sampling from p directly (Leviathan et al. 2023, Chen et al. 2023). Random numbers come
    from `generator` (CPU).
    """
    for k, draft in enumerate(drafts):
        p, q = target_probs[k].float().cpu(), draft_probs[k].float().cpu()
        u = float(torch.rand((), generator=generator))
        if q[draft] > 0 and u * float(q[draft]) < float(p[draft]):  # u < p/q, without dividing by ~0
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q: a rejection has probability 0; fall back to p
            residual = p
        return k, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    last = target_probs[len(drafts)].float().cpu()
    return len(drafts), int(torch.multinomial(last, 1, generator=generator))


def reached_stop(tokens: Sequence[int], *, new: int, max_new_tokens: int, eos_token_ids: set[int]) -> bool:
    """Whether decoding ends once a forward has committed the last `new` of `tokens` (the new tokens).

    It ends at max_new_tokens tokens, or when an EOS is among the newly committed ones, wherever
    it sits (an accepted draft or the bonus): what follows an EOS is never returned, so decoding
    on would count drafts that serving never makes (vLLM stops the request there too).
    """
    return len(tokens) >= max_new_tokens or any(t in eos_token_ids for t in tokens[len(tokens) - new :])


def returned_tokens(tokens: Sequence[int], *, max_new_tokens: int, eos_token_ids: set[int]) -> list[int]:
    """The committed tokens a caller gets: at most max_new_tokens, up to and including the first EOS."""
    tokens = list(tokens[:max_new_tokens])
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: i + 1]
    return tokens


def _sample(logits: torch.Tensor, *, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _crop(cache: Any, *, keep: int) -> None:
    """Keep the first `keep` positions of a DynamicCache.

    A negative argument (remove that many) means the same in every transformers release we
    support; a positive one meant "the length to keep" before 5.x and is refused since.
    """
    excess = cache.get_seq_length() - keep
    if excess > 0:
        cache.crop(-excess)


def _cache_kwargs(verifier: nn.Module, cache: Any) -> dict[str, Any]:
    """The KV-cache keyword of this transformers release: `cache` (5.x) or `past_key_values` (4.x)."""
    name = "cache" if "cache" in inspect.signature(verifier.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def _verifier_device(verifier: nn.Module) -> torch.device:
    return next(verifier.parameters()).device


@torch.no_grad()
def speculative_generate(
    verifier: nn.Module,
    proposer: Proposer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> SpecDecodeResult:
    """Generate up to `max_new_tokens` tokens after `prompt_ids` with `proposer` drafting.

    `verifier` is a transformers causal LM (eval mode). Greedy when temperature is 0. The
    result holds the new tokens (ending at the first EOS, kept) and this prompt's stats.
    """
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt is empty: the verifier needs at least one token to condition on")
    B = proposer.block_size
    stats = SpecDecodeStats(num_draft_tokens=B - 1, prompts=1, prompt_tokens=len(prompt_ids))
    device = _verifier_device(verifier)
    eos = set(eos_token_ids)
    layer_ids = list(proposer.aux_layer_ids)
    start_time = time.perf_counter()

    # Prefill: the prompt at positions 0..n-1; its last logits give the token at n.
    n = len(prompt_ids)
    cache = DynamicCache(config=getattr(verifier, "config", None))
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    with layer_taps(verifier, layer_ids) as captured:
        out = verifier(
            input_ids=prompt,
            position_ids=torch.arange(n, device=device).unsqueeze(0),
            **_cache_kwargs(verifier, cache),
            logits_to_keep=1,
        )
    stats.verifier_forwards += 1
    proposer.start(max_positions=n + max_new_tokens + B)
    if layer_ids:
        proposer.append_context(_aux_of(captured, layer_ids))
    tokens = [_sample(out.logits[0, -1], temperature=temperature, generator=generator)]

    new = 1  # tokens the latest verifier forward committed
    while not reached_stop(tokens, new=new, max_new_tokens=max_new_tokens, eos_token_ids=eos):
        p = n + len(tokens) - 1  # position of the anchor (the last committed token)
        proposal = proposer.propose(
            anchor_token=tokens[-1], position=p, temperature=temperature, generator=generator
        )
        if len(proposal.tokens) != B - 1:
            raise RuntimeError(f"the proposer drafted {len(proposal.tokens)} tokens, expected {B - 1}")
        block = torch.tensor([[tokens[-1], *proposal.tokens]], dtype=torch.long, device=device)
        with layer_taps(verifier, layer_ids) as captured:
            out = verifier(
                input_ids=block,
                position_ids=torch.arange(p, p + B, device=device).unsqueeze(0),
                **_cache_kwargs(verifier, cache),
            )
        logits = out.logits[0]  # [B, V]: row k judges the token at p + k + 1
        if temperature <= 0:
            accepted, bonus = greedy_accept(logits.argmax(-1), proposal.tokens)
        else:
            if proposal.probs is None:
                raise RuntimeError("sampling needs the proposer's draft distributions (Proposal.probs)")
            target_probs = torch.softmax(logits.float() / temperature, dim=-1)
            accepted, bonus = rejection_accept(
                target_probs, proposal.probs, proposal.tokens, generator=generator
            )
        stats.observe_draft(accepted)
        # Keep the verifier's cache for positions 0..p+a (anchor + accepted drafts); the bonus at
        # p+a+1 is the next anchor and enters the cache with the next block.
        _crop(cache, keep=p + accepted + 1)
        if layer_ids:
            proposer.append_context(_aux_of(captured, layer_ids)[: accepted + 1])
        tokens.extend([*proposal.tokens[:accepted], bonus])
        new = accepted + 1

    tokens = returned_tokens(tokens, max_new_tokens=max_new_tokens, eos_token_ids=eos)
    stats.new_tokens = len(tokens)
    stats.wall_s = time.perf_counter() - start_time
    return SpecDecodeResult(tokens=tokens, stats=stats)


@torch.no_grad()
def verifier_generate(
    verifier: nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
) -> tuple[list[int], float]:
    """The verifier's own `generate` (no drafter): (new tokens, wall seconds).

    Greedy at temperature 0; otherwise plain temperature sampling (top-k and top-p off, so it
    samples the distribution speculative sampling reproduces). The model's own generation
    config (repetition penalties, top-k, ...) is not used.
    """
    from transformers import GenerationConfig

    device = _verifier_device(verifier)
    eos = list(eos_token_ids)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        top_p=1.0 if temperature > 0 else None,
        eos_token_id=eos,  # [] = never stop early (None would take the model's own EOS)
        pad_token_id=pad_token_id if pad_token_id is not None else (eos[0] if eos else 0),
    )
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    # `generate` fills every field left at its default from the model's generation config
    # (repetition penalties, top-k, ...); with ours in its place, nothing but ours applies.
    own = getattr(verifier, "generation_config", None)
    verifier.generation_config = config
    try:
        start = time.perf_counter()
        output = verifier.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config
        )
        wall = time.perf_counter() - start
    finally:
        verifier.generation_config = own
    return output[0, prompt.shape[1] :].tolist(), wall
