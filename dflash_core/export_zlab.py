"""Our checkpoints (speculators layout) <-> the z-lab / SGLang DFlash layout, both directions.

The layout (read from z-lab's `dflash/model.py`, SGLang's `speculative/dflash_utils.py` and
speculators' `convert/dflash/converter.py`; no code copied) is described in
docs/eval_and_export.md. Invariants:
- tensors keep our names and are copied unchanged;
- layer ids shift by one: z-lab id = our id - 1 (our id 0 is refused; our id N warns);
- a reduced draft vocab is refused (the layout has no `d2t`/`t2d`);
- the verifier's name travels under `target_model_name_or_path` / `target_architectures`, keys
  every reader ignores, so ours -> z-lab -> ours gives back the same config.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from dflash_core.atomic_files import atomic_folder
from dflash_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from dflash_core.model.config import DrafterConfig
from dflash_core.speculators_config import drafter_config_from_speculators, drafter_config_to_speculators

logger = logging.getLogger(__name__)

ZLAB_ARCHITECTURE = "DFlashDraftModel"
# config.json keys of the z-lab layout that are not part of the draft layers' Qwen3 config.
ZLAB_EXTRA_KEYS = (
    "architectures",
    "auto_map",
    "block_size",
    "dflash_config",
    "num_target_layers",
    "target_hidden_size",
    "target_model_name_or_path",
    "target_architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
)

Layout = Literal["speculators", "zlab"]


class ExportError(ValueError):
    """The checkpoint cannot be written in the requested layout; the message says why."""


def to_zlab_layer_ids(ids: list[int]) -> list[int]:
    """Our ids (id L = residual entering layer L) -> z-lab ids (output of layer id).

    A missing shift fails silently: the drafter still loads and accepts about one token."""
    if 0 in ids:
        raise ExportError(
            f"aux layer ids {ids} include 0 (the embedding output), which the z-lab layout cannot express: "
            "its ids name the output of a decoder layer (our id L = z-lab id L - 1)"
        )
    return [i - 1 for i in ids]


def from_zlab_layer_ids(ids: list[int]) -> list[int]:
    """z-lab ids -> ours: z-lab id i reads `output_hidden_states[i + 1]`, our id i + 1."""
    return [int(i) + 1 for i in ids]


def detect_layout(folder: str | Path) -> Layout:
    """`speculators` (ours) or `zlab`, from config.json; ExportError for anything else."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{folder} is not a checkpoint: it has no {CONFIG_FILE}")
    config = json.loads(path.read_text())
    if config.get("speculators_model_type") == "dflash":
        return "speculators"
    if "dflash_config" in config or ZLAB_ARCHITECTURE in (config.get("architectures") or []):
        return "zlab"
    raise ExportError(
        f"{path} is neither a speculators DFlash config (speculators_model_type: dflash) nor a z-lab one "
        "(dflash_config / architectures DFlashDraftModel)"
    )


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def zlab_config(
    cfg: DrafterConfig, *, num_target_layers: int | None, dtype: torch.dtype | str = "float32"
) -> dict[str, Any]:
    """The z-lab config.json dict for `cfg` (the layout is in docs/eval_and_export.md)."""
    if cfg.has_reduced_vocab:
        raise ExportError(
            f"this drafter has a reduced draft vocab ({cfg.draft_vocab_size} of {cfg.vocab_size}); the z-lab "
            "layout has no d2t/t2d and always drafts over the verifier's full vocab"
        )
    target_ids = to_zlab_layer_ids(list(cfg.aux_hidden_state_layer_ids))
    if num_target_layers is not None and num_target_layers in cfg.aux_hidden_state_layer_ids:
        logger.warning(
            "aux layer id %d is the verifier's last layer before the final norm; in the z-lab layout it is "
            "id %d, which z-lab's transformers reference reads as output_hidden_states[%d], AFTER the final "
            "norm (vLLM and SGLang tap the residual stream)",
            num_target_layers, num_target_layers - 1, num_target_layers,
        )  # fmt: skip
    speculators = drafter_config_to_speculators(cfg, dtype=dtype)
    layer_config = dict(speculators["transformer_layer_config"])
    dflash: dict[str, Any] = {"mask_token_id": cfg.mask_token_id, "target_layer_ids": target_ids}
    if "sliding_attention" in cfg.layer_types:
        # vLLM: sliding layers are causal in-block unless dflash_config.causal says otherwise.
        dflash["causal"] = not cfg.sliding_window_non_causal
    out: dict[str, Any] = {
        "architectures": [ZLAB_ARCHITECTURE],
        **layer_config,
        "block_size": cfg.block_size,
        "dflash_config": dflash,
        "dtype": speculators["dtype"],
        "torch_dtype": speculators["dtype"],  # the key transformers < 5 and older readers use
        "transformers_version": speculators["transformers_version"],
        "target_model_name_or_path": cfg.verifier_name_or_path,
        "target_architectures": list(cfg.verifier_architectures),
    }
    if num_target_layers is not None:
        out["num_target_layers"] = num_target_layers
    if cfg.target_hidden_size is not None:
        out["target_hidden_size"] = cfg.target_hidden_size
    return out


def drafter_config_from_zlab(
    d: Mapping[str, Any],
    *,
    verifier_name_or_path: str | None = None,
    verifier_architectures: list[str] | None = None,
) -> DrafterConfig:
    """Parse a z-lab config.json dict; `verifier_*` override (or supply) the verifier it belongs to."""
    dflash = dict(d.get("dflash_config") or {})
    block_size = d.get("block_size") or dflash.get("block_size")
    if block_size is None:
        raise ExportError("z-lab config.json has no block_size (top level or dflash_config)")
    if dflash.get("mask_token_id") is None:
        raise ExportError(
            "z-lab config.json has no dflash_config.mask_token_id (older checkpoints name a mask TOKEN, "
            "which needs the tokenizer); add the id to config.json"
        )
    if dflash.get("target_layer_ids") is None:
        raise ExportError("z-lab config.json has no dflash_config.target_layer_ids")
    if dflash.get("use_swa"):
        raise ExportError(
            "dflash_config.use_swa (SWA forced on every layer) is not supported; use layer_types"
        )
    layer_config = {k: v for k, v in d.items() if k not in ZLAB_EXTRA_KEYS}
    layer_types = layer_config.get("layer_types") or []
    any_sliding = "sliding_attention" in layer_types
    causal = dflash.get("causal")
    if not any_sliding and causal:
        raise ExportError(
            "dflash_config.causal is true for full-attention layers; our drafter trains full layers "
            "bidirectionally in-block and cannot represent causal ones"
        )
    non_causal = (not causal) if any_sliding and causal is not None else not any_sliding
    name = verifier_name_or_path or d.get("target_model_name_or_path") or ""
    architectures = verifier_architectures or d.get("target_architectures") or []
    speculators = {
        "speculators_model_type": "dflash",
        "transformer_layer_config": layer_config,
        "aux_hidden_state_layer_ids": from_zlab_layer_ids(list(dflash["target_layer_ids"])),
        "block_size": int(block_size),
        "mask_token_id": int(dflash["mask_token_id"]),
        "draft_vocab_size": int(layer_config["vocab_size"]),
        "target_hidden_size": d.get("target_hidden_size"),
        "sliding_window_non_causal": non_causal,
        "speculators_config": {
            "proposal_methods": [{"speculative_tokens": int(block_size) - 1}],
            "verifier": {"name_or_path": name, "architectures": list(architectures)},
        },
    }
    return drafter_config_from_speculators(speculators)


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def _prepare_output(output: Path, *, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; choose another --output or pass --overwrite")


def _write_folder(output: Path, files: dict[str, bytes | Path], *, overwrite: bool) -> Path:
    """Write `files` (bytes, or a file to copy) into `output` atomically (dflash_core.atomic_files)."""
    _prepare_output(output, overwrite=overwrite)
    with atomic_folder(output) as tmp:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_bytes(content)
    return output


def export_zlab(
    checkpoint: str | Path, output: str | Path, *, num_target_layers: int | None, overwrite: bool = False
) -> Path:
    """Write our checkpoint (config.json + model.safetensors) in the z-lab layout at `output`."""
    from safetensors.torch import save

    loaded = load_checkpoint(checkpoint)
    stored_dtype = next((t.dtype for t in loaded.state_dict.values() if t.is_floating_point()), torch.float32)
    config = zlab_config(loaded.config, num_target_layers=num_target_layers, dtype=stored_dtype)
    unexpected = sorted(n for n in loaded.state_dict if n in ("d2t", "t2d", "lm_head.weight"))
    if unexpected:
        raise ExportError(f"{checkpoint} holds {unexpected}, which the z-lab layout has no place for")
    weights = save(dict(loaded.state_dict), metadata={"format": "pt"})
    body = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    logger.info(
        "z-lab layout: target_layer_ids %s (ours %s)",
        config["dflash_config"]["target_layer_ids"],
        loaded.config.aux_hidden_state_layer_ids,
    )
    return _write_folder(Path(output), {CONFIG_FILE: body, WEIGHTS_FILE: weights}, overwrite=overwrite)


def load_zlab_checkpoint(
    checkpoint: str | Path, *, verifier_name_or_path: str | None = None
) -> tuple[DrafterConfig, dict[str, torch.Tensor]]:
    """(DrafterConfig in our convention, tensors) of a z-lab checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(checkpoint)
    config = drafter_config_from_zlab(
        json.loads((folder / CONFIG_FILE).read_text()), verifier_name_or_path=verifier_name_or_path
    )
    state = load_file(str(folder / WEIGHTS_FILE))
    missing = [n for n in ("fc.weight", "hidden_norm.weight", "norm.weight") if n not in state]
    if missing:
        raise ExportError(f"{folder}/{WEIGHTS_FILE} lacks {missing}: not a DFlash drafter")
    return config, state


def load_any_checkpoint(
    checkpoint: str | Path, *, verifier_name_or_path: str | None = None
) -> tuple[DrafterConfig, dict[str, torch.Tensor]]:
    """(DrafterConfig, tensors) of a checkpoint in either layout (z-lab ids converted to ours)."""
    if detect_layout(checkpoint) == "zlab":
        return load_zlab_checkpoint(checkpoint, verifier_name_or_path=verifier_name_or_path)
    loaded = load_checkpoint(checkpoint)
    return loaded.config, loaded.state_dict


def import_zlab(
    checkpoint: str | Path,
    output: str | Path,
    *,
    verifier_name_or_path: str | None = None,
    verifier_architectures: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a z-lab checkpoint in our (speculators) layout at `output`."""
    folder = Path(checkpoint)
    config, state = load_zlab_checkpoint(folder, verifier_name_or_path=verifier_name_or_path)
    if verifier_architectures:
        config = config.model_copy(update={"verifier_architectures": list(verifier_architectures)})
    if not config.verifier_name_or_path:
        raise ExportError(
            f"{folder}/config.json does not name its verifier (z-lab's format has no such key); "
            "pass --verifier"
        )
    _prepare_output(Path(output), overwrite=overwrite)
    return save_checkpoint(output, drafter_state=state, config=config)


def copy_checkpoint(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """The serving files of a checkpoint (config.json, model.safetensors), copied as they are."""
    folder = Path(checkpoint)
    return _write_folder(
        Path(output), {name: folder / name for name in (CONFIG_FILE, WEIGHTS_FILE)}, overwrite=overwrite
    )


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    layout: Layout,
    num_target_layers: int | None = None,
    verifier_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `checkpoint` (either layout) at `output` in `layout`; a same-layout export is a copy."""
    source = detect_layout(checkpoint)
    if source == layout:
        return copy_checkpoint(checkpoint, output, overwrite=overwrite)
    if layout == "zlab":
        return export_zlab(checkpoint, output, num_target_layers=num_target_layers, overwrite=overwrite)
    return import_zlab(checkpoint, output, verifier_name_or_path=verifier_name_or_path, overwrite=overwrite)
