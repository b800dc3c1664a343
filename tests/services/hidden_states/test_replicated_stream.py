"""`ReplicatedGenerationStream`: prompts spread over engines, each engine driven by its own thread.

The engines here are a stand-in for vLLM's (one token per prompt per step, finished after
max_new_tokens); the service with real vLLM replicas is tested in test_vllm_generate_only.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from services.hidden_states.backends.base import GeneratedSequence, GenerationParams
from services.hidden_states.backends.replicated_stream import ReplicatedGenerationStream

WAIT_S = 30.0


class TokenPerStepEngine:
    """Every running prompt gets the token (its first id + steps so far) each step."""

    def __init__(self, *, fail_on_step: int | None = None) -> None:
        self.running: dict[str, tuple[list[int], GenerationParams, list[int]]] = {}
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.steps = 0
        self.fail_on_step = fail_on_step
        self.may_step = threading.Event()
        self.may_step.set()
        self.threads: set[str] = set()

    @property
    def unfinished(self) -> int:
        return len(self.running)

    def check(self, prompt: list[int], params: GenerationParams) -> None:
        if not prompt:
            raise ValueError("empty prompt")

    def add(self, key: str, prompt: list[int], params: GenerationParams) -> None:
        self.threads.add(threading.current_thread().name)
        self.running[key] = (prompt, params, [])
        self.added.append(key)

    def step(self) -> list[tuple[str, GeneratedSequence]]:
        self.threads.add(threading.current_thread().name)
        assert self.may_step.wait(WAIT_S)
        self.steps += 1
        if self.steps == self.fail_on_step:
            raise RuntimeError("engine died")
        finished = []
        for key, (prompt, params, tokens) in list(self.running.items()):
            tokens.append(prompt[0] + len(tokens))
            if len(tokens) == params.max_new_tokens:
                del self.running[key]
                finished.append((key, GeneratedSequence(token_ids=tokens, finish_reason="length")))
        return finished

    def abort(self, keys: Sequence[str]) -> None:
        self.threads.add(threading.current_thread().name)
        for key in keys:
            if self.running.pop(key, None) is not None:
                self.aborted.append(key)


def collect(stream: ReplicatedGenerationStream, count: int) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    deadline = time.monotonic() + WAIT_S
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} completions arrived"
        got.update({key: seq.token_ids for key, seq in stream.step()})
    return got


@pytest.fixture
def engines():
    return [TokenPerStepEngine() for _ in range(3)]


@pytest.fixture
def stream(engines):
    replicated = ReplicatedGenerationStream(engines, poll_s=0.01)
    yield replicated
    for engine in engines:
        engine.may_step.set()
    replicated.close()


def test_prompts_go_to_the_least_loaded_engine_and_all_come_back(stream, engines):
    for i in range(10):
        stream.add(f"k{i}", [100 * i], GenerationParams(max_new_tokens=3 + i % 2))
    assert stream.unfinished == 10
    got = collect(stream, 10)
    assert got == {f"k{i}": [100 * i + t for t in range(3 + i % 2)] for i in range(10)}
    assert sorted(len(e.added) for e in engines) == [3, 3, 4]
    assert sorted(k for e in engines for k in e.added) == sorted(got)
    assert stream.unfinished == 0 and stream.step() == []
    # Each engine is touched by one thread only, never the caller's.
    assert [len(e.threads) for e in engines] == [1, 1, 1]
    assert threading.current_thread().name not in set().union(*(e.threads for e in engines))


def test_a_prompt_the_engine_refuses_raises_in_the_caller_and_is_not_added(stream, engines):
    with pytest.raises(ValueError, match="empty prompt"):
        stream.add("bad", [], GenerationParams(max_new_tokens=2))
    assert stream.unfinished == 0
    stream.add("good", [7], GenerationParams(max_new_tokens=2))
    assert collect(stream, 1) == {"good": [7, 8]}
    assert "bad" not in [k for e in engines for k in e.added]


def test_an_aborted_prompt_never_comes_back(stream, engines):
    for engine in engines:
        engine.may_step.clear()
    stream.add("gone", [1], GenerationParams(max_new_tokens=50))
    stream.add("kept", [2], GenerationParams(max_new_tokens=50))
    stream.abort(["gone", "unknown"])
    assert stream.unfinished == 1
    for engine in engines:
        engine.may_step.set()
    assert collect(stream, 1) == {"kept": list(range(2, 52))}
    deadline = time.monotonic() + WAIT_S
    while "gone" not in [k for e in engines for k in e.aborted]:  # the abort reached its engine
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_stuck_engine_does_not_hold_up_the_others(stream, engines):
    engines[0].may_step.clear()  # engine 0 is inside a long step
    for i in range(3):
        stream.add(f"k{i}", [10 * i], GenerationParams(max_new_tokens=2))
    expected = {f"k{i}": [10 * i, 10 * i + 1] for i in range(3)}
    stuck = "k0"  # the first prompt goes to the first of equally loaded engines
    assert collect(stream, 2) == {k: v for k, v in expected.items() if k != stuck}
    engines[0].may_step.set()
    assert collect(stream, 1) == {stuck: expected[stuck]}


def test_an_engine_failure_is_raised_by_step():
    engines = [TokenPerStepEngine(), TokenPerStepEngine(fail_on_step=1)]
    stream = ReplicatedGenerationStream(engines, poll_s=0.01)
    try:
        stream.add("a", [1], GenerationParams(max_new_tokens=20))
        stream.add("b", [2], GenerationParams(max_new_tokens=20))
        deadline = time.monotonic() + WAIT_S
        with pytest.raises(RuntimeError, match="engine died"):
            while time.monotonic() < deadline:
                stream.step()
    finally:
        stream.close()


def test_no_engines_is_refused():
    with pytest.raises(ValueError, match="at least one engine"):
        ReplicatedGenerationStream([])
