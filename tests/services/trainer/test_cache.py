"""The hidden-state cache and `CachingSource`: round trip, refusals, on_missing/on_generate, disk full.

Real parts only: a tiny Qwen3 verifier saved to disk, data written by `prepare_data`, hidden
states captured by `InProcessSource`, safetensors files on disk, and `run_training` end to end.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from dflash_core.atomic_files import TEMP_PREFIX
from dflash_core.config import PrepareDataConfig
from dflash_core.data.prepare import load_prepared, prepare_data
from dflash_core.verifier import fingerprint_of, tokenizer_fingerprint
from services.trainer import cache as cache_module
from services.trainer.batches import BatchBuilder, TokenRows
from services.trainer.cache import (
    CachingSource,
    HiddenStateCache,
    HiddenStateCacheError,
    MissingHiddenStatesError,
)
from services.trainer.main import run_training
from services.trainer.sources import InProcessSource, SampleHiddenStates, SampleRequest
from tests.factories.chats import write_chats
from tests.factories.verifiers import make_tiny_verifier
from tests.services.trainer.test_training import final_weights, train_config

LAYERS = [1, 3]


class CountingSource(InProcessSource):
    """The real in-process source, remembering which samples it was asked to compute."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.computed: list[int] = []

    def extract(self, requests: Sequence[SampleRequest]) -> list[SampleHiddenStates]:
        self.computed.extend(r.sample_id for r in requests)
        return super().extract(requests)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cache")
    tiny = make_tiny_verifier(root / "verifier", arch="qwen3", num_layers=4)
    data = root / "data"
    config = PrepareDataConfig(
        model=str(tiny.path),
        data=[str(write_chats(root / "chats.jsonl", count=60))],
        output=data,
        seq_length=96,
    )
    prepare_data(
        config, tokenizer=tiny.tokenizer, tokenizer_fingerprint=tokenizer_fingerprint(tiny.tokenizer)
    )
    fingerprint = fingerprint_of(tiny.model.config, tiny.tokenizer, name_or_path=str(tiny.path))
    rows = TokenRows(load_prepared(data)[0], max_length=96)
    return {"root": root, "verifier": tiny.path, "data": data, "tiny": tiny, "fp": fingerprint, "rows": rows}


def source(workspace, layers=LAYERS, **kwargs) -> CountingSource:
    return CountingSource(
        model=workspace["tiny"].model, fingerprint=workspace["fp"], target_layer_ids=layers, **kwargs
    )


def requests(workspace, ids: Sequence[int]) -> list[SampleRequest]:
    return [SampleRequest(sample_id=i, input_ids=workspace["rows"].get(i)[0]) for i in ids]


def make_cache(workspace, root: Path, layers=LAYERS, fingerprint=None) -> HiddenStateCache:
    return HiddenStateCache(root, fingerprint=fingerprint or workspace["fp"], target_layer_ids=layers)


def fill(workspace, cache: HiddenStateCache, ids: Sequence[int]) -> list[SampleHiddenStates]:
    states = source(workspace, cache.target_layer_ids).extract(requests(workspace, ids))
    for request, sample in zip(requests(workspace, ids), states, strict=True):
        assert cache.put(sample, input_ids=request.input_ids)
    return states


def assert_same(actual: Sequence[SampleHiddenStates], expected: Sequence[SampleHiddenStates]) -> None:
    assert [s.sample_id for s in actual] == [s.sample_id for s in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got.aux.dtype == want.aux.dtype and torch.equal(got.aux, want.aux)
        assert torch.equal(got.last, want.last)


# --------------------------------------------------------------------------------- the store


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_round_trip_equals_the_in_process_tensors(workspace, tmp_path, dtype):
    inner = source(workspace, output_dtype=dtype)
    cache = make_cache(workspace, tmp_path)
    reqs = requests(workspace, [3, 0, 7])
    computed = inner.extract(reqs)
    for request, sample in zip(reqs, computed, strict=True):
        assert cache.put(sample, input_ids=request.input_ids)
    assert cache.get(99, reqs[0].input_ids) is None
    assert_same([cache.get(r.sample_id, r.input_ids) for r in reqs], computed)
    info = json.loads((cache.folder / "cache_info.json").read_text())
    assert info["target_layer_ids"] == LAYERS and info["fingerprint"] == workspace["fp"].model_dump()
    stored = sorted(p.name for p in cache.folder.iterdir())
    assert stored == ["0.safetensors", "3.safetensors", "7.safetensors", "cache_info.json"]


def test_other_layer_ids_or_verifier_never_read_and_refused_naming_both(workspace, tmp_path):
    ours = make_cache(workspace, tmp_path)
    fill(workspace, ours, [0])
    other_ids = make_cache(workspace, tmp_path, layers=[1, 2])
    assert other_ids.folder != ours.folder
    assert other_ids.get(0, workspace["rows"].get(0)[0]) is None

    # A folder that claims to be ours but was made for other layer ids (copied by hand, say).
    shutil.copytree(ours.folder, other_ids.folder)
    with pytest.raises(HiddenStateCacheError) as exc:
        make_cache(workspace, tmp_path, layers=[1, 2])
    assert "[1, 2] (this run)" in str(exc.value) and f"[1, 3] (cache {other_ids.folder})" in str(exc.value)

    llama = make_tiny_verifier(tmp_path / "other", arch="llama", num_layers=4)
    llama_fp = fingerprint_of(llama.model.config, llama.tokenizer, name_or_path=str(llama.path))
    theirs = make_cache(workspace, tmp_path, fingerprint=llama_fp)
    assert theirs.folder != ours.folder
    shutil.copytree(ours.folder, theirs.folder)
    with pytest.raises(HiddenStateCacheError) as exc:
        make_cache(workspace, tmp_path, fingerprint=llama_fp)
    message = str(exc.value)
    assert str(llama.path) in message and str(workspace["verifier"]) in message
    assert "LlamaForCausalLM" in message and "Qwen3ForCausalLM" in message


def test_changed_input_ids_are_detected_naming_the_file(workspace, tmp_path):
    cache = make_cache(workspace, tmp_path)
    fill(workspace, cache, [2])
    changed = workspace["rows"].get(2)[0].clone()
    changed[5] += 1
    with pytest.raises(HiddenStateCacheError, match="other token ids") as exc:
        cache.get(2, changed)
    assert str(cache.path_for(2)) in str(exc.value)


def test_non_finite_or_misshapen_entries_are_refused(workspace, tmp_path):
    cache = make_cache(workspace, tmp_path)
    good = fill(workspace, cache, [4])[0]
    input_ids = workspace["rows"].get(4)[0]
    nan_aux = good.aux.clone()
    nan_aux[0, 0] = float("nan")
    cache.put(SampleHiddenStates(sample_id=4, aux=nan_aux, last=good.last), input_ids=input_ids)
    with pytest.raises(HiddenStateCacheError, match="non-finite") as exc:
        cache.get(4, input_ids)
    assert str(cache.path_for(4)) in str(exc.value)
    cache.put(SampleHiddenStates(sample_id=4, aux=good.aux, last=good.last[:, :8]), input_ids=input_ids)
    with pytest.raises(HiddenStateCacheError, match="shape"):
        cache.get(4, input_ids)


# --------------------------------------------------------------------------------- CachingSource


def test_generate_and_cache_fills_then_serves_without_the_verifier(workspace, tmp_path):
    ids = [5, 1, 8, 2]
    first_inner = source(workspace)
    first = CachingSource(
        first_inner, cache=make_cache(workspace, tmp_path), on_missing="generate", on_generate="cache"
    )
    computed = first.extract(requests(workspace, ids))
    assert first_inner.computed == ids
    assert (first.counters.hits, first.counters.generated) == (0, 4)

    second_inner = source(workspace)
    second = CachingSource(
        second_inner, cache=make_cache(workspace, tmp_path), on_missing="generate", on_generate="cache"
    )
    assert_same(second.extract(requests(workspace, ids)), computed)
    assert second_inner.computed == []
    assert (second.counters.hits, second.counters.generated) == (4, 0)


def test_generate_and_delete_leaves_the_cache_empty(workspace, tmp_path):
    cache = make_cache(workspace, tmp_path)
    caching = CachingSource(source(workspace), cache=cache, on_missing="generate", on_generate="delete")
    assert len(caching.extract(requests(workspace, [0, 1]))) == 2
    assert not cache.folder.exists()


def test_raise_names_the_missing_ids_the_folder_and_the_fix(workspace, tmp_path):
    cache = make_cache(workspace, tmp_path)
    fill(workspace, cache, [0, 2])
    caching = CachingSource(None, cache=cache, on_missing="raise", on_generate="delete")
    assert [s.sample_id for s in caching.extract(requests(workspace, [2, 0]))] == [2, 0]
    with pytest.raises(MissingHiddenStatesError) as exc:
        caching.extract(requests(workspace, [0, 6, 2, 9]))
    message = str(exc.value)
    assert "[6, 9]" in message and str(cache.folder) in message
    assert "--on-missing generate --on-generate cache" in message


def test_skip_drops_misses_silently_and_keeps_order(workspace, tmp_path, caplog):
    cache = make_cache(workspace, tmp_path)
    expected = fill(workspace, cache, [3, 1])
    caching = CachingSource(None, cache=cache, on_missing="skip", on_generate="delete")
    with caplog.at_level(logging.WARNING):
        got = caching.extract(requests(workspace, [3, 4, 1, 5]))
    assert_same(got, expected)
    assert (caching.counters.hits, caching.counters.dropped) == (2, 2)
    assert not caplog.records


def test_warn_names_dropped_ids_and_is_rate_limited(workspace, tmp_path, caplog):
    cache = make_cache(workspace, tmp_path)
    fill(workspace, cache, [0])
    caching = CachingSource(None, cache=cache, on_missing="warn", on_generate="delete")
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        assert [s.sample_id for s in caching.extract(requests(workspace, [0, 11, 12]))] == [0]
        caching.extract(requests(workspace, [13]))  # inside the interval: counted, not logged
    assert len(caplog.records) == 1 and "[11, 12]" in caplog.records[0].getMessage()
    assert caching.counters.dropped == 3
    caching.warn_interval_s = 0.0
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        caching.extract(requests(workspace, [14]))
    assert "[13, 14]" in caplog.records[-1].getMessage()  # what was held back is reported next


def test_batch_builder_keeps_what_came_back_and_returns_none_for_nothing(workspace, tmp_path):
    cache = make_cache(workspace, tmp_path)
    fill(workspace, cache, [0, 2])
    caching = CachingSource(None, cache=cache, on_missing="skip", on_generate="delete")
    builder = BatchBuilder(rows=workspace["rows"], source=caching, total_seq_len=192, device="cpu")
    batch = builder.build([[0, 1], [3, 4], [2]])
    assert batch is not None and batch.shape == (2, 192) and batch.num_documents == 2
    lengths = workspace["rows"].lengths
    assert batch.num_tokens == lengths[0] + lengths[2]
    assert builder.build([[1, 3], [4]]) is None


def _partial_then_fail(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\0" * 64)  # the disk fills up part-way through the file
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_warns_once_leaves_no_partial_file_and_keeps_serving(
    workspace, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(cache_module, "save_file", _partial_then_fail)
    cache = make_cache(workspace, tmp_path)
    caching = CachingSource(source(workspace), cache=cache, on_missing="generate", on_generate="cache")
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        assert len(caching.extract(requests(workspace, [0, 1]))) == 2
        assert len(caching.extract(requests(workspace, [2]))) == 1
    assert len(caplog.records) == 1 and "No space left" in caplog.records[0].getMessage()
    assert not cache.writable
    assert [p.name for p in cache.folder.iterdir()] == ["cache_info.json"]


def test_training_continues_when_the_cache_disk_is_full(workspace, monkeypatch):
    monkeypatch.setattr(cache_module, "save_file", _partial_then_fail)
    config = train_config(
        workspace,
        "disk-full",
        epochs=1,
        on_generate="cache",
        hidden_states_cache=workspace["root"] / "full-disk-cache",
    )
    result = run_training(config)
    assert result.state.epoch == 1
    assert not list((workspace["root"] / "full-disk-cache").rglob("*.safetensors"))
    assert not list((workspace["root"] / "full-disk-cache").rglob(f"{TEMP_PREFIX}*"))


# --------------------------------------------------------------------------------- end to end


def counters_of(save_path: Path) -> dict:
    lines = [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]
    return [row for row in lines if "hidden_states/hits" in row][-1]


def test_cached_run_then_offline_run_from_the_cache_gives_identical_weights(workspace):
    cache_root = workspace["root"] / "e2e-cache"
    online = run_training(
        train_config(workspace, "online", epochs=2, on_generate="cache", hidden_states_cache=cache_root)
    )
    samples = len(workspace["rows"])
    assert len(list(cache_root.rglob("*.safetensors"))) == samples
    counts = counters_of(online.save_path)
    assert counts["hidden_states/generated"] == samples  # each sample computed once, epoch 2 from cache
    assert counts["hidden_states/hits"] > 0

    offline = run_training(
        train_config(workspace, "offline", epochs=2, on_missing="raise", hidden_states_cache=cache_root)
    )
    assert offline.state.global_step == online.state.global_step
    assert counters_of(offline.save_path)["hidden_states/generated"] == 0
    expected, actual = final_weights(online.save_path), final_weights(offline.save_path)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert offline.state.history == online.state.history


def test_offline_run_on_an_empty_cache_fails_with_the_fix(workspace):
    config = train_config(
        workspace, "offline-empty", on_missing="raise", hidden_states_cache=workspace["root"] / "empty"
    )
    with pytest.raises(MissingHiddenStatesError, match="--on-missing generate --on-generate cache"):
        run_training(config)


def test_skip_with_an_empty_cache_counts_every_step_and_trains_nothing(workspace):
    config = train_config(
        workspace, "skip-all", epochs=1, on_missing="skip", hidden_states_cache=workspace["root"] / "none"
    )
    result = run_training(config)
    assert result.state.epoch == 1 and result.state.global_step > 0
    assert result.state.history == []  # no validation batch had hidden states
    assert counters_of(result.save_path)["hidden_states/hits"] == 0
