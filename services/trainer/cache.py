"""A local store of verifier hidden states, and the `CachingSource` that serves from it.

The speculators flags `--on-missing generate|skip|warn|raise` and `--on-generate delete|cache`
decide what happens to a sample whose hidden states are not cached yet: compute them (and keep
them, with `cache`), or drop the sample, or stop. A run with `--on-generate cache` fills the cache;
later epochs, and later runs with `--on-missing raise`, read it instead of running the verifier.

Layout (one folder per verifier and layer-id list, so a cache made for another verifier or other
`--target-layer-ids` is never read; a mismatch would train normally and accept ~1 token):

    <root>/<verifier-slug>-<hash>/cache_info.json       fingerprint + layer ids, checked on open
    <root>/<verifier-slug>-<hash>/<sample_id>.safetensors
        aux [t, K*H], last [t, H] in their own dtype, input_ids [t] int32 (checked on read)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from dflash_core import atomic_files
from dflash_core.verifier import VerifierFingerprint
from services.trainer.sources import HiddenStateSource, SampleHiddenStates, SampleRequest

logger = logging.getLogger(__name__)

INFO_FILE = "cache_info.json"
CACHE_FORMAT = 1


class HiddenStateCacheError(RuntimeError):
    """The cache cannot be used as it is (another verifier, changed data, a damaged file)."""


class MissingHiddenStatesError(RuntimeError):
    """`--on-missing raise` met samples that the cache does not hold."""


def cache_key(fingerprint: VerifierFingerprint, target_layer_ids: list[int]) -> str:
    """Short stable hash of everything the cached tensors depend on."""
    fields = fingerprint.model_dump()
    fields["name_or_path"] = _stable_name(fingerprint.name_or_path)
    blob = json.dumps({"fingerprint": fields, "target_layer_ids": list(target_layer_ids)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stable_name(name: str) -> str:
    # `./m/` and `/abs/m` are the same verifier: resolve local paths so both find one cache.
    path = Path(name)
    return str(path.resolve()) if path.exists() else name.rstrip("/")


class HiddenStateCache:
    """One safetensors file per sample under a folder keyed by verifier fingerprint and layer ids.

    Reads check the stored token ids against the requested ones (the data changed under the
    cache otherwise), shapes against the fingerprint, and finiteness. Writes are atomic; the
    first `OSError` (disk full, read-only) turns writing off with one warning, never a crash.
    """

    def __init__(self, root: Path, *, fingerprint: VerifierFingerprint, target_layer_ids: list[int]) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.target_layer_ids = list(target_layer_ids)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(fingerprint.name_or_path.rstrip("/")).name)[:40]
        self.folder = self.root / f"{slug or 'verifier'}-{cache_key(fingerprint, self.target_layer_ids)}"
        self.writable = True
        if self.folder.exists():
            self._check_info()

    # ------------------------------------------------------------------ identity
    def _info(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "fingerprint": self.fingerprint.model_dump(),
            "target_layer_ids": self.target_layer_ids,
        }

    def _check_info(self) -> None:
        info_path = self.folder / INFO_FILE
        if not info_path.exists():
            if any(self.folder.glob("*.safetensors")):
                raise HiddenStateCacheError(
                    f"{self.folder} holds hidden states but no {INFO_FILE}, so nothing says which verifier "
                    "made them; delete the folder to rebuild the cache"
                )
            return  # an empty folder left by an interrupted first write: `put` writes the info
        try:
            info = json.loads(info_path.read_text())
            stored = VerifierFingerprint(**info["fingerprint"])
            stored_ids = [int(i) for i in info["target_layer_ids"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HiddenStateCacheError(f"{info_path} is unreadable ({exc}); delete {self.folder}") from exc
        cache_side = f"cache {self.folder}"
        problems = self.fingerprint.mismatches(stored, this_side="this run", other_side=cache_side)
        if stored_ids != self.target_layer_ids:
            problems.append(
                f"target layer ids: {self.target_layer_ids} (this run) vs {stored_ids} ({cache_side})"
            )
        if problems:
            raise HiddenStateCacheError(
                "the hidden-state cache was made for another verifier or other layer ids:\n  "
                + "\n  ".join(problems)
                + f"\npoint --hidden-states-cache elsewhere or delete {self.folder}"
            )

    def describe_others(self) -> list[str]:
        """One line per other cache under `root` (helps when the layer ids or verifier changed)."""
        lines = []
        for info_path in sorted(self.root.glob(f"*/{INFO_FILE}")):
            if info_path.parent == self.folder:
                continue
            try:
                info = json.loads(info_path.read_text())
                name, ids = info["fingerprint"]["name_or_path"], info["target_layer_ids"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            lines.append(f"{info_path.parent}: verifier {name!r}, target layer ids {ids}")
        return lines

    # ------------------------------------------------------------------ read
    def path_for(self, sample_id: int) -> Path:
        return self.folder / f"{int(sample_id)}.safetensors"

    def get(self, sample_id: int, input_ids: torch.Tensor) -> SampleHiddenStates | None:
        """The cached states of `sample_id`, or None when it is not cached. Raises on a bad entry."""
        path = self.path_for(sample_id)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
            aux, last, stored_ids = tensors["aux"], tensors["last"], tensors["input_ids"]
        except Exception as exc:  # safetensors raises its own error type for a damaged header
            raise HiddenStateCacheError(f"{path} is unreadable ({exc}); delete it to regenerate") from exc
        requested = input_ids.detach().cpu().long().flatten()
        if not torch.equal(stored_ids.long(), requested):
            raise HiddenStateCacheError(
                f"{path} was computed for other token ids than sample {sample_id} has now "
                f"({stored_ids.numel()} stored vs {requested.numel()} requested): the data changed under "
                f"the cache; delete {self.folder} or point --hidden-states-cache elsewhere"
            )
        t, hidden = requested.numel(), self.fingerprint.hidden_size
        expected = {"aux": (t, len(self.target_layer_ids) * hidden), "last": (t, hidden)}
        for name, tensor in (("aux", aux), ("last", last)):
            if tuple(tensor.shape) != expected[name]:
                raise HiddenStateCacheError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, expected {expected[name]}; "
                    "delete it to regenerate"
                )
            # A zeroed or NaN plane trains without error into a useless drafter: refuse it.
            if not bool(torch.isfinite(tensor).all()) or (t > 0 and not bool(tensor.any())):
                raise HiddenStateCacheError(
                    f"{path}: {name} is non-finite or all zero; delete it to regenerate"
                )
        return SampleHiddenStates(sample_id=sample_id, aux=aux, last=last)

    # ------------------------------------------------------------------ write
    def put(self, states: SampleHiddenStates, *, input_ids: torch.Tensor) -> bool:
        """Store one sample atomically. Returns False (and stops writing) on the first `OSError`."""
        if not self.writable:
            return False
        tensors = {
            # clone: a source may hand out views of one batch tensor, which safetensors refuses
            "aux": states.aux.detach().cpu().contiguous().clone(),
            "last": states.last.detach().cpu().contiguous().clone(),
            "input_ids": input_ids.detach().cpu().flatten().to(torch.int32),  # vocab ids fit in int32
        }
        try:
            self._ensure_folder()
            # Atomic: readers see all of a sample or nothing. Not fsynced: one fsync per sample
            # would slow the trainer's hot path for data a later run can compute again.
            with atomic_files.atomic_file(self.path_for(states.sample_id), durable=False) as tmp:
                save_file(tensors, str(tmp))
        except OSError as exc:
            self.writable = False
            logger.warning(
                "cannot write the hidden-state cache %s (%s); training continues without caching",
                self.folder,
                exc,
            )
            return False
        return True

    def _ensure_folder(self) -> None:
        info_path = self.folder / INFO_FILE
        if info_path.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_files.write_text(info_path, json.dumps(self._info(), indent=2) + "\n")


@dataclass
class CacheCounters:
    """Samples served from the cache, computed by the inner source, and dropped (skip/warn)."""

    hits: int = 0
    generated: int = 0
    dropped: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {f"hidden_states/{k}": float(v) for k, v in vars(self).items()}


class CachingSource:
    """A `HiddenStateSource` that serves cache hits and treats misses as `on_missing` says.

    `generate` asks `inner` for the misses (and stores them when `on_generate == "cache"`);
    `skip` drops them silently, `warn` drops them with a rate-limited warning, `raise` raises
    `MissingHiddenStatesError`. Results keep request order, minus dropped samples.
    """

    warn_interval_s = 60.0

    def __init__(
        self,
        inner: HiddenStateSource | None,
        *,
        cache: HiddenStateCache | None,
        on_missing: Literal["generate", "skip", "warn", "raise"],
        on_generate: Literal["delete", "cache"],
    ) -> None:
        if on_missing == "generate" and inner is None:
            raise ValueError("--on-missing generate needs a hidden-state source to compute misses")
        if cache is None and (on_missing != "generate" or on_generate == "cache"):
            raise ValueError(
                f"--on-missing {on_missing} --on-generate {on_generate} needs a hidden-state cache"
            )
        if inner is not None and cache is not None:
            problems = inner.fingerprint.mismatches(cache.fingerprint, this_side="source", other_side="cache")
            if list(inner.target_layer_ids) != cache.target_layer_ids:
                problems.append(
                    f"target layer ids: {inner.target_layer_ids} (source) vs {cache.target_layer_ids} (cache)"
                )
            if problems:
                raise ValueError("the cache and the source disagree:\n  " + "\n  ".join(problems))
        # Whichever is present names the verifier and layer ids (they agree when both are); the
        # checks above guarantee at least one is.
        identity = inner if inner is not None else cache
        assert identity is not None
        self._identity: HiddenStateSource | HiddenStateCache = identity
        self.inner = inner
        self.cache = cache
        self.on_missing = on_missing
        self.on_generate = on_generate
        self.counters = CacheCounters()
        self._last_warning = -math.inf
        self._unwarned: list[int] = []

    @property
    def fingerprint(self) -> VerifierFingerprint:
        return self._identity.fingerprint

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self._identity.target_layer_ids)

    def extract(self, requests: Sequence[SampleRequest]) -> list[SampleHiddenStates]:
        found: list[SampleHiddenStates | None] = [
            self.cache.get(r.sample_id, r.input_ids) if self.cache is not None else None for r in requests
        ]
        self.counters.hits += sum(s is not None for s in found)
        missing = [i for i, s in enumerate(found) if s is None]
        if missing:
            self._handle_misses(requests, found, missing)
        return [s for s in found if s is not None]

    def prefetch(self, requests: Sequence[SampleRequest]) -> None:
        if self.inner is None:
            return
        if self.cache is not None:
            requests = [r for r in requests if not self.cache.path_for(r.sample_id).exists()]
        if requests:
            self.inner.prefetch(requests)

    def _handle_misses(
        self, requests: Sequence[SampleRequest], found: list[SampleHiddenStates | None], missing: list[int]
    ) -> None:
        missing_ids = [requests[i].sample_id for i in missing]
        if self.on_missing == "raise":
            folder = self.cache.folder if self.cache is not None else None
            others = self.cache.describe_others() if self.cache is not None else []
            raise MissingHiddenStatesError(
                f"{len(missing_ids)} sample(s) have no cached hidden states in {folder}: ids "
                f"{_preview(missing_ids)}; fill the cache with a run using --on-missing generate "
                "--on-generate cache (same verifier, data and --target-layer-ids)"
                + ("\nother caches under the same root:\n  " + "\n  ".join(others) if others else "")
            )
        if self.on_missing in ("skip", "warn"):
            self.counters.dropped += len(missing_ids)
            if self.on_missing == "warn":
                self._warn_dropped(missing_ids)
            return
        generated = self.inner.extract([requests[i] for i in missing])  # type: ignore[union-attr]
        self.counters.generated += len(generated)
        for i, states in zip(missing, generated, strict=True):
            if states.sample_id != requests[i].sample_id:
                raise RuntimeError(
                    f"hidden-state source answered sample {states.sample_id} "
                    f"for request {requests[i].sample_id}"
                )
            found[i] = states
            if self.on_generate == "cache":
                self.cache.put(states, input_ids=requests[i].input_ids)  # type: ignore[union-attr]

    def _warn_dropped(self, sample_ids: list[int]) -> None:
        # One line per interval at most: a cold cache would otherwise log on every step.
        self._unwarned.extend(sample_ids)
        now = time.monotonic()
        if now - self._last_warning < self.warn_interval_s:
            return
        logger.warning(
            "dropped %d sample(s) without cached hidden states (--on-missing warn): ids %s; cache %s",
            len(self._unwarned),
            _preview(self._unwarned),
            self.cache.folder if self.cache is not None else None,
        )
        self._last_warning, self._unwarned = now, []

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def _preview(ids: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{f', ... {len(ids) - limit} more' if len(ids) > limit else ''}]"
