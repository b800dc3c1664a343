"""`dflash eval` with the transformers engine: load, check the pair, decode, report.

    report = run_eval(EvalConfig(checkpoint=..., verifier=..., prompts="chitchat"))
    print(format_report(report))

The drafter is decoded against the verifier by `dflash_core.spec_decode` (batch 1, one prompt at
a time); without-drafter speed is the verifier's own `generate` on the same prompts. Before any
of that the drafter and the verifier are checked to belong together (`verifier_mismatches`): a
drafter run against another verifier decodes losslessly and accepts ~nothing, which looks like a
bad drafter rather than a wrong pairing.

The report (`EvalReport`) is what both engines produce; `services/cli/eval_vllm.py` fills it from
vLLM's counters.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dflash_core.config import EMBEDDED_VERIFIER
from dflash_core.eval_config import EvalConfig
from dflash_core.model.config import DrafterConfig

logger = logging.getLogger(__name__)

TAU_CONVENTION = (
    "tau = 1 + accepted draft tokens / drafts = mean tokens committed per verifier forward that checked "
    "a block (the prefill's first token is not counted), as vLLM's mean acceptance length"
)


class VerifierMismatchError(ValueError):
    """The drafter was trained for another verifier; the message names both sides."""


@dataclass
class EvalReport:
    engine: str
    checkpoint: str
    verifier: str
    prompts: str
    num_prompts: int
    block_size: int
    max_new_tokens: int
    temperature: float
    tau: float
    acceptance_per_position: list[float]  # [B-1]: share of drafts whose slot k was accepted
    drafts: int
    accepted_tokens: int
    accepted_per_position: list[int]
    new_tokens: int
    tokens_per_s: float  # with the drafter
    baseline_tokens_per_s: float | None = None  # the verifier alone
    verifier_forwards: int | None = None  # transformers engine: prefills + drafts
    outputs_identical: int | None = None  # greedy: prompts whose output equals the verifier's own
    notes: list[str] = field(default_factory=list)
    tau_convention: str = TAU_CONVENTION
    # transformers engine: one entry a prompt (source "file:line", drafts, accepted_tokens,
    # accepted_per_position), so figures can be split by kind of prompt.
    per_prompt: list[dict[str, Any]] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        if not self.baseline_tokens_per_s:
            return None
        return self.tokens_per_s / self.baseline_tokens_per_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["speedup"] = self.speedup
        # JSON has no NaN: a run without a single draft has no tau.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# The drafter belongs to the verifier
# --------------------------------------------------------------------------------------------


def _resolvable_locally(name: str) -> bool:
    return name == EMBEDDED_VERIFIER or name.lower().endswith(".gguf") or Path(name).exists()


def verifier_mismatches(
    drafter: DrafterConfig, *, verifier_config: Any, tokenizer: Any, verifier_name: str
) -> list[str]:
    """One line per way the drafter does not fit this verifier (empty = they fit), naming both sides.

    Checks what the checkpoint records (vocab, hidden size, architecture, aux layer ids in
    0..N). When the checkpoint names a different verifier that is available locally (a folder,
    a .gguf, the embedded default) its tokenizer and chat-template fingerprint is compared too.
    """
    from dflash_core.verifier import fingerprint_of, load_tokenizer, load_verifier_config

    text = (
        verifier_config.get_text_config() if hasattr(verifier_config, "get_text_config") else verifier_config
    )
    trained_for = drafter.verifier_name_or_path or "(unnamed)"
    ours, theirs = f"drafter, trained for {trained_for!r}", f"--verifier {verifier_name!r}"
    problems = []
    num_layers = int(text.num_hidden_layers)
    for label, mine, yours in (
        ("vocab size", drafter.vocab_size, int(text.vocab_size)),
        ("hidden size", drafter.verifier_hidden_size, int(text.hidden_size)),
    ):
        if mine != yours:
            problems.append(f"{label}: {mine} ({ours}) vs {yours} ({theirs})")
    if drafter.hidden_size != int(text.hidden_size) and drafter.verifier_hidden_size == int(text.hidden_size):
        problems.append(
            f"embedding width: the drafter is {drafter.hidden_size} wide but {theirs} embeds into "
            f"{int(text.hidden_size)} (block tokens use the verifier's embedding)"
        )
    out_of_range = [i for i in drafter.aux_hidden_state_layer_ids if i > num_layers]
    if out_of_range:
        problems.append(
            f"aux layer ids {drafter.aux_hidden_state_layer_ids} ({ours}) need ids up to "
            f"{max(out_of_range)}, but {theirs} has {num_layers} decoder layers (valid ids 0..{num_layers})"
        )
    architectures = list(getattr(verifier_config, "architectures", None) or [])
    if drafter.verifier_architectures and architectures and drafter.verifier_architectures != architectures:
        problems.append(
            f"architecture: {drafter.verifier_architectures} ({ours}) vs {architectures} ({theirs})"
        )
    same_name = _normalise(drafter.verifier_name_or_path) == _normalise(verifier_name)
    if not problems and drafter.verifier_name_or_path and not same_name:
        if _resolvable_locally(drafter.verifier_name_or_path):
            recorded = fingerprint_of(
                load_verifier_config(drafter.verifier_name_or_path),
                load_tokenizer(drafter.verifier_name_or_path),
                name_or_path="verifier",
            )
            given = fingerprint_of(verifier_config, tokenizer, name_or_path="verifier")
            problems += recorded.mismatches(given, this_side=ours, other_side=theirs)
        else:
            logger.info(
                "the checkpoint names %s, which is not available locally; checked vocab, hidden size, "
                "architecture and layer ids against %s only",
                drafter.verifier_name_or_path,
                verifier_name,
            )
    return problems


def _normalise(name: str) -> str:
    path = Path(name)
    return str(path.resolve()) if path.exists() else name.rstrip("/")


def check_verifier(
    drafter: DrafterConfig, *, verifier_config: Any, tokenizer: Any, verifier_name: str
) -> None:
    """Raise VerifierMismatchError listing every mismatch (see `verifier_mismatches`)."""
    problems = verifier_mismatches(
        drafter, verifier_config=verifier_config, tokenizer=tokenizer, verifier_name=verifier_name
    )
    if problems:
        raise VerifierMismatchError(
            "the drafter does not belong to this verifier (it would decode losslessly but accept "
            "~nothing):\n  "
            + "\n  ".join(problems)
            + "\nPass the verifier the drafter was trained for (--verifier), or evaluate another checkpoint."
        )
    if drafter.verifier_name_or_path and _normalise(drafter.verifier_name_or_path) != _normalise(
        verifier_name
    ):
        logger.info(
            "decoding with %s instead of the checkpoint's %s: vocab, hidden size, architecture and layer ids "
            "agree", verifier_name, drafter.verifier_name_or_path,
        )  # fmt: skip


def resolve_verifier_name(config: EvalConfig, drafter: DrafterConfig) -> str:
    name = config.verifier or drafter.verifier_name_or_path
    if not name:
        raise VerifierMismatchError(
            f"{config.checkpoint}/config.json names no verifier (speculators_config.verifier.name_or_path); "
            "pass --verifier"
        )
    return name


def eos_token_ids(tokenizer: Any, model_config: Any, generation_config: Any = None) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS and the model's (chat models add end-of-turn)."""
    ids: list[int] = []
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(generation_config, "eos_token_id", None),
        getattr(model_config, "eos_token_id", None),
    ):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


# --------------------------------------------------------------------------------------------
# The transformers engine
# --------------------------------------------------------------------------------------------


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _device_and_dtype(config: EvalConfig) -> tuple[torch.device, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
    else:
        dtype = torch.float32 if config.dtype == "float32" else torch.bfloat16
    return resolved, dtype


def run_eval(config: EvalConfig) -> EvalReport:
    """Speculative decoding of every prompt with the transformers engine; the aggregate report."""
    from dflash_core.eval_prompts import load_prompts
    from dflash_core.export_zlab import load_any_checkpoint
    from dflash_core.model.drafter import DFlashDrafter
    from dflash_core.spec_decode import (
        DFlashProposer,
        SpecDecodeStats,
        speculative_generate,
        verifier_generate,
    )
    from dflash_core.verifier import load_verifier, load_verifier_heads_from_model

    device, dtype = _device_and_dtype(config)
    drafter_config, state_dict = load_any_checkpoint(config.checkpoint, verifier_name_or_path=config.verifier)
    verifier_name = resolve_verifier_name(config, drafter_config)
    model, tokenizer = load_verifier(verifier_name, device=device, dtype=dtype)
    check_verifier(
        drafter_config, verifier_config=model.config, tokenizer=tokenizer, verifier_name=verifier_name
    )

    drafter = DFlashDrafter(drafter_config)
    drafter.load_state_dict(state_dict)
    drafter.to(device=device, dtype=dtype).eval()
    proposer = DFlashProposer(drafter, load_verifier_heads_from_model(model))
    prompts = load_prompts(config.prompts, tokenizer=tokenizer, limit=config.num_prompts)
    eos = eos_token_ids(tokenizer, model.config, getattr(model, "generation_config", None))
    generator = torch.Generator().manual_seed(config.seed)
    decode = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, eos_token_ids=eos)

    # The first prompt is decoded once, untimed, by each loop, so one-time costs (allocations,
    # kernel selection for each new shape) stay out of tokens/s. A 4-token warm-up was not enough:
    # on an H200 the first timed prompt then ran 3-4 times slower than the ones after it.
    speculative_generate(model, proposer, prompts[0].token_ids, **decode, generator=generator)
    if config.baseline:
        verifier_generate(model, prompts[0].token_ids, **decode)
    generator.manual_seed(config.seed)

    total = SpecDecodeStats(num_draft_tokens=drafter_config.block_size - 1)
    baseline_tokens, baseline_s, identical = 0, 0.0, 0
    per_prompt: list[dict[str, Any]] = []
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        result = speculative_generate(model, proposer, prompt.token_ids, **decode, generator=generator)
        total = total.merge(result.stats)
        per_prompt.append(
            {
                "source": prompt.source,
                "drafts": result.stats.drafts,
                "accepted_tokens": result.stats.accepted_tokens,
                "accepted_per_position": list(result.stats.accepted_per_position),
            }
        )
        if config.baseline:
            reference, seconds = verifier_generate(model, prompt.token_ids, **decode)
            baseline_tokens += len(reference)
            baseline_s += seconds
            if reference == result.tokens:
                identical += 1
            elif config.temperature == 0:
                logger.warning(
                    "prompt %s: the speculative output differs from the verifier's greedy output at token %d "
                    "(dtype %s: a near-tie rounded differently?)",
                    prompt.source,
                    _first_difference(reference, result.tokens),
                    dtype,
                )  # fmt: skip
        logger.info(
            "prompt %d/%d (%s): %d tokens, tau so far %.3f (%.0f s)",
            index + 1, len(prompts), prompt.source, result.stats.new_tokens, total.tau,
            time.perf_counter() - started,
        )  # fmt: skip

    notes = [f"transformers engine on {device} in {str(dtype).removeprefix('torch.')}, batch 1"]
    if config.verifier and config.verifier != drafter_config.verifier_name_or_path:
        notes.append(f"checkpoint trained for {drafter_config.verifier_name_or_path or '(unnamed)'}")
    return EvalReport(
        engine="transformers",
        checkpoint=str(config.checkpoint),
        verifier=verifier_name,
        prompts=config.prompts,
        num_prompts=len(prompts),
        block_size=drafter_config.block_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        tau=total.tau,
        acceptance_per_position=total.acceptance_per_position,
        drafts=total.drafts,
        accepted_tokens=total.accepted_tokens,
        accepted_per_position=list(total.accepted_per_position),
        new_tokens=total.new_tokens,
        tokens_per_s=total.tokens_per_s,
        baseline_tokens_per_s=baseline_tokens / baseline_s if config.baseline and baseline_s > 0 else None,
        verifier_forwards=total.verifier_forwards,
        outputs_identical=identical if config.baseline and config.temperature == 0 else None,
        notes=notes,
        per_prompt=per_prompt,
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_report(report: EvalReport) -> str:
    """The report as a plain-text table (what `dflash eval` prints)."""
    B = report.block_size
    lines = [
        f"dflash eval ({report.engine}): {report.checkpoint}",
        f"  verifier {report.verifier}; prompts {report.prompts} ({report.num_prompts}); block size {B} "
        f"({B - 1} drafts); max new tokens {report.max_new_tokens}; temperature {report.temperature:g}",
        "",
        f"{'metric':<44}{'value':>12}",
        f"{'tau (mean acceptance length)':<44}{_fmt(report.tau):>12}",
        f"{'drafts (verifier forwards checking a block)':<44}{report.drafts:>12}",
        f"{'accepted draft tokens':<44}{report.accepted_tokens:>12}",
        f"{'new tokens':<44}{report.new_tokens:>12}",
    ]
    if report.verifier_forwards is not None:
        per_forward = report.new_tokens / report.verifier_forwards if report.verifier_forwards else None
        lines.append(f"{'new tokens per verifier forward (+ prefill)':<44}{_fmt(per_forward):>12}")
    lines += [
        f"{'tokens/s with drafter':<44}{_fmt(report.tokens_per_s, '.1f'):>12}",
        f"{'tokens/s without drafter':<44}{_fmt(report.baseline_tokens_per_s, '.1f'):>12}",
        f"{'speedup':<44}{_fmt(report.speedup, '.2f'):>12}",
    ]
    if report.outputs_identical is not None:
        value = f"{report.outputs_identical}/{report.num_prompts}"
        lines.append(f"{'greedy output identical to the verifier':<44}{value:>12}")
    lines += ["", f"{'draft position':<16}{'accepted':>10}{'rate':>10}"]
    for k, (count, rate) in enumerate(
        zip(report.accepted_per_position, report.acceptance_per_position, strict=True), start=1
    ):
        lines.append(f"{k:<16}{count:>10}{_fmt(rate):>10}")
    lines += ["", f"{report.tau_convention}."]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
