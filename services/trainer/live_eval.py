"""Live acceptance during training (`--eval-every`): tau on held-out prompts, as `dflash eval` counts it.

Set up once, before the first step (`build_live_acceptance`): the prompts (`--eval-prompts`, else
the data's validation rows cut before their first supervised token), the verifier's greedy
continuation of each (the service's Generate, else the verifier in this process), and the hidden
states of prompt + continuation, kept on the CPU for the run. Each evaluation is drafter forwards
only, in rows of the training shape (no new memory peak, no recompilation), replayed by
`dflash_core.live_acceptance`.

Under FSDP prompt i belongs to rank i mod W; every rank runs as many drafting forwards as the
busiest (an FSDP2 forward is collective), padding with placeholder rows, and the counters are
summed with one all-reduce.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dflash_core.anchors import trim_anchor_padding
from dflash_core.batch import PackedBatch, placeholder_batch
from dflash_core.config import TrainConfig
from dflash_core.eval_prompts import EvalPrompt, load_prompts, prepared_row_prompt
from dflash_core.live_acceptance import (
    DraftRow,
    EvalSequence,
    anchors_per_prompt,
    batch_of,
    continuation_length,
    draft_at_anchors,
    plan_draft_rows,
    replay_greedy,
    row_length,
)
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.objective import AttentionKind
from dflash_core.spec_decode import SpecDecodeStats
from dflash_core.verifier import VerifierFingerprint
from services.trainer.batches import TokenRows
from services.trainer.distributed import DistContext
from services.trainer.live_eval_cache import cache_file, cached_sequences
from services.trainer.sources import HiddenStateSource, SampleRequest

logger = logging.getLogger(__name__)

# prompts -> one greedy continuation of exactly `length` tokens per prompt
Continue = Callable[[list[list[int]], int], list[list[int]]]


# --------------------------------------------------------------------------------------------
# The verifier's side, once
# --------------------------------------------------------------------------------------------


def service_continuations(client: Any) -> Continue:
    """Greedy continuations from the service's Generate RPC (a `GenerateClient`).

    Generate stops at the verifier's EOS; the rounds need the tokens after it (a drafter may be
    accepted past an EOS), so a reply that stopped short is continued from prompt + reply, EOS
    included, until it is `length` tokens long. Greedy, so the pieces are the one continuation.
    """

    def complete(prompts: list[list[int]], length: int) -> list[list[int]]:
        replies: list[list[int]] = [[] for _ in prompts]
        while True:
            by_remaining: dict[int, list[int]] = {}
            for i, reply in enumerate(replies):
                if len(reply) < length:
                    by_remaining.setdefault(length - len(reply), []).append(i)
            if not by_remaining:
                return replies
            for remaining, indices in by_remaining.items():
                pieces = client.complete(
                    [prompts[i] + replies[i] for i in indices],
                    max_new_tokens=remaining,
                    temperature=0.0,
                    keep_stop_token=True,
                )
                for i, piece in zip(indices, pieces, strict=True):
                    if not piece:
                        raise RuntimeError(
                            "the service's Generate returned no token for a live-acceptance prompt"
                        )
                    replies[i] += piece[:remaining]

    return complete


def in_process_continuations(model: torch.nn.Module) -> Continue:
    """Greedy continuations from the verifier in this process (`verifier_generate`, no EOS stop)."""
    from dflash_core.spec_decode import verifier_generate

    def complete(prompts: list[list[int]], length: int) -> list[list[int]]:
        return [verifier_generate(model, p, max_new_tokens=length, eos_token_ids=())[0] for p in prompts]

    return complete


def select_prompts(
    config: TrainConfig,
    *,
    tokenizer: Any,
    rows: TokenRows | None,
    val_indices: Sequence[int],
    max_length: int | None,
) -> list[EvalPrompt]:
    """The live-acceptance prompts (every rank gets the same list): --eval-prompts, else the validation
    rows; only prompts whose row fits --total-seq-len (and the service's max length) are taken."""
    max_new = config.eval_max_new_tokens
    length = continuation_length(max_new_tokens=max_new, block_size=config.block_size)

    def fits(prompt: EvalPrompt) -> bool:
        n = len(prompt.token_ids)
        within_row = row_length(prompt_tokens=n, max_new_tokens=max_new) <= config.total_seq_len
        return within_row and (max_length is None or n + length <= max_length)

    if config.eval_prompts is not None:
        # Read a few more than asked for: some may be too long for a training row.
        candidates = load_prompts(config.eval_prompts, tokenizer=tokenizer, limit=4 * config.eval_num_prompts)
        source = config.eval_prompts
    else:
        if rows is None:
            raise ValueError("live acceptance from the validation rows needs the data rows")
        candidates = []
        for index in val_indices:
            ids, mask = rows.get(index)
            prompt = prepared_row_prompt(ids.tolist(), mask.tolist(), where=f"{config.data_path}:{index + 1}")
            if prompt is not None:
                candidates.append(prompt)
        source = f"the validation rows of {config.data_path}"
    prompts = [p for p in candidates if fits(p)][: config.eval_num_prompts]
    if not prompts:
        raise ValueError(
            f"--eval-every: none of the prompts of {source} fits a training row with --eval-max-new-tokens "
            f"{max_new} (prompt + {max_new - 1} tokens <= --total-seq-len {config.total_seq_len}); pass "
            "shorter --eval-prompts, a smaller --eval-max-new-tokens or a larger --total-seq-len"
        )
    if len(prompts) < config.eval_num_prompts:
        logger.info(
            "live acceptance: %d prompts from %s (fewer than --eval-num-prompts %d fit)",
            len(prompts), source, config.eval_num_prompts,
        )  # fmt: skip
    return prompts


def fetch_sequences(
    prompts: Sequence[EvalPrompt],
    *,
    max_new_tokens: int,
    block_size: int,
    continue_greedily: Continue,
    hidden_states: HiddenStateSource,
) -> list[EvalSequence]:
    """Each prompt's greedy continuation and the aux hidden states of its row (kept on the CPU)."""
    length = continuation_length(max_new_tokens=max_new_tokens, block_size=block_size)
    continuations = continue_greedily([list(p.token_ids) for p in prompts], length)
    sequences = [
        EvalSequence(prompt_ids=list(p.token_ids), continuation=c, max_new_tokens=max_new_tokens)
        for p, c in zip(prompts, continuations, strict=True)
    ]
    requests = [
        SampleRequest(sample_id=i, input_ids=torch.tensor(s.row_ids, dtype=torch.long))
        for i, s in enumerate(sequences)
    ]
    for sequence, states in zip(sequences, hidden_states.extract(requests), strict=True):
        # A copy: a remote source's tensors view its reusable receive buffers.
        sequence.aux = states.aux.detach().to("cpu", copy=True)
    return sequences


# --------------------------------------------------------------------------------------------
# Every evaluation: drafter forwards only
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowShape:
    """The training row shape the drafting forwards reuse."""

    total_seq_len: int
    max_anchors: int
    rows_per_forward: int


class LiveAcceptance:
    """This rank's share of the live-acceptance prompts, ready to be drafted for at any step."""

    def __init__(
        self,
        *,
        sequences: list[EvalSequence],
        num_prompts: int,
        forwards: int,
        block_size: int,
        eos_token_ids: Sequence[int],
        shape: RowShape,
    ) -> None:
        """`sequences`: this rank's (hidden states fetched); `num_prompts`: over all ranks;
        `forwards`: drafting forwards every rank runs per evaluation (the busiest rank's count)."""
        self.sequences = sequences
        self.num_prompts = num_prompts
        self.forwards = forwards
        self.block_size = block_size
        self.eos_token_ids = set(eos_token_ids)
        self.shape = shape
        self.rows = plan_draft_rows(
            [len(s.row_ids) for s in sequences],
            anchors=[anchors_per_prompt(s.max_new_tokens) for s in sequences],
            total_seq_len=shape.total_seq_len,
            max_anchors=shape.max_anchors,
        )

    @torch.no_grad()
    def evaluate(
        self,
        drafter: DFlashDrafter,
        heads: VerifierHeads,
        *,
        attention: AttentionKind,
        autocast_dtype: torch.dtype | None,
        device: torch.device,
        dist: DistContext,
    ) -> SpecDecodeStats:
        """Counters over every rank's prompts (the same on every rank). Collective under FSDP."""
        drafter.eval()
        B, R = self.block_size, self.shape.rows_per_forward
        drafts = [
            torch.zeros(anchors_per_prompt(s.max_new_tokens), B - 1, dtype=torch.long) for s in self.sequences
        ]
        for f in range(self.forwards):
            rows = self.rows[f * R : (f + 1) * R]
            if rows:
                batch, anchors, valid = batch_of(
                    rows,
                    self.sequences,
                    total_seq_len=self.shape.total_seq_len,
                    max_anchors=self.shape.max_anchors,
                    hidden_dtype=autocast_dtype or torch.float32,
                )
            else:  # this rank is done, the others are not: take part in the collectives, add nothing
                batch, anchors, valid = self._placeholder(drafter, autocast_dtype or torch.float32)
            if attention != "flex":  # as in training: SDPA trims to the most anchors a row has
                anchors, valid = trim_anchor_padding(anchors, valid)
            with _autocast(device, autocast_dtype):
                ids = draft_at_anchors(
                    drafter,
                    heads,
                    batch.to(device),
                    anchors=anchors.to(device),
                    anchor_valid=valid.to(device),
                    attention=attention,
                )
            ids = ids.cpu()  # host sync, once per drafting forward
            _scatter(rows, ids, drafts)
        total = SpecDecodeStats(num_draft_tokens=B - 1)
        for sequence, proposed in zip(self.sequences, drafts, strict=True):
            total = total.merge(
                replay_greedy(sequence, proposed.tolist(), block_size=B, eos_token_ids=self.eos_token_ids)
            )
        return _summed(total, dist=dist, device=device)

    def _placeholder(
        self, drafter: DFlashDrafter, dtype: torch.dtype
    ) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
        """A padding row on the CPU and one row of anchors, none valid: drafts nothing."""
        batch = placeholder_batch(
            drafter.config, total_seq_len=self.shape.total_seq_len, dtype=dtype, with_targets=False
        )
        anchors = torch.zeros(1, self.shape.max_anchors, dtype=torch.long)
        return batch, anchors, anchors.bool()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _scatter(rows: Sequence[DraftRow], ids: torch.Tensor, drafts: list[torch.Tensor]) -> None:
    """Proposals [R, N, B-1] of a forward into each sequence's [rounds, B-1] table."""
    for b, row in enumerate(rows):
        for k, (_, sequence, round_index) in enumerate(row.anchors):
            drafts[sequence][round_index] = ids[b, k]


def _summed(stats: SpecDecodeStats, *, dist: DistContext, device: torch.device) -> SpecDecodeStats:
    """The counters summed over ranks (one all-reduce; a no-op on one rank)."""
    if not dist.is_distributed:
        return stats
    counters = torch.tensor(
        [stats.prompts, stats.prompt_tokens, stats.new_tokens, stats.verifier_forwards, stats.drafts,
         stats.accepted_tokens, *stats.accepted_per_position],
        dtype=torch.long, device=device,
    )  # fmt: skip
    values = dist.sum_(counters).tolist()
    return SpecDecodeStats(
        num_draft_tokens=stats.num_draft_tokens,
        prompts=values[0],
        prompt_tokens=values[1],
        new_tokens=values[2],
        verifier_forwards=values[3],
        drafts=values[4],
        accepted_tokens=values[5],
        accepted_per_position=values[6:],
    )


def acceptance_metrics(stats: SpecDecodeStats) -> dict[str, float]:
    """`eval/tau`, `eval/accept_rate_pos{k}` (share of drafts whose first k tokens were accepted), counts."""
    metrics = {
        "eval/tau": stats.tau,
        "eval/drafts": float(stats.drafts),
        "eval/accepted_tokens": float(stats.accepted_tokens),
        "eval/new_tokens": float(stats.new_tokens),
        "eval/prompts": float(stats.prompts),
    }
    for k, rate in enumerate(stats.acceptance_per_position, start=1):
        metrics[f"eval/accept_rate_pos{k}"] = rate
    return metrics


# --------------------------------------------------------------------------------------------
# Building it
# --------------------------------------------------------------------------------------------


def build_live_acceptance(
    config: TrainConfig,
    *,
    rows: TokenRows | None,
    val_indices: Sequence[int],
    tokenizer: Any,
    eos_token_ids: Sequence[int],
    model: torch.nn.Module | None,
    fingerprint: VerifierFingerprint,
    target_layer_ids: list[int],
    dist: DistContext,
) -> LiveAcceptance | None:
    """The live evaluation `config` asks for (None when --eval-every is off); fetches what it needs."""
    if not config.eval_every:
        return None
    from services.trainer.sources import InProcessSource

    with contextlib.ExitStack() as opened:
        max_length: int | None = None
        hidden_states: HiddenStateSource
        if config.hidden_states_endpoint:
            from services.hidden_states.generate_client import GenerateClient
            from services.trainer.grpc_source import GrpcSource

            client = opened.enter_context(
                GenerateClient(config.hidden_states_endpoint, connect_timeout_s=config.service_timeout_s)
            )
            continue_greedily, max_length = service_continuations(client), client.max_length
            # A client of its own, outside the sample cache: eval ids never meet training sample ids.
            hidden_states = GrpcSource.from_config(
                config,
                target_layer_ids=target_layer_ids,
                expected=fingerprint,
                inflight_bytes=min(config.inflight_bytes, 256 << 20),
                streams_per_endpoint=1,
            )
            opened.callback(hidden_states.close)
            where = f"service {', '.join(config.hidden_states_endpoint)}"
        else:
            assert model is not None, "live acceptance without a service needs the verifier in this process"
            continue_greedily = in_process_continuations(model)
            hidden_states = InProcessSource(
                model=model, fingerprint=fingerprint, target_layer_ids=target_layer_ids
            )
            where = "the verifier in this process"
        prompts = select_prompts(
            config, tokenizer=tokenizer, rows=rows, val_indices=val_indices, max_length=max_length
        )
        mine = prompts[dist.rank :: dist.world_size]
        key = dict(
            verifier=fingerprint.model_dump(mode="json"), target_layer_ids=list(target_layer_ids),
            block_size=config.block_size, max_new_tokens=config.eval_max_new_tokens,
            source="service" if config.hidden_states_endpoint else "in-process",
            prompts=[list(p.token_ids) for p in mine],
        )  # fmt: skip
        sequences = cached_sequences(
            cache_file(config.save_path, rank=dist.rank, world_size=dist.world_size),
            key=key,
            fetch=lambda: fetch_sequences(
                mine,
                max_new_tokens=config.eval_max_new_tokens,
                block_size=config.block_size,
                continue_greedily=continue_greedily,
                hidden_states=hidden_states,
            ),
        ) if mine else []  # fmt: skip
    shape = RowShape(
        total_seq_len=config.total_seq_len, max_anchors=config.max_anchors, rows_per_forward=config.batch_size
    )
    # Every rank computes every rank's count from the prompt lengths alone: no collective to agree.
    forwards = max(
        _forward_count(prompts[r :: dist.world_size], config=config, shape=shape)
        for r in range(dist.world_size)
    )
    logger.info(
        "live acceptance every %d steps: %d prompts (%s), %d new tokens each, %d drafting forwards/eval",
        config.eval_every, len(prompts), where, config.eval_max_new_tokens, forwards,
    )  # fmt: skip
    return LiveAcceptance(
        sequences=sequences,
        num_prompts=len(prompts),
        forwards=forwards,
        block_size=config.block_size,
        eos_token_ids=eos_token_ids,
        shape=shape,
    )


def _forward_count(prompts: Sequence[EvalPrompt], *, config: TrainConfig, shape: RowShape) -> int:
    max_new = config.eval_max_new_tokens
    rows = plan_draft_rows(
        [row_length(prompt_tokens=len(p.token_ids), max_new_tokens=max_new) for p in prompts],
        anchors=[anchors_per_prompt(max_new)] * len(prompts),
        total_seq_len=shape.total_seq_len,
        max_anchors=shape.max_anchors,
    )
    return math.ceil(len(rows) / shape.rows_per_forward)


def load_generation_config(name_or_path: str) -> Any:
    """The verifier's generation config (its EOS ids), or None where it cannot be read locally."""
    from transformers import GenerationConfig

    if name_or_path.startswith("embedded:") or name_or_path.lower().endswith(".gguf"):
        return None  # the embedded GGUF verifier: its tokenizer and config name the EOS
    try:
        return GenerationConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):  # none saved, or offline: the tokenizer's and config's EOS remain
        return None
