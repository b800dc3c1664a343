"""`dflash export`: write a drafter checkpoint in another layout, or import one into ours.

    dflash export ./checkpoints/checkpoint_best --format zlab --output ./drafter-zlab
    dflash export ./drafter-zlab --format speculators --output ./drafter --verifier Qwen/Qwen3-8B
    dflash export ./checkpoints/checkpoint_best --format speculators --output ./drafter   # a copy

`zlab` is the z-lab / SGLang DFlash layout: the same tensors, a Qwen3 config.json with
`dflash_config.target_layer_ids` = our aux layer ids - 1 (z-lab ids name a layer's output, ours
the residual entering it). `speculators` is our own layout, the one `vllm serve` loads; given a
z-lab checkpoint it converts it back (ids + 1). The source layout is read from config.json.
"""

from __future__ import annotations

import argparse
import logging

from dflash_core.config_args import add_config_arguments, config_from_args
from dflash_core.eval_config import ExportConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportConfig, positional=("checkpoint",))


def run(args: argparse.Namespace) -> int:
    from dflash_core.export_zlab import ExportError, detect_layout, export_checkpoint

    config = config_from_args(ExportConfig, args)
    try:
        source = detect_layout(config.checkpoint)
        verifier = config.verifier or _named_verifier(config, source)
        path = export_checkpoint(
            config.checkpoint,
            config.output,
            layout=config.format,
            num_target_layers=_num_target_layers(verifier) if config.format == "zlab" else None,
            verifier_name_or_path=config.verifier,
            overwrite=config.overwrite,
        )
    except (ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {path} ({config.format} layout, from a {source} checkpoint)")
    return 0


def _named_verifier(config: ExportConfig, source: str) -> str | None:
    """The verifier the source checkpoint names (ours: speculators_config; z-lab: our extra key)."""
    import json

    data = json.loads((config.checkpoint / "config.json").read_text())
    if source == "speculators":
        return ((data.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path") or None
    return data.get("target_model_name_or_path") or None


def _num_target_layers(verifier: str | None) -> int | None:
    """The verifier's decoder-layer count for z-lab's `num_target_layers`; None (and a warning) if unknown."""
    if not verifier:
        logger.warning("no verifier known: config.json gets no num_target_layers (pass --verifier to add it)")
        return None
    from dflash_core.verifier import load_verifier_config

    try:
        config = load_verifier_config(verifier)
    except Exception as exc:  # offline hub id, missing folder: the field is informational for readers
        logger.warning("cannot read %s's config (%s): config.json gets no num_target_layers", verifier, exc)
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)
