"""bench/synthetic_generation.py: the engine behind bench/generate_path.py answers as vLLM would.

It must batch like vLLM's scheduler (at most max_num_seqs running, one token each per step), end
replies the way a real engine does (eos or a stop id: "stop", the token kept; max_new_tokens:
"length"), forget aborted prompts, and come back whole through a real service and GenerateClient
(the scheduler's streamed path, which otherwise only the vLLM tests reach).
"""

from __future__ import annotations

from bench.synthetic_generation import (
    EOS_TOKEN_ID,
    SyntheticEngine,
    SyntheticGenerateBackend,
    synthetic_reply,
)
from services.hidden_states.backends.base import GenerationParams
from services.hidden_states.generate_client import GenerateClient
from services.hidden_states.server import HiddenStateServer

LENGTHS = (20, 40)


def prompts(count: int) -> list[list[int]]:
    return [[5 + i, 17, 33 + 2 * i, 101] for i in range(count)]


def test_replies_end_as_a_real_engine_ends_them():
    prompt = [7, 8, 9]
    natural = synthetic_reply(
        prompt, GenerationParams(max_new_tokens=500), lengths=LENGTHS, eos_token_ids=(2,)
    )
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == EOS_TOKEN_ID
    assert LENGTHS[0] <= len(natural.token_ids) <= LENGTHS[1]
    assert EOS_TOKEN_ID not in natural.token_ids[:-1]

    cut = synthetic_reply(prompt, GenerationParams(max_new_tokens=5), lengths=LENGTHS, eos_token_ids=(2,))
    assert (cut.token_ids, cut.finish_reason) == (natural.token_ids[:5], "length")

    stop_id = natural.token_ids[3]
    stopped = synthetic_reply(
        prompt,
        GenerationParams(max_new_tokens=500, stop_token_ids=(stop_id,)),
        lengths=LENGTHS,
        eos_token_ids=(2,),
    )
    assert (stopped.token_ids, stopped.finish_reason) == (natural.token_ids[:4], "stop")


def test_at_most_max_num_seqs_run_and_aborted_prompts_never_finish():
    engine = SyntheticEngine(max_num_seqs=4, lengths=LENGTHS)
    params = GenerationParams(max_new_tokens=500)
    for index, prompt in enumerate(prompts(10)):
        engine.add(f"k{index}", prompt, params)
    engine.abort(["k1", "k7"])
    finished: dict[str, list[int]] = {}
    while engine.unfinished:
        before = engine.stats.tokens
        finished.update((key, reply.token_ids) for key, reply in engine.step())
        assert engine.stats.tokens - before <= 4
    assert sorted(finished) == sorted(f"k{i}" for i in range(10) if i not in (1, 7))
    assert engine.stats.tokens == sum(map(len, finished.values()))
    assert engine.stats.aborted == 2


def test_replies_come_back_whole_through_the_service():
    engine = SyntheticEngine(max_num_seqs=8, lengths=LENGTHS)
    server = HiddenStateServer(SyntheticGenerateBackend(engine), port=0, payload_port=0).start()
    try:
        with GenerateClient([server.address], batch_size=5, requests_per_endpoint=3) as client:
            assert client.info.backend == "vllm"  # so real clients pick their vLLM defaults
            replies = client.complete(prompts(23), max_new_tokens=30, stop_token_ids=[EOS_TOKEN_ID])
    finally:
        server.stop(grace=1.0)
    params = GenerationParams(max_new_tokens=30, stop_token_ids=(EOS_TOKEN_ID,))
    for prompt, reply in zip(prompts(23), replies, strict=True):
        expected = synthetic_reply(prompt, params, lengths=LENGTHS, eos_token_ids=(EOS_TOKEN_ID,))
        # The client drops the stop token, as prepare-data wants it.
        assert reply == (expected.token_ids[:-1] if expected.finish_reason == "stop" else expected.token_ids)
    assert server.scheduler.generate_jobs == 5 and engine.unfinished == 0
