"""Client of the service's `Generate` RPC: the verifier's own replies, spread over several endpoints.

    with GenerateClient(["10.0.0.5:8000", "10.0.0.6:8000"]) as client:
        replies = client.complete(prompts, max_new_tokens=1024, temperature=0.0, top_p=1.0, seed=0)

`prepare-data --regenerate-with` drives it through `regenerator_for`, which first refuses a service
whose tokenizer differs from the one the data is prepared with.

Guarantees:
- Every endpoint answers GetInfo at start-up and all serve the same verifier (`ServiceSet`, retried
  for `connect_timeout_s`), else `GenerateError`.
- Prompts are cut into batches (`batch_size` prompts, and under half of gRPC's message limit for
  the request and for its replies); batches run concurrently over the endpoints (least busy
  first), `requests_per_endpoint` calls in flight per endpoint. Both default by backend: a vLLM
  engine batches every prompt it holds, so it gets big calls and enough of them to stay full.
- UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (a restart, a slow or full service) are
  retried a bounded number of times, on another endpoint when there is one, with exponential
  backoff once every endpoint has failed the batch. Anything else (INVALID_ARGUMENT: a prompt too
  long for the service) fails at once. Every error names the endpoint and the status.
- Replies come back in prompt order, as the new tokens WITHOUT the stop token that ended them
  (finish_reason "stop"): callers re-render the reply with the chat template, which writes its own
  end-of-turn, so a kept stop token would appear twice. A reply cut by max_new_tokens is kept whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import grpc

from dflash_core.backoff import Backoff
from dflash_core.config import PrepareDataConfig
from dflash_core.data.regenerate import Complete, Regenerator, end_of_turn_ids
from dflash_core.wire.codec import MAX_MESSAGE_BYTES
from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import parse_endpoint
from services.hidden_states.service_set import HiddenStateServiceError, ServiceSet

__all__ = [
    "RETRYABLE",
    "GenerateClient",
    "GenerateError",
    "Generator",
    "check_same_tokenizer",
    "regenerator_for",
    "reply_tokens",
    "seeded_complete",
]

logger = logging.getLogger(__name__)

# Failures that another try (later, or elsewhere) may cure.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)

# Prompts per Generate call, and calls in flight per endpoint. The transformers backend generates
# one prompt after another, so a big batch only delays the reply towards the deadline, and one call
# queued behind the running one is enough. vLLM runs every prompt it holds in one continuous batch
# (up to 1024 sequences with --generate-only, the rest wait in its queue): 4 calls of 512 keep it
# full while finished calls are answered and the next ones sent.
DEFAULT_BATCH_SIZE = {"vllm": 512, "transformers": 8}
DEFAULT_REQUESTS_PER_ENDPOINT = {"vllm": 4, "transformers": 2}
# A token id takes at most 5 bytes on the wire (varint); a request and its response each stay
# under half of gRPC's message limit (both ends raise it to MAX_MESSAGE_BYTES).
_BYTES_PER_TOKEN, _BYTES_PER_PROMPT = 5, 16
MAX_CALL_BYTES = MAX_MESSAGE_BYTES // 2


class GenerateError(Exception):
    """The service cannot produce the replies; the message names the endpoint and the gRPC status."""


@dataclass
class _Endpoint:
    address: str
    stub: pb_grpc.HiddenStatesStub
    in_flight: int = 0


class GenerateClient:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        batch_size: int | None = None,
        requests_per_endpoint: int | None = None,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        connect_timeout_s: float = 30.0,
        request_timeout_s: float = 1800.0,
    ) -> None:
        """Open a channel to each endpoint and check it with GetInfo.

        `batch_size`: prompts per Generate call (default by backend, `DEFAULT_BATCH_SIZE`).
        `requests_per_endpoint`: calls in flight per endpoint (default by backend,
        `DEFAULT_REQUESTS_PER_ENDPOINT`, times the engines the first endpoint runs), so the next
        batches wait on the service while one runs.
        `max_attempts`: tries per batch over all endpoints. `backoff_s`
        doubles per failure up to `max_backoff_s`. `connect_timeout_s`: how long GetInfo waits for
        an endpoint to come up. `request_timeout_s`: deadline of one Generate call, queueing on the
        service included. Raises `GenerateError`.
        """
        if not endpoints:
            raise GenerateError("no hidden-state service endpoint given (--regenerate-with HOST:PORT ...)")
        try:
            addresses = list(dict.fromkeys(parse_endpoint(e) for e in endpoints))
        except ValueError as exc:
            raise GenerateError(str(exc)) from None
        self.max_attempts = max_attempts
        self._backoff = Backoff(initial_s=backoff_s, maximum_s=max_backoff_s)
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._services = ServiceSet(addresses)
        self._endpoints = [
            _Endpoint(e.address, pb_grpc.HiddenStatesStub(e.channel)) for e in self._services.endpoints
        ]
        try:
            self._services.connect(timeout_s=connect_timeout_s)  # every endpoint, one verifier
        except HiddenStateServiceError as exc:
            self.close()
            raise GenerateError(str(exc)) from None
        except BaseException:
            self.close()
            raise
        # Within what every endpoint takes in one call (0 = no cap, from a service that says none).
        prompt_caps = [i.max_generate_prompts for i in self.infos.values() if i.max_generate_prompts]
        token_caps = [i.max_generate_tokens for i in self.infos.values() if i.max_generate_tokens]
        self.max_call_tokens = min(token_caps, default=None)
        self.batch_size = min(
            batch_size or DEFAULT_BATCH_SIZE.get(self.info.backend, 8), min(prompt_caps, default=1 << 31)
        )
        # An endpoint with N engines side by side (--engine-replicas) keeps N times the calls busy.
        self.requests_per_endpoint = requests_per_endpoint or DEFAULT_REQUESTS_PER_ENDPOINT.get(
            self.info.backend, 2
        ) * max(1, self.info.engine_replicas)
        self._pool = ThreadPoolExecutor(
            max_workers=len(self._endpoints) * self.requests_per_endpoint, thread_name_prefix="generate"
        )

    # ------------------------------------------------------------------ what is served
    @property
    def info(self) -> pb.ServiceInfo:
        """The ServiceInfo of the first endpoint (all serve the same verifier)."""
        return self._services.info

    @property
    def infos(self) -> dict[str, pb.ServiceInfo]:
        return self._services.infos

    @property
    def addresses(self) -> list[str]:
        return [e.address for e in self._endpoints]

    @property
    def calls_in_flight(self) -> int:
        """Generate calls this client keeps in flight at most, over all endpoints."""
        return len(self._endpoints) * self.requests_per_endpoint

    @property
    def max_length(self) -> int:
        """Longest prompt + max_new_tokens every endpoint accepts."""
        return min(info.max_length for info in self.infos.values())

    # ------------------------------------------------------------------ generation
    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
        keep_stop_token: bool = False,
    ) -> list[list[int]]:
        """One reply per prompt, in order: the new token ids, the stop token removed.

        Sampled prompt i of this call uses seed `seed + i` (both backends seed a request's prompts
        seed, seed + 1, ...), so results do not depend on how batches land on endpoints.
        `stop_token_ids` end a reply in addition to the verifier's eos ids. `keep_stop_token`
        returns replies as generated, the stop token kept (live acceptance continues past it).
        Raises `GenerateError`.
        """
        if self._pool is None:
            raise GenerateError("the GenerateClient is closed")
        futures: list[Future[list[list[int]]]] = []
        for start, end in self._batches(prompts, max_new_tokens=max_new_tokens):
            request = pb.GenerateRequest(
                prompts=[pb.Prompt(token_ids=list(p)) for p in prompts[start:end]],
                params=pb.SamplingParams(
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed + start,
                    stop_token_ids=list(stop_token_ids),
                ),
            )
            futures.append(self._pool.submit(self._generate, request, keep_stop_token=keep_stop_token))
        replies: list[list[int]] = []
        try:
            for future in futures:
                replies.extend(future.result())
        except BaseException:
            for future in futures:
                future.cancel()  # batches not started yet; running calls end by themselves
            raise
        return replies

    def _batches(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> list[tuple[int, int]]:
        """(start, end) of each call's prompts: at most `batch_size`, the request and its replies
        under MAX_CALL_BYTES each, and prompt + new tokens within the services' per-call cap (a
        prompt alone is always sent, the service judges it)."""
        batches: list[tuple[int, int]] = []
        start, request_bytes, reply_bytes, tokens = 0, 0, 0, 0
        max_tokens = self.max_call_tokens or 1 << 62
        for end, prompt in enumerate(prompts):
            prompt_bytes = _BYTES_PER_TOKEN * len(prompt) + _BYTES_PER_PROMPT
            new_bytes = _BYTES_PER_TOKEN * max_new_tokens + _BYTES_PER_PROMPT
            full = end - start >= self.batch_size or (
                end > start
                and (
                    max(request_bytes + prompt_bytes, reply_bytes + new_bytes) > MAX_CALL_BYTES
                    or tokens + len(prompt) + max_new_tokens > max_tokens
                )
            )
            if full:
                batches.append((start, end))
                start, request_bytes, reply_bytes, tokens = end, 0, 0, 0
            request_bytes += prompt_bytes
            reply_bytes += new_bytes
            tokens += len(prompt) + max_new_tokens
        if start < len(prompts):
            batches.append((start, len(prompts)))
        return batches

    def _generate(self, request: pb.GenerateRequest, *, keep_stop_token: bool = False) -> list[list[int]]:
        failures: Counter[str] = Counter()
        last = ""
        for attempt in range(1, self.max_attempts + 1):
            endpoint = self._acquire(failures)
            try:
                if failures[endpoint.address]:
                    # Every endpoint has failed this batch: give them time before trying again.
                    time.sleep(self._backoff.delay(attempt - 1))
                response = endpoint.stub.Generate(request, timeout=self.request_timeout_s)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
                last = f"{endpoint.address}: {code.name}: {details}"
                if code not in RETRYABLE:
                    raise GenerateError(f"Generate failed on {last}") from None
                failures[endpoint.address] += 1
                logger.warning("Generate attempt %d/%d failed on %s", attempt, self.max_attempts, last)
                continue
            finally:
                self._release(endpoint)
            return self._replies(
                response, request=request, address=endpoint.address, keep_stop_token=keep_stop_token
            )
        raise GenerateError(
            f"Generate failed {self.max_attempts} times over {', '.join(self.addresses)}; last: {last}"
        )

    def _acquire(self, failures: Counter[str]) -> _Endpoint:
        """The endpoint that failed this batch least often, then the least busy one."""
        with self._lock:
            endpoint = min(self._endpoints, key=lambda e: (failures[e.address], e.in_flight))
            endpoint.in_flight += 1
            return endpoint

    def _release(self, endpoint: _Endpoint) -> None:
        with self._lock:
            endpoint.in_flight -= 1

    @staticmethod
    def _replies(
        response: pb.GenerateResponse, *, request: pb.GenerateRequest, address: str, keep_stop_token: bool
    ) -> list[list[int]]:
        if len(response.completions) != len(request.prompts):
            raise GenerateError(
                f"{address} returned {len(response.completions)} completions "
                f"for {len(request.prompts)} prompts"
            )
        if keep_stop_token:
            return [list(c.token_ids) for c in response.completions]
        return [reply_tokens(c.token_ids, c.finish_reason) for c in response.completions]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        # Channels first: closing one cancels its calls in flight (after a failed batch, the
        # others need not run to their deadline), so the pool's threads end promptly.
        self._services.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> GenerateClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def reply_tokens(token_ids: Sequence[int], finish_reason: str) -> list[int]:
    """A completion's new tokens without the stop token that ended it: both backends keep it, and
    the chat template writes its own end of turn when the reply is rendered again."""
    ids = list(token_ids)
    return ids[:-1] if finish_reason == "stop" and ids else ids


class Generator(Protocol):
    """What prepare-data generates with: a `GenerateClient` or an `InProcessGenerator`."""

    info: pb.ServiceInfo
    batch_size: int  # prompts per call

    @property
    def addresses(self) -> list[str]: ...

    @property
    def max_length(self) -> int: ...

    @property
    def calls_in_flight(self) -> int: ...

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]: ...


def check_same_tokenizer(generator: Generator, *, model: str, tokenizer_fingerprint: str) -> None:
    """Refuse (`GenerateError`) a generator whose tokenizer or chat template differs from prepare-data's:
    its token ids would mean other text, and the "on-policy" data would be noise."""
    info = generator.info
    if info.tokenizer_sha256 != tokenizer_fingerprint:
        raise GenerateError(
            f"the service at {generator.addresses[0]} runs verifier {info.verifier_name_or_path!r} with "
            f"tokenizer/chat template fingerprint {info.tokenizer_sha256[:16]}, but prepare-data uses "
            f"--model {model!r} with fingerprint {tokenizer_fingerprint[:16]}; generate with a "
            "service running the same verifier as --model (or pass the service's model as --model)"
        )


def seeded_complete(
    generator: Generator,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    first_seed: int,
    stop_token_ids: Sequence[int],
) -> Complete:
    """A `Complete` on `generator`; seeds continue across calls, so no two sampled prompts share one."""
    sent = 0

    def complete(prompts: list[list[int]]) -> list[list[int]]:
        nonlocal sent
        seed, sent = first_seed + sent, sent + len(prompts)
        return generator.complete(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
        )

    return complete


def regenerator_for(
    client: Generator, config: PrepareDataConfig, *, tokenizer: Any, tokenizer_fingerprint: str
) -> Regenerator:
    """The `Regenerator` prepare-data runs with `--regenerate-with`, after checking the generator
    serves prepare-data's tokenizer (`check_same_tokenizer`). Raises `GenerateError`."""
    check_same_tokenizer(client, model=config.model, tokenizer_fingerprint=tokenizer_fingerprint)
    info = client.info
    max_new_tokens = config.regenerate_max_new_tokens
    # Past seq_length - 1 prompt tokens a reply would be truncated away entirely: stop there.
    max_prompt_tokens = min(client.max_length - max_new_tokens, config.seq_length - 1)
    if max_prompt_tokens < 1:
        raise GenerateError(
            f"--regenerate-max-new-tokens {max_new_tokens} leaves no room for a prompt in the service's max "
            f"length {client.max_length}; lower it or restart the service with a larger --max-length"
        )
    stop_token_ids = end_of_turn_ids(tokenizer)
    complete = seeded_complete(
        client,
        max_new_tokens=max_new_tokens,
        temperature=config.regenerate_temperature,
        top_p=config.regenerate_top_p,
        first_seed=config.seed,
        stop_token_ids=stop_token_ids,
    )
    return Regenerator(
        complete=complete,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        # Every call in flight twice over per round: the engines stay full until the round's tail.
        round_size=max(Regenerator.round_size, 2 * client.batch_size * client.calls_in_flight),
        description={
            "service": {
                "endpoints": client.addresses,
                "verifier_name_or_path": info.verifier_name_or_path,
                "backend": info.backend,
                "server_version": info.server_version,
                "tokenizer_sha256": info.tokenizer_sha256,
            },
            "params": {
                "max_new_tokens": max_new_tokens,
                "temperature": config.regenerate_temperature,
                "top_p": config.regenerate_top_p,
                "seed": config.seed,
                "stop_token_ids": stop_token_ids,
            },
        },
    )
