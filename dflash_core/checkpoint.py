"""Checkpoints in the speculators DFlash format (docs/architecture.md): what vLLM serves and trainers resume.

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

The config.json mapping (and the facts about its readers) lives in `dflash_core.speculators_config`.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dflash_core import atomic_files
from dflash_core.atomic_files import atomic_folder
from dflash_core.model.config import DrafterConfig
from dflash_core.rng_state import capture_rng_state
from dflash_core.speculators_config import drafter_config_from_speculators, drafter_config_to_speculators

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer_state_dict.pt"
SCHEDULER_FILE = "scheduler_state_dict.pt"
TRAINING_STATE_FILE = "training_state.json"
LATEST_LINK = "latest"
BEST_LINK = "checkpoint_best"

# Hidden siblings that are never checkpoints: in-progress writes and replaced folders.
TEMP_PREFIX, OLD_PREFIX = atomic_files.TEMP_PREFIX, atomic_files.OLD_PREFIX

TRAINING_STATE_VERSION = 1
# Defaults for keys an older training_state.json lacks (logged, never a crash).
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


def _torch_save(obj: Any, path: Path) -> None:
    """The optimizer and scheduler states (read back with weights_only, so plain containers only)."""
    torch.save(obj, path)


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

        from safetensors.torch import save_file

        with atomic_folder(directory) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_bytes((config_json + "\n").encode())
            if optimizer_state is not None:
                _torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
            if scheduler_state is not None:
                _torch_save(scheduler_state, tmp / SCHEDULER_FILE)
            if state_json is not None:
                (tmp / TRAINING_STATE_FILE).write_bytes((state_json + "\n").encode())
    except Exception as exc:
        code = exc.errno if isinstance(exc, OSError) else None
        hint = " Free some disk space or choose another --save-path." if code == errno_module.ENOSPC else ""
        raise CheckpointWriteError(
            f"could not write checkpoint {directory}: {exc}. No partial checkpoint was left there (its "
            f"temporary folder was removed).{hint}",
            errno=code,
        ) from exc
    logger.info("saved checkpoint %s (%d tensors)", directory, len(tensors))
    return directory


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
    # Not atomic_files.atomic_file: a symlink has no content to fsync, only its directory entry.
    tmp = atomic_files.temp_sibling(link)
    os.symlink(relative, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    atomic_files.fsync_dir(root)
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
