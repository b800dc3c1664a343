"""The in-process hidden-state source computes announced samples ahead, in few large forwards.

What must hold: a trainer-like run (announce the next 8 steps, then extract the current one)
gets the tensors a fresh source computes for each step alone, in far fewer verifier forwards;
a stashed result is never served to a sample id whose tokens changed; announced samples that are
never asked for cannot grow memory; `close()` drops everything.

Equality is up to float rounding (atol 1e-6): grouping samples differently changes the padded
width of a forward, and the CPU attention/matmul kernels then round the last bit differently
(~1e-7 here). States of another sequence differ by O(1), so the check still pins identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from dflash_core.capture import find_decoder_layers
from dflash_core.verifier import fingerprint_of
from services.trainer.sources import InProcessSource, SampleHiddenStates, SampleRequest
from tests.factories.verifiers import make_tiny_verifier

LAYERS = [1, 2]  # the trainer's --target-layer-ids; layer N = 4 rides along
PREFETCH_STEPS = 8  # as services/trainer/trainer.py announces
VOCAB = 300


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny(request):
    return make_tiny_verifier(arch=request.param, num_layers=4, hidden_size=128)


def make_source(tiny, **kwargs) -> InProcessSource:
    fingerprint = fingerprint_of(tiny.model.config, tiny.tokenizer, name_or_path=tiny.name_or_path)
    return InProcessSource(model=tiny.model, fingerprint=fingerprint, target_layer_ids=LAYERS, **kwargs)


def make_steps(num_steps: int, per_step: int, *, seed: int = 0) -> list[list[SampleRequest]]:
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(num_steps):
        ids = range(step * per_step, (step + 1) * per_step)
        steps.append([request(i, 8 + (i * 13) % 50, generator) for i in ids])
    return steps


def request(sample_id: int, length: int, generator: torch.Generator) -> SampleRequest:
    return SampleRequest(
        sample_id=sample_id, input_ids=torch.randint(0, VOCAB, (length,), generator=generator)
    )


@contextmanager
def counting_forwards(tiny) -> Iterator[list[int]]:
    """Counts the verifier's base-model forwards (one per padded batch) with a real hook."""
    base, _ = find_decoder_layers(tiny.model)
    count = [0]
    handle = base.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def run_like_the_trainer(source: InProcessSource, steps: list[list[SampleRequest]]) -> list[list]:
    results = []
    for index, step in enumerate(steps):
        upcoming = [r for later in steps[index + 1 : index + 1 + PREFETCH_STEPS] for r in later]
        if upcoming:
            source.prefetch(upcoming)
        results.append(source.extract(step))
    return results


def assert_same_states(got: list[SampleHiddenStates], want: list[SampleHiddenStates]) -> None:
    assert [s.sample_id for s in got] == [s.sample_id for s in want]
    for a, b in zip(got, want, strict=True):
        assert a.aux.dtype == b.aux.dtype and a.aux.shape == b.aux.shape and a.last.shape == b.last.shape
        torch.testing.assert_close(a.aux, b.aux, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.last, b.last, rtol=0, atol=1e-6)


def test_prefetched_steps_equal_each_step_alone_in_fewer_forwards(tiny):
    steps = make_steps(12, 4)
    step_tokens = max(sum(r.input_ids.numel() for r in step) for step in steps)
    alone = make_source(tiny, prefetch_tokens=0)
    with counting_forwards(tiny) as forwards_alone:
        expected = [alone.extract(step) for step in steps]
    ahead = make_source(tiny, prefetch_tokens=4 * step_tokens)
    with counting_forwards(tiny) as forwards_ahead:
        got = run_like_the_trainer(ahead, steps)
    for got_step, want_step in zip(got, expected, strict=True):
        assert_same_states(got_step, want_step)
    assert forwards_alone[0] == 12  # one forward per step (the whole step fits max_batch_tokens)
    assert forwards_ahead[0] <= 4, forwards_ahead[0]  # about one per 4 steps
    assert (ahead.pending_tokens, ahead.stashed_tokens) == (0, 0)  # everything announced was used


def test_results_are_in_request_order_and_keep_the_output_dtype(tiny):
    steps = make_steps(3, 5, seed=1)
    source = make_source(tiny, prefetch_tokens=10_000, output_dtype=torch.bfloat16)
    source.prefetch(steps[1] + steps[2])
    first = source.extract(steps[0])
    assert source.stashed_tokens == sum(r.input_ids.numel() for r in steps[1] + steps[2])
    shuffled = [steps[2][3], steps[1][0], steps[2][0]]  # served from the stash, in the order asked
    served = source.extract(shuffled)
    assert [s.sample_id for s in served] == [r.sample_id for r in shuffled]
    for states, req in zip(first + served, steps[0] + shuffled, strict=True):
        t = req.input_ids.numel()
        assert states.aux.dtype == states.last.dtype == torch.bfloat16
        assert states.aux.shape == (t, len(LAYERS) * 128) and states.last.shape == (t, 128)
        assert states.aux.is_contiguous() and states.last.is_contiguous()
    assert_same_states(served, make_source(tiny, output_dtype=torch.bfloat16).extract(shuffled))


def test_a_stashed_result_is_not_served_to_changed_tokens(tiny):
    generator = torch.Generator().manual_seed(2)
    kept, same_length, other_length = (request(i, 20, generator) for i in (7, 8, 9))
    source = make_source(tiny, prefetch_tokens=10_000)
    source.prefetch([kept, same_length, other_length])
    source.extract([request(1, 12, generator)])  # computes the announced three into the stash
    changed_ids = same_length.input_ids.clone()
    changed_ids[5] = (changed_ids[5] + 1) % VOCAB
    now = [
        kept,
        SampleRequest(sample_id=8, input_ids=changed_ids),  # same length, one token differs
        SampleRequest(sample_id=9, input_ids=other_length.input_ids[:15]),  # shorter
    ]
    with counting_forwards(tiny) as forwards:
        got = source.extract(now)
    assert forwards[0] == 1  # ids 8 and 9 were recomputed; id 7 came from the stash
    assert_same_states(got, make_source(tiny, prefetch_tokens=0).extract(now))
    assert source.stashed_tokens == 0  # the stale entries were dropped, not kept


def test_announced_samples_never_asked_for_stay_bounded(tiny):
    generator = torch.Generator().manual_seed(3)
    budget = 100
    limit = InProcessSource.BUFFER_FACTOR * budget
    source = make_source(tiny, prefetch_tokens=budget)
    seen_stash = 0
    for step in range(30):
        source.prefetch([request(1000 + 10 * step + k, 30, generator) for k in range(10)])
        assert source.pending_tokens <= limit
        source.extract([request(step, 10, generator)])
        assert source.stashed_tokens <= limit and source.pending_tokens <= limit
        seen_stash = max(seen_stash, source.stashed_tokens)
    assert seen_stash > 0  # announced samples were computed ahead, then dropped as the stash filled
    source.close()
    assert (source.pending_tokens, source.stashed_tokens) == (0, 0)


def test_without_prefetch_it_computes_on_demand(tiny):
    steps = make_steps(2, 3, seed=4)
    source = make_source(tiny)
    with counting_forwards(tiny) as forwards:
        got = [source.extract(step) for step in steps]
    assert forwards[0] == 2 and (source.pending_tokens, source.stashed_tokens) == (0, 0)
    assert_same_states(got[1], make_source(tiny, prefetch_tokens=0).extract(steps[1]))


def test_bad_budgets_are_refused(tiny):
    with pytest.raises(ValueError, match="prefetch_tokens"):
        make_source(tiny, prefetch_tokens=-1)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        make_source(tiny, max_batch_tokens=0)
