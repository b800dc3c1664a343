"""The verifier's heads: its embedding, final norm and LM head, borrowed by the drafter and kept frozen.

From a loaded model (no copies), or from a checkpoint without its decoder layers: for safetensors
only the three tensors are read. Only Llama/Qwen/Mistral-style RMSNorm is modelled; other norm
conventions are refused rather than giving silently wrong targets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dflash_core.verifier.loading import load_verifier, text_config
from dflash_core.verifier.names import gguf_location

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from dflash_core.model.verifier_heads import VerifierHeads

logger = logging.getLogger(__name__)

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"


def load_verifier_heads_from_model(model: PreTrainedModel) -> VerifierHeads:
    """Borrow embedding, final norm and LM head from a loaded causal LM (no copies).

    Tied embeddings come back as one shared tensor (lm_head = embedding).
    """
    from dflash_core.model.verifier_heads import VerifierHeads

    text = text_config(model.config)
    _check_norm_convention(str(getattr(text, "model_type", "")))
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    lm_head = output.weight if output is not None else embed
    norm = _final_norm(model)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or text.rms_norm_eps
    return VerifierHeads.from_tensors(
        embed=embed.detach(), lm_head=lm_head.detach(), norm=norm.weight.detach(), eps=float(eps)
    )


def load_verifier_heads(
    name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VerifierHeads:
    """Only the verifier's embedding, final norm and LM head, without its decoder layers.

    For a safetensors checkpoint (local folder or hub id) the shard index is read, only the shards
    holding those three tensors are fetched (Qwen3-8B: 2 of its 5) and only the three tensors are
    read from them (~2.5 GB in bf16 instead of 16 GB), without building the model. GGUF
    files (the embedded SmolLM2) and checkpoints without safetensors load the whole model, which
    is fine for the small models that come that way.
    """
    if gguf_location(name_or_path) is None:
        heads = _heads_from_safetensors(name_or_path, dtype=dtype)
        if heads is not None:
            return heads.to(device)
    logger.info("loading all of %s to take its embedding, norm and LM head", name_or_path)
    model, _ = load_verifier(name_or_path, device="cpu", dtype=dtype)
    return load_verifier_heads_from_model(model).to(device)


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None:  # a base model (LlamaModel, ...) was passed itself
        base = model
    for candidate in (
        getattr(base, "norm", None),
        getattr(getattr(base, "language_model", None), "norm", None),
    ):
        if isinstance(candidate, torch.nn.Module) and getattr(candidate, "weight", None) is not None:
            return candidate
    raise ValueError(f"cannot find the final norm of {type(model).__name__} (looked for .model.norm)")


def _check_norm_convention(model_type: str) -> None:
    # VerifierHeads applies x * rsqrt(mean x^2 + eps) * w (Llama/Qwen/Mistral). Gemma-style norms
    # multiply by (1 + w) and scale embeddings by sqrt(H): their targets would be silently wrong.
    if model_type.startswith("gemma"):
        raise NotImplementedError(
            f"{model_type} verifiers use (1 + w) RMSNorm and scaled embeddings, which VerifierHeads does not "
            "model; use a Llama/Qwen/Mistral-style verifier"
        )


def _heads_from_safetensors(name_or_path: str, *, dtype: torch.dtype) -> VerifierHeads | None:
    """Read the three tensors from a safetensors checkpoint; None when it has no safetensors."""
    from safetensors import safe_open

    from dflash_core.model.verifier_heads import VerifierHeads

    fetch = _file_fetcher(name_or_path)
    config_path = fetch("config.json")
    if config_path is None:
        return None
    config = json.loads(Path(config_path).read_text())
    text = config.get("text_config") or config
    _check_norm_convention(str(text.get("model_type", "")))

    index_path = fetch(_SAFETENSORS_INDEX)
    if index_path is not None:
        weight_map: dict[str, str] = json.loads(Path(index_path).read_text())["weight_map"]
    else:
        single = fetch(_SAFETENSORS_SINGLE)
        if single is None:
            return None
        with safe_open(single, framework="pt") as handle:
            weight_map = dict.fromkeys(handle.keys(), _SAFETENSORS_SINGLE)

    names = _head_tensor_names(
        weight_map, tie=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings")))
    )
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted({weight_map[n] for n in names.values() if n is not None}):
        shard_path = fetch(shard)
        if shard_path is None:
            raise FileNotFoundError(f"{name_or_path}: shard {shard} named in {_SAFETENSORS_INDEX} is missing")
        with safe_open(shard_path, framework="pt") as handle:
            for role, name in names.items():
                if name is not None and weight_map[name] == shard:
                    tensors[role] = handle.get_tensor(name).to(dtype)
    lm_head = tensors.get("lm_head", tensors["embed"])  # tied: the LM head IS the embedding
    eps = float(text.get("rms_norm_eps", 1e-6))
    logger.info(
        "verifier heads of %s: embed %s, lm_head %s%s, norm eps %g (read %d tensors only)",
        name_or_path,
        tuple(tensors["embed"].shape),
        tuple(lm_head.shape),
        " (tied)" if "lm_head" not in tensors else "",
        eps,
        len(tensors),
    )
    return VerifierHeads.from_tensors(embed=tensors["embed"], lm_head=lm_head, norm=tensors["norm"], eps=eps)


def _head_tensor_names(weight_map: dict[str, str], *, tie: bool) -> dict[str, str | None]:
    """Checkpoint names of embed / norm / lm_head; prefixes vary (`model.`, `model.language_model.`)."""
    embeds = sorted((n for n in weight_map if n.endswith("embed_tokens.weight")), key=len)
    if not embeds:
        raise ValueError("no `embed_tokens.weight` in the checkpoint; is this a Llama/Qwen-style causal LM?")
    embed = embeds[0]
    prefix = embed[: -len("embed_tokens.weight")]
    norm = f"{prefix}norm.weight"
    if norm not in weight_map:
        raise ValueError(f"the checkpoint has {embed} but no final norm {norm}")
    lm_head = next((n for n in ("lm_head.weight", f"{prefix}lm_head.weight") if n in weight_map), None)
    if lm_head is None and not tie:
        # HF drops lm_head.weight from checkpoints of tied models; a missing one otherwise is a bug.
        logger.warning(
            "no lm_head.weight in the checkpoint and tie_word_embeddings is false; using the embedding"
        )
    return {"embed": embed, "norm": norm, "lm_head": lm_head}


def _file_fetcher(name_or_path: str) -> Callable[[str], str | None]:
    """A function file name -> local path (or None when absent), for a local folder or a hub repo."""
    folder = Path(name_or_path)
    if folder.is_dir():

        def local(file_name: str) -> str | None:
            path = folder / file_name
            return str(path) if path.is_file() else None

        return local

    def hub(file_name: str) -> str | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            # huggingface_hub reads HF_TOKEN / the cached login itself.
            return hf_hub_download(repo_id=name_or_path, filename=file_name)
        except LocalEntryNotFoundError:
            # Offline and not cached: that says nothing about whether the repo has the file.
            raise
        except EntryNotFoundError:
            return None  # the repo has no such file (e.g. no shard index for a one-file model)

    return hub
