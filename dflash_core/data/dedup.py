"""Exact and near-duplicate removal of texts, one text at a time, across generation rounds.

Exact: two texts are duplicates when their `normalize`d forms are equal. Near: the Jaccard
similarity of the sets of character `shingle`-grams of the normalised forms is at least
`near_threshold`. Near pairs are found by MinHash + LSH banding, screened by the signatures'
agreement, and every survivor is confirmed on the true shingle sets, so a refusal is never a false
positive; a miss is possible (a pair at the threshold is found with probability > 0.99, see
`Deduplicator`). Only kept texts are indexed, so what is kept depends on the order of `add` calls.
Hashing is seeded and the same in every process (never Python's salted `hash()`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata
from collections import Counter

import numpy as np

__all__ = [
    "EXACT_DUPLICATE",
    "NEAR_DUPLICATE",
    "Deduplicator",
    "detection_probability",
    "jaccard",
    "lsh_bands",
    "normalize",
    "shingles",
]

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
NUM_PERM = 128  # MinHash permutations available; LSH uses bands * rows of them
MIN_RECALL = 0.99  # wanted chance that a pair exactly at the threshold is refused
SCREEN_MISS = 0.001  # chance that the signature screen drops a pair exactly at the threshold
# A bucket stops growing at this many texts. Only a region where that many kept texts share a band
# fills one; there a later near duplicate can be missed, but each `add` stays bounded instead of
# growing with the number kept (100k templated prompts, all at J ~ 0.6 to each other: ~80 s).
MAX_BUCKET = 64
SHINGLE_CACHE = 2048  # shingle sets of kept texts kept for the exact check (~25 KB each at 300 chars)

_WHITESPACE = re.compile(r"\s+")
# Odd 64-bit constants: the shingle polynomial's base and splitmix64's finaliser.
_BASE = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def normalize(text: str) -> str:
    """NFKC, casefolded, whitespace runs made one space, punctuation and space stripped at both ends."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def shingles(normalized: str, size: int) -> set[str]:
    """The set of character `size`-grams of a (normalised) text; empty when it is shorter than `size`."""
    return {normalized[i : i + size] for i in range(len(normalized) - size + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def detection_probability(similarity: float, *, bands: int, rows: int) -> float:
    """Chance that a pair of Jaccard `similarity` shares at least one LSH band: 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def lsh_bands(
    threshold: float, *, num_perm: int = NUM_PERM, recall: float = MIN_RECALL + SCREEN_MISS
) -> tuple[int, int]:
    """`(bands, rows)` with the most rows per band (fewest candidates) that still makes a pair at
    `threshold` a candidate with probability >= `recall`.

    At 0.8 with 128 permutations: 21 bands of 6 rows; a pair at J = 0.8 is a candidate with
    probability 0.9983 (0.99995 at J = 0.9), a pair at J = 0.5 with 0.28, at J = 0.3 with 0.015.
    """
    best = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if detection_probability(threshold, bands=bands, rows=rows) >= recall:
            best = (bands, rows)
    if best is None:
        lowest = 1.0 - (1.0 - recall) ** (1.0 / num_perm)
        raise ValueError(f"near_threshold={threshold} is too low for LSH: use at least {lowest:.3f}, or None")
    return best


def _min_agreement(threshold: float, perms: int) -> int:
    """The most signature agreements a candidate may be required to have while a pair at `threshold`
    (agreements ~ Binomial(perms, threshold)) falls short with probability <= SCREEN_MISS."""
    below = 0.0  # P(agreements < k)
    best = 0
    for k in range(perms + 1):
        if below <= SCREEN_MISS:
            best = k
        below += math.comb(perms, k) * threshold**k * (1.0 - threshold) ** (perms - k)
    return best


def _splitmix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (arithmetic wraps modulo 2**64)."""
    values = values ^ (values >> np.uint64(30))
    values = values * _MIX1
    values = values ^ (values >> np.uint64(27))
    values = values * _MIX2
    return values ^ (values >> np.uint64(31))


def _shingle_hashes(normalized: str, size: int) -> np.ndarray:
    """One well-mixed uint32 per character `size`-gram (with repeats), in text order.

    A polynomial over the code points, vectorised over all windows at once: hashlib per shingle
    would cost ~30 M calls for 100k texts. 32 bits keep the MinHash arithmetic in uint32 (4x less
    work than uint64); a collision (odds ~2e-5 per pair of 300-char texts) can only add a candidate,
    which the exact check rejects.
    """
    points = np.frombuffer(normalized.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = len(points) - size + 1
    hashes = points[:count].copy()
    for offset in range(1, size):
        hashes = hashes * _BASE + points[offset : offset + count]
    return (_splitmix(hashes) >> np.uint64(32)).astype(np.uint32)


def _coefficients(seed: int, count: int, *, salt: str) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (a, b) of the permutations x -> a*x + b (mod 2**32); a is odd, so each is a bijection.

    Taken from blake2b rather than a numpy RNG, whose streams may change between numpy releases.
    """
    digests = [
        hashlib.blake2b(f"dflash-dedup:{salt}:{seed}:{i}".encode(), digest_size=8).digest()
        for i in range(count)
    ]
    a = np.array([int.from_bytes(d[:4], "little") | 1 for d in digests], dtype=np.uint32)
    b = np.array([int.from_bytes(d[4:], "little") for d in digests], dtype=np.uint32)
    return a, b


class Deduplicator:
    """Keeps each text unless a kept one is an exact or near duplicate of it (module docstring).

    Finding a near pair takes three steps: LSH banding makes candidates (`lsh_bands`); candidates
    whose signatures agree on too few permutations are dropped (`SCREEN_MISS` of pairs at the
    threshold are); the rest are checked on the true Jaccard, most similar first. A pair at the
    threshold is refused with probability >= 0.9983 - 0.001 at 0.8, and >= 0.99 at any threshold
    (outside buckets filled to `MAX_BUCKET`).

    `counts` holds the verdicts so far ("kept", "exact_duplicate", "near_duplicate");
    `false_candidates` counts candidates that the exact check turned down.
    Memory: about 2.5 KB per kept text (band index, signature, normalised text), plus <= 50 MB of cache.
    """

    def __init__(self, *, near_threshold: float | None = 0.8, shingle: int = 5, seed: int = 0) -> None:
        if near_threshold is not None and not 0.0 < near_threshold <= 1.0:
            raise ValueError(f"near_threshold must be in (0, 1] or None, got {near_threshold}")
        if shingle < 1:
            raise ValueError(f"shingle must be at least 1 character, got {shingle}")
        # Character shingles rather than word n-grams: they need no word segmenter (CJK, Thai), and a
        # 50-char prompt still has ~46 of them where it has ~6 word 3-grams, too few for a stable
        # Jaccard. A one-word edit changes about len(word) + shingle - 1 of them on each side.
        self.near_threshold = near_threshold
        self.shingle = shingle
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.false_candidates = 0
        self._exact: set[str] = set()
        self._texts: list[str] = []  # normalised kept texts that have shingles, by entry id
        if near_threshold is not None:
            self.bands, self.rows = lsh_bands(near_threshold)
            perms = self.bands * self.rows
            self._a, self._b = _coefficients(seed, perms, salt="perm")
            self._band_mix = _coefficients(seed, self.rows, salt="band")[0].astype(np.uint64)
            self._min_agree = _min_agreement(near_threshold, perms)
            self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
            self._signatures = np.zeros((1024, perms), dtype=np.uint32)
            # In a dense region the same bucket members are checked again and again.
            self._stored_shingles = functools.lru_cache(maxsize=SHINGLE_CACHE)(self._shingles_of_entry)

    def __len__(self) -> int:
        return self.counts["kept"]

    def add(self, text: str) -> str | None:
        """Keep `text` (returns None) or refuse it: returns "exact_duplicate" or "near_duplicate"."""
        normalized = normalize(text)
        if normalized in self._exact:
            self.counts[EXACT_DUPLICATE] += 1
            return EXACT_DUPLICATE
        signature = self._signature(normalized)
        if signature is not None:
            keys = self._band_keys(signature)
            if self._has_near_duplicate(normalized, signature=signature, keys=keys):
                self.counts[NEAR_DUPLICATE] += 1
                return NEAR_DUPLICATE
            self._index(normalized, signature=signature, keys=keys)
        self._exact.add(normalized)
        self.counts["kept"] += 1
        return None

    def signature(self, text: str) -> np.ndarray | None:
        """MinHash signature (uint32 [bands * rows]) of `text`'s normalised form; None without a near
        check or for a text shorter than one shingle. The same for a given seed in every process."""
        return self._signature(normalize(text))

    def _signature(self, normalized: str) -> np.ndarray | None:
        if self.near_threshold is None or len(normalized) < self.shingle:
            return None
        hashes = _shingle_hashes(normalized, self.shingle)
        return (self._a[:, None] * hashes[None, :] + self._b[:, None]).min(axis=1)  # [perms]

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        # One 64-bit key per band; a key collision only adds a candidate that the checks reject.
        per_band = signature.reshape(self.bands, self.rows).astype(np.uint64) * self._band_mix[None, :]
        return _splitmix(per_band.sum(axis=1, dtype=np.uint64)).tolist()

    def _has_near_duplicate(self, normalized: str, *, signature: np.ndarray, keys: list[int]) -> bool:
        found: list[int] = []
        for bucket, key in zip(self._buckets, keys, strict=True):
            members = bucket.get(key)
            if isinstance(members, int):
                found.append(members)
            elif members is not None:
                found.extend(members)
        if not found:
            return False
        candidates = np.unique(np.array(found, dtype=np.int64))
        agreement = (self._signatures[candidates] == signature[None, :]).sum(axis=1)
        likely = agreement >= self._min_agree
        self.false_candidates += int((~likely).sum())
        # Most agreement first, ties by entry id: the same work in every process.
        order = np.lexsort((candidates[likely], -agreement[likely]))
        threshold = float(self.near_threshold or 0.0)
        mine = shingles(normalized, self.shingle)
        for entry in candidates[likely][order].tolist():
            if jaccard(mine, self._stored_shingles(entry)) >= threshold:
                return True
            self.false_candidates += 1
        return False

    def _shingles_of_entry(self, entry: int) -> set[str]:
        return shingles(self._texts[entry], self.shingle)

    def _index(self, normalized: str, *, signature: np.ndarray, keys: list[int]) -> None:
        entry = len(self._texts)
        self._texts.append(normalized)
        if entry == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.zeros_like(self._signatures)])
        self._signatures[entry] = signature
        for bucket, key in zip(self._buckets, keys, strict=True):
            members = bucket.get(key)
            # Most buckets hold one text: a bare int (shared by all bands) costs no list.
            if members is None:
                bucket[key] = entry
            elif isinstance(members, int):
                bucket[key] = [members, entry]
            elif len(members) < MAX_BUCKET:
                members.append(entry)
