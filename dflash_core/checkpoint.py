"""Checkpoints in the speculators DFlash format (DESIGN 2.2): what vLLM serves and trainers resume.

A checkpoint folder holds

    config.json                 speculators layout (`speculators_model_type: "dflash"`), see below
    model.safetensors           the drafter's state_dict, names as the module has them (no `model.`)
    optimizer_state_dict.pt     torch.save of the optimizer state      (training only)
    scheduler_state_dict.pt     torch.save of the LR scheduler state   (training only)
    training_state.json         epoch, step, data position, RNG states (training only; no pickle)

and a checkpoint root holds per-epoch folders `0/ 1/ ...` plus the symlinks `latest` and
`checkpoint_best`. Every folder is written atomically: into a hidden temporary sibling, fsynced,
then renamed into place, so a crash or a full disk never leaves a half-written folder a resume
would pick up.

Facts about the readers this format serves (read from vLLM's `qwen3_dflash.py` and its
`transformers_utils/configs/speculators/` package, and speculators' `models/dflash/`):

- vLLM recognises a speculators checkpoint by the `speculators_config` key. It serves the model in
  `speculators_config.verifier.name_or_path`, takes `speculators_model_type` as the method and
  `proposal_methods[0].speculative_tokens` as the default `num_speculative_tokens`. It parses the
  config without remote code, so `auto_map` (which speculators writes, pointing at a `config.py`
  copy of its config class) is not needed and we do not write it.
- `transformer_layer_config` becomes the draft's HF config (a Qwen3 config): vLLM builds every
  draft layer from it (heads, head_dim, RoPE, eps, `layer_types`, `sliding_window`).
- Layer ids: `aux_hidden_state_layer_ids` use DESIGN 2.1's convention (id L = HF
  `hidden_states[L]`, what enters layer L). vLLM passes them on as
  `eagle_aux_hidden_state_layer_ids` unchanged and derives `dflash_config.target_layer_ids` =
  [L - 1 ...] (z-lab's "output of layer L - 1" indexing) itself. So we store our ids UNSHIFTED;
  storing z-lab ids here would shift every plane by one layer and nothing would complain.
- In-block causality, the key most likely to break silently. speculators trains full-attention
  layers bidirectional inside a block, and sliding layers causal unless
  `sliding_window_non_causal` is true. vLLM decides per layer: first a global override
  `dflash_config.causal`, which its speculators converter derives from the top-level
  `sliding_window_non_causal` (vLLM CPU 0.32: causal = not flag; newer releases only force
  non-causal when the flag is true); without an override, sliding layers are causal and full
  layers are not. A config that says `false` for all-full layers is served CAUSAL by the 0.32
  rule although it was trained bidirectional, so we always write `true` when every layer is full.
  vLLM defaults the flag to non-causal when it is absent while speculators defaults it to false:
  we always write it. vLLM's V1 runner refuses drafters that mix sliding and full layers.
- Vocab: with `draft_vocab_size < vocab_size` the checkpoint carries `d2t` [D] int64, where
  `d2t[i]` is an OFFSET (target id = i + d2t[i]; vLLM loads it as `draft_id_to_target_id` and
  scatters draft logits to `arange(D) + d2t`), `t2d` [V] bool (speculators' mask; vLLM skips it)
  and the drafter's own `lm_head.weight` [D, H]. With the full vocab none of these, nor
  `embed_tokens.weight`, is saved: both readers then borrow the verifier's embedding and head.
- `mask_token_id` is required by vLLM (it fills block slots 1..B-1 with it).
"""

from __future__ import annotations

import base64
import contextlib
import errno as errno_module
import importlib.metadata
import json
import logging
import math
import os
import random
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dflash_core.model.config import DrafterConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer_state_dict.pt"
SCHEDULER_FILE = "scheduler_state_dict.pt"
TRAINING_STATE_FILE = "training_state.json"
LATEST_LINK = "latest"
BEST_LINK = "checkpoint_best"

# The speculators release whose format (and test vectors) we follow.
SPECULATORS_VERSION = "0.9.0"
DRAFTER_ARCHITECTURE = "DFlashDraftModel"
# Hidden siblings that are never checkpoints: in-progress writes and replaced folders.
TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"

TRAINING_STATE_VERSION = 1
# Defaults for keys an older training_state.json lacks (STYLE rule 16: log, never crash).
TRAINING_STATE_DEFAULTS: dict[str, Any] = {
    "format_version": 0,
    "epoch": 0,
    "step_in_epoch": 0,
    "global_step": 0,
    "best_val_loss": None,
    "best_epoch": None,
    "history": [],
    "data": {},
    "rng": None,
}


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; nothing was left at its path. `errno` as the cause's."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass
class LoadedCheckpoint:
    path: Path
    config: DrafterConfig
    state_dict: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    training_state: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# config.json <-> DrafterConfig
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _served_non_causal(cfg: DrafterConfig) -> bool:
    """The `sliding_window_non_causal` value that makes vLLM reproduce what we trained."""
    sliding = [t == "sliding_attention" for t in cfg.layer_types]
    if not any(sliding):
        if not cfg.sliding_window_non_causal:
            logger.info(
                "all draft layers are full attention, which trains bidirectionally in-block; writing "
                "sliding_window_non_causal: true so vLLM serves them bidirectionally too"
            )
        return True
    if not all(sliding) and not cfg.sliding_window_non_causal:
        logger.warning(
            "draft layers mix full and sliding attention with causal sliding layers: vLLM's V1 runner "
            "refuses mixed drafters, and vLLM releases that read sliding_window_non_causal: false as a "
            "global causal switch would also make the full layers causal (they trained bidirectional)"
        )
    return cfg.sliding_window_non_causal


def _max_window_layers(layer_types: list[str]) -> int:
    """Qwen3's legacy knob: layers >= this index slide. Only meaningful for readers that ignore
    `layer_types` (we always write `layer_types`, which wins)."""
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if sliding and sliding == list(range(sliding[0], len(layer_types))):
        return sliding[0]
    return len(layer_types)


def drafter_config_to_speculators(
    cfg: DrafterConfig, *, dtype: torch.dtype | str = "float32"
) -> dict[str, Any]:
    """The speculators `config.json` dict for `cfg` (every key speculators 0.9.0 writes but `auto_map`).

    `dtype` names the dtype the weights are stored in.
    """
    any_sliding = "sliding_attention" in cfg.layer_types
    scaling = dict(cfg.rope_scaling or {})
    rope_parameters: dict[str, Any] = {
        "rope_theta": float(cfg.rope_theta),
        "rope_type": scaling.get("rope_type") or scaling.get("type") or "default",
        **{k: v for k, v in scaling.items() if k not in ("rope_theta", "rope_type", "type")},
    }
    layer_config: dict[str, Any] = {
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_parameters,
        # Older transformers/vLLM read the base from here rather than from rope_parameters.
        "rope_theta": float(cfg.rope_theta),
        "max_position_embeddings": cfg.max_position_embeddings,
        "layer_types": list(cfg.layer_types),
        "sliding_window": cfg.sliding_window if any_sliding else None,
        "use_sliding_window": any_sliding,
        "max_window_layers": _max_window_layers(list(cfg.layer_types)),
        "vocab_size": cfg.vocab_size,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    return {
        "architectures": [DRAFTER_ARCHITECTURE],
        "speculators_model_type": "dflash",
        "speculators_version": SPECULATORS_VERSION,
        "aux_hidden_state_layer_ids": list(cfg.aux_hidden_state_layer_ids),
        "block_size": cfg.block_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "mask_token_id": cfg.mask_token_id,
        "target_hidden_size": cfg.target_hidden_size,
        # Our drafter's slot 0 is the anchor (the bonus token) and drafts B-1 tokens, which is
        # what vLLM's DFlash proposer assumes.
        "sample_from_anchor": False,
        "sliding_window_non_causal": _served_non_causal(cfg),
        "tie_word_embeddings": False,
        "dtype": _dtype_name(dtype),
        "transformers_version": _package_version("transformers"),
        "transformer_layer_config": layer_config,
        "speculators_config": {
            "algorithm": "dflash",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": cfg.block_size - 1,
                    "accept_tolerance": 0.0,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {
                "name_or_path": cfg.verifier_name_or_path,
                "architectures": list(cfg.verifier_architectures),
            },
        },
    }


def _rope_from_layer_config(layer: Mapping[str, Any]) -> tuple[float, dict | None]:
    params = dict(layer.get("rope_parameters") or {})
    if not params and layer.get("rope_scaling"):
        params = dict(layer["rope_scaling"])
    theta = params.pop("rope_theta", None) or layer.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    extras = {k: v for k, v in params.items() if k != "rope_type"}
    if rope_type == "default" and not extras:
        return float(theta), None
    return float(theta), params


def drafter_config_from_speculators(d: Mapping[str, Any]) -> DrafterConfig:
    """Parse a speculators DFlash `config.json` dict (ours, speculators' or a converted z-lab one).

    Keys a file lacks get speculators' defaults, each with a log line.
    """
    model_type = d.get("speculators_model_type")
    if model_type != "dflash":
        raise ValueError(f"not a DFlash speculators config: speculators_model_type is {model_type!r}")
    if d.get("sample_from_anchor"):
        raise ValueError(
            "this checkpoint was trained with sample_from_anchor: true (slot 0 drafts too); this "
            "trainer only handles the DFlash layout where slot 0 is the anchor"
        )
    layer = d.get("transformer_layer_config")
    if not isinstance(layer, Mapping):
        raise ValueError("config.json has no transformer_layer_config object")
    num_layers = int(layer["num_hidden_layers"])
    layer_types = layer.get("layer_types")
    if not layer_types:
        # Qwen3Config's rule when layer_types is absent.
        window_from = layer.get("max_window_layers", num_layers)
        use_sliding = bool(layer.get("use_sliding_window")) and layer.get("sliding_window") is not None
        layer_types = [
            "sliding_attention" if use_sliding and i >= window_from else "full_attention"
            for i in range(num_layers)
        ]
        logger.info(
            "config.json has no layer_types; derived %s from use_sliding_window/max_window_layers",
            layer_types,
        )
    if "sliding_window_non_causal" in d:
        non_causal = bool(d["sliding_window_non_causal"])
    else:
        non_causal = False
        logger.info("config.json has no sliding_window_non_causal; using speculators' default false")
    spec = d.get("speculators_config") or {}
    verifier = spec.get("verifier") or {}
    methods = spec.get("proposal_methods") or []
    block_size = int(d.get("block_size") or 8)
    if "block_size" not in d:
        logger.info("config.json has no block_size; using speculators' default 8")
    if methods and methods[0].get("speculative_tokens") not in (None, block_size - 1):
        logger.warning(
            "speculative_tokens %s != block_size - 1 = %d; vLLM would default to drafting %s tokens",
            methods[0].get("speculative_tokens"),
            block_size - 1,
            methods[0].get("speculative_tokens"),
        )
    if d.get("mask_token_id") is None:
        raise ValueError("config.json has no mask_token_id; vLLM needs it to fill the draft block")
    theta, rope_scaling = _rope_from_layer_config(layer)
    vocab_size = int(layer["vocab_size"])
    return DrafterConfig(
        hidden_size=int(layer["hidden_size"]),
        intermediate_size=int(layer["intermediate_size"]),
        num_hidden_layers=num_layers,
        num_attention_heads=int(layer["num_attention_heads"]),
        num_key_value_heads=int(layer.get("num_key_value_heads") or layer["num_attention_heads"]),
        head_dim=int(layer.get("head_dim") or int(layer["hidden_size"]) // int(layer["num_attention_heads"])),
        rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(layer.get("max_position_embeddings", 32768)),
        hidden_act=layer.get("hidden_act", "silu"),
        layer_types=list(layer_types),
        sliding_window=layer.get("sliding_window") if "sliding_attention" in layer_types else None,
        sliding_window_non_causal=non_causal,
        block_size=block_size,
        aux_hidden_state_layer_ids=[int(i) for i in d["aux_hidden_state_layer_ids"]],
        mask_token_id=int(d["mask_token_id"]),
        vocab_size=vocab_size,
        draft_vocab_size=int(d.get("draft_vocab_size") or vocab_size),
        target_hidden_size=d.get("target_hidden_size"),
        verifier_name_or_path=str(verifier.get("name_or_path") or ""),
        verifier_architectures=list(verifier.get("architectures") or []),
    )


# --------------------------------------------------------------------------------------------
# RNG state (JSON-safe: base64 of raw bytes, plain ints; never pickle)
# --------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every initialised CUDA device), numpy (legacy global) and python `random`."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "numpy": {
            "bit_generator": np_state[0],
            "keys": _b64(np.asarray(np_state[1], dtype=np.uint32).tobytes()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    version, internal, gauss_next = random.getstate()
    state["python"] = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any] | None) -> None:
    """Inverse of `capture_rng_state`; parts a file lacks are left alone (with a log line)."""
    if not state:
        logger.info("no RNG state in the checkpoint; keeping the current seeds")
        return
    if "torch" in state:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "numpy" in state:
        n = state["numpy"]
        keys = np.frombuffer(base64.b64decode(n["keys"]), dtype=np.uint32)
        np.random.set_state((n["bit_generator"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this host has %d; restoring what fits",
                len(cuda),
                torch.cuda.device_count(),
            )
        for device, blob in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(
                torch.frombuffer(bytearray(base64.b64decode(blob)), dtype=torch.uint8), device
            )


def _json_safe(value: Any) -> Any:
    """Plain JSON values: tensors/numpy to lists, Paths to str, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN/Infinity; a diverged metric must not make the whole save fail.
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training_state holds a {type(value).__name__}, which has no JSON form: {value!r}")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes renames and new entries durable. Some filesystems refuse fsync on a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


_ALWAYS_DROPPED = ("embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight")
_REDUCED_VOCAB_ONLY = ("lm_head.weight", "d2t", "t2d")


def _weights_to_save(
    drafter_state: Mapping[str, torch.Tensor], config: DrafterConfig, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors named as the drafter has them; checks the contract."""
    prefixed = [n for n in drafter_state if n.startswith("model.")]
    if prefixed:
        raise ValueError(
            f"drafter_state has `model.`-prefixed names ({prefixed[:3]}...); speculators/vLLM tensor names "
            "have no prefix (vLLM adds its own). Save the drafter module's own state_dict()"
        )
    dropped = [n for n in drafter_state if n in _ALWAYS_DROPPED]
    if not config.has_reduced_vocab:
        dropped += [n for n in drafter_state if n in _REDUCED_VOCAB_ONLY]
    if dropped:
        # Frozen verifier copies: both readers take them from the verifier itself.
        logger.info("not saving %s (borrowed from the verifier at load time)", sorted(dropped))
    required = ["fc.weight", "hidden_norm.weight", "norm.weight"]
    if config.has_reduced_vocab:
        required += list(_REDUCED_VOCAB_ONLY)
    missing = [n for n in required if n not in drafter_state]
    if missing:
        raise ValueError(f"drafter_state lacks {missing}, which a DFlash checkpoint needs")
    fc_shape = tuple(drafter_state["fc.weight"].shape)
    expected_fc = (config.hidden_size, config.num_aux_layers * config.verifier_hidden_size)
    if fc_shape != expected_fc:
        raise ValueError(
            f"fc.weight is {fc_shape} but the config expects {expected_fc} "
            f"({config.num_aux_layers} aux layers x hidden {config.verifier_hidden_size})"
        )
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in drafter_state.items():
        if name in dropped:
            continue
        if hasattr(tensor, "full_tensor"):  # an FSDP2 DTensor: gather it (collective on every rank)
            tensor = tensor.full_tensor()
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # safetensors refuses tensors that share (or only view) a storage
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    if config.has_reduced_vocab:
        d2t, t2d, head = out["d2t"], out["t2d"], out["lm_head.weight"]
        if d2t.shape != (config.draft_vocab_size,) or t2d.shape != (config.vocab_size,):
            raise ValueError(
                f"d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)}: expected ({config.draft_vocab_size},) / "
                f"({config.vocab_size},)"
            )
        if head.shape != (config.draft_vocab_size, config.hidden_size):
            raise ValueError(
                f"lm_head.weight is {tuple(head.shape)}, expected ({config.draft_vocab_size}, "
                f"{config.hidden_size})"
            )
        out["d2t"], out["t2d"] = d2t.to(torch.int64), t2d.to(torch.bool)
    return out


def _remove_stale_temps(directory: Path) -> None:
    for stale in directory.parent.glob(f"{TEMP_PREFIX}{directory.name}-*"):
        logger.info("removing %s, left by an interrupted save", stale)
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    *,
    drafter_state: Mapping[str, torch.Tensor],
    config: DrafterConfig,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    training_state: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint folder atomically; returns its path.

    `dtype` casts floating tensors (None keeps theirs); `d2t`/`t2d` stay int64/bool. The current
    RNG states are added to `training_state` (under "rng") unless it carries its own. Without
    `training_state` no training files are written (an export, not a resume point). An existing
    folder at `directory` is replaced only after the new one is complete. On any failure the
    temporary folder is removed and CheckpointWriteError names `directory`.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    tmp = directory.parent / f"{TEMP_PREFIX}{directory.name}-{uuid.uuid4().hex[:8]}"
    try:
        tensors = _weights_to_save(drafter_state, config, dtype)
        stored_dtype = dtype or next(
            (t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32
        )
        config_json = json.dumps(
            drafter_config_to_speculators(config, dtype=stored_dtype), indent=2, sort_keys=True
        )
        state_json = None
        if training_state is not None:
            state = {"format_version": TRAINING_STATE_VERSION, **dict(training_state)}
            state.setdefault("rng", capture_rng_state())
            state_json = json.dumps(_json_safe(state), indent=2, sort_keys=True, allow_nan=False)

        tmp.mkdir()
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _fsync_file(tmp / WEIGHTS_FILE)
        _write_bytes(tmp / CONFIG_FILE, (config_json + "\n").encode())
        if optimizer_state is not None:
            _torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
        if scheduler_state is not None:
            _torch_save(scheduler_state, tmp / SCHEDULER_FILE)
        if state_json is not None:
            _write_bytes(tmp / TRAINING_STATE_FILE, (state_json + "\n").encode())
        _fsync_dir(tmp)
        _move_into_place(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):  # KeyboardInterrupt & co.: clean up, then let it through
            raise
        code = exc.errno if isinstance(exc, OSError) else None
        hint = " Free some disk space or choose another --save-path." if code == errno_module.ENOSPC else ""
        raise CheckpointWriteError(
            f"could not write checkpoint {directory}: {exc}. No partial checkpoint was left there (the "
            f"temporary folder {tmp.name} was removed).{hint}",
            errno=code,
        ) from exc
    logger.info("saved checkpoint %s (%d tensors)", directory, len(tensors))
    return directory


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory`; an existing folder there is moved aside first, then deleted."""
    old = None
    if directory.is_symlink() or directory.is_file():
        raise FileExistsError(f"{directory} exists and is not a checkpoint folder")
    if directory.exists():
        old = directory.parent / f"{OLD_PREFIX}{directory.name}-{uuid.uuid4().hex[:8]}"
        os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        if old is not None:
            os.replace(old, directory)  # put the previous checkpoint back
        raise
    _fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_training_state(path: str | Path) -> dict[str, Any]:
    """training_state.json with defaults (and a log line each) for keys an older file lacks."""
    path = Path(path)
    state = json.loads(path.read_text()) if path.is_file() else {}
    if not path.is_file():
        logger.info("%s does not exist (a weights-only checkpoint); using defaults", path)
    if "global_step" not in state and "step" in state:
        state["global_step"] = state["step"]  # early files called it "step"
    for key, default in TRAINING_STATE_DEFAULTS.items():
        if key not in state:
            if path.is_file():
                logger.info("%s has no %r (older format); using %r", path, key, default)
            state[key] = json.loads(json.dumps(default))  # a fresh copy of mutable defaults
    return state


def load_checkpoint(directory: str | Path, *, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read a checkpoint folder (ours or speculators'); tensors land on `map_location`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: it has no {CONFIG_FILE}")
    config = drafter_config_from_speculators(json.loads(config_path.read_text()))
    device = str(map_location) if isinstance(map_location, torch.device) else map_location
    state_dict = load_file(str(directory / WEIGHTS_FILE), device=device)

    def load_pt(name: str) -> dict | None:
        path = directory / name
        if not path.is_file():
            return None
        # weights_only: optimizer/scheduler states are tensors and plain containers; never unpickle code.
        return torch.load(path, map_location=map_location, weights_only=True)

    return LoadedCheckpoint(
        path=directory,
        config=config,
        state_dict=state_dict,
        optimizer_state=load_pt(OPTIMIZER_FILE),
        scheduler_state=load_pt(SCHEDULER_FILE),
        training_state=read_training_state(directory / TRAINING_STATE_FILE),
    )


# --------------------------------------------------------------------------------------------
# Links and resume
# --------------------------------------------------------------------------------------------


def update_link(root: str | Path, name: str, target: str | Path) -> Path:
    """Point `root/name` at `target` with a relative symlink, replaced atomically (os.replace)."""
    root, target = Path(root), Path(target)
    link = root / name
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a symlink; move it away so the link can be updated")
    # realpath on both sides, so a root reached through a symlink still gets a correct relative link.
    relative = os.path.relpath(os.path.realpath(target), os.path.realpath(root))
    tmp = root / f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    os.symlink(relative, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(root)
    return link


def is_complete_checkpoint(path: Path) -> bool:
    """A resume point: config, weights and training state all present (written last, atomically)."""
    return all((path / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, TRAINING_STATE_FILE))


def find_resume_point(root: str | Path) -> Path | None:
    """The checkpoint to resume from: `latest` when it is intact, else the newest complete folder.

    Hidden folders (in-progress `.tmp-*` writes, replaced `.old-*` ones) are never candidates.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    latest = root / LATEST_LINK
    if latest.is_symlink() or latest.exists():
        resolved = latest.resolve()
        if resolved.is_dir() and is_complete_checkpoint(resolved):
            return resolved
        logger.warning(
            "%s points at %s, which is not a complete checkpoint; scanning %s", latest, resolved, root
        )
    candidates = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and is_complete_checkpoint(p)
    ]
    if not candidates:
        return None

    def progress(path: Path) -> tuple[int, int, float]:
        try:
            state = json.loads((path / TRAINING_STATE_FILE).read_text())
        except (OSError, ValueError):
            state = {}
        step = state.get("global_step", state.get("step", -1))
        return int(step if step is not None else -1), int(state.get("epoch") or 0), path.stat().st_mtime

    return max(candidates, key=progress).resolve()
