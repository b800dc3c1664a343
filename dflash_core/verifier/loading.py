"""Loading a verifier with transformers: its tokenizer, its config, or the whole frozen model.

Every loader takes any verifier name (`dflash_core.verifier.names`). A GGUF verifier's model
and tokenizer are read from the transformers folder `dflash_core.gguf_cache` converted it to
(made on the first load), or from the GGUF itself when that cache is off. `config.architectures`
is filled in when the source lacks it (a GGUF), so fingerprints of the same model agree however
it was loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dflash_core.config import EMBEDDED_VERIFIER
from dflash_core.gguf_cache import converted_folder
from dflash_core.verifier.names import gguf_location

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# SmolLM2-135M-Instruct's ChatML template, as its Hugging Face repo and its GGUF carry it. Only
# used if a GGUF tokenizer arrives without one: a tokenizer without a template would make
# `prepare-data` render conversations differently from what the served model sees, which trains
# normally and then accepts ~1 token.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The verifier's tokenizer, chat template included (HF id, folder, .gguf or embedded)."""
    return _tokenizer_at(name_or_path, _load_source(name_or_path))


def _load_source(name_or_path: str) -> tuple[str, str | None]:
    """(HF id or folder, GGUF file name or None): where transformers loads `name_or_path` from.

    A GGUF verifier is read from the folder `dflash_core.gguf_cache` converted it to when there
    is one (about a second), else from the GGUF itself (dequantized on every load).
    """
    gguf = gguf_location(name_or_path)
    if gguf is None:
        return name_or_path, None
    converted = _converted_gguf(name_or_path, *gguf)
    return (converted, None) if converted is not None else gguf


def transformers_folder(name_or_path: str) -> str:
    """What another engine (vLLM) loads as this verifier: an HF id or folder as it is; a GGUF
    verifier (the embedded default) as the transformers folder `dflash_core.gguf_cache` keeps for
    it (converted now if need be): vLLM reads neither our `embedded:` name nor a bare GGUF's
    tokenizer and chat template. Raises ValueError when the cache is off (DFLASH_CACHE_DIR=off).
    """
    folder, gguf_file = _load_source(name_or_path)
    if gguf_file is not None:
        raise ValueError(
            f"{name_or_path} is a GGUF verifier and its converted transformers folder is off "
            "(DFLASH_CACHE_DIR=off): unset DFLASH_CACHE_DIR, or pass a transformers folder"
        )
    return folder


def _tokenizer_at(name_or_path: str, source: tuple[str, str | None]) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    folder, gguf_file = source
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if not tokenizer.chat_template and name_or_path == EMBEDDED_VERIFIER:
        # transformers copies `tokenizer.chat_template` out of the GGUF metadata; should a
        # version drop it, set SmolLM2's own ChatML template rather than train without one.
        logger.info("the SmolLM2 GGUF tokenizer has no chat template; setting SmolLM2's ChatML template")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if not tokenizer.chat_template:
        logger.warning(
            "tokenizer of %s has no chat template; conversations cannot be rendered the way a chat "
            "server would render them",
            name_or_path,
        )
    return tokenizer


def _converted_gguf(name_or_path: str, folder: str, file_name: str) -> str | None:
    """The GGUF verifier's converted transformers folder (dflash_core.gguf_cache), or None."""

    def convert(dest: Path) -> None:
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        model = _named(AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32))
        # transformers refuses `save_pretrained` on a model it loaded from a GGUF (it counts as
        # quantized); its weights are plain float32 tensors by now: write them and the config.
        save_file(_untied_state(model), str(dest / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the folder holds plain weights: load them as such
        model.config.save_pretrained(dest)
        _tokenizer_at(name_or_path, (folder, file_name)).save_pretrained(dest)

    converted = converted_folder(Path(folder) / file_name, convert=convert)
    return str(converted) if converted is not None else None


def _untied_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict as `save_pretrained` writes it: a tied output embedding is left out, so the
    weight is stored once, under the input embedding's name. vLLM loads a tied model's embedding
    from that name and skips `lm_head.*`: a file holding it only as lm_head.weight (what
    safetensors' `save_model` keeps of the pair) leaves vLLM's embedding unloaded, silently."""
    state = model.state_dict()
    output = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and output is not None:
        tied = next(name for name, module in model.named_modules() if module is output)
        state.pop(f"{tied}.weight", None)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def _named(model: PreTrainedModel) -> PreTrainedModel:
    """`model` with `config.architectures` filled in when its source lacks it (a GGUF)."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model


def load_verifier(
    name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer): a causal LM in eval mode with every parameter frozen.

    GGUF files (the embedded default) are dequantized by transformers into `dtype`, once: later
    loads read the converted folder `dflash_core.gguf_cache` keeps. The model's
    `config.architectures` is filled in when the source lacks it (GGUF), so fingerprints of the
    same model agree however it was loaded.
    """
    from transformers import AutoModelForCausalLM

    source = _load_source(name_or_path)  # resolved once: the GGUF cache is consulted once
    tokenizer = _tokenizer_at(name_or_path, source)
    folder, gguf_file = source
    model = _named(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype))
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_verifier_config(name_or_path: str) -> PretrainedConfig:
    """The verifier's config alone (no weights): what a trainer fed by a remote service needs.

    `architectures` is filled in as `load_verifier` does, so fingerprints agree either way.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    gguf = gguf_location(name_or_path)
    if gguf is not None:
        folder, file_name = gguf
        config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    else:
        config = AutoConfig.from_pretrained(name_or_path)
    if not getattr(config, "architectures", None):
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if architecture:
            config.architectures = [architecture]
    return config


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language-model part of a (possibly multimodal) config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config
