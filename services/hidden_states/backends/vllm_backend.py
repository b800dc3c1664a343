"""The `vllm` backend: the verifier inside a vLLM engine, for GPU deployments (vLLM's CPU build too).

Extract: forward hooks (`vllm_capture`, mixed into vLLM's worker with `worker_extension_cls` and
reached with `LLM.collective_rpc`) keep each forward's rows at the served layer ids
(docs/architecture.md) while the sequences run as `max_tokens=1` requests. Chunked-prefill pieces
are put back together by position, and every position of every sequence must arrive with the token
id that was sent, or the call fails naming the sequence. The engine runs eager with prefix caching
off; only TP rank 0 captures (after each layer's all-reduce every rank holds the same stream).

Generation only (`--generate-only`): no hooks and Extract is refused; the engine runs as `vllm serve`
would, prompts join its running batch through a `GenerationStream`, and `engine_replicas` engines
share the device behind one `ReplicatedGenerationStream`.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dflash_core.verifier import (
    default_target_layer_ids,
    fingerprint_of,
    load_tokenizer,
    load_verifier_config,
    transformers_folder,
    validate_target_layer_ids,
)
from services.hidden_states.backends.base import (
    BackendInfo,
    GeneratedSequence,
    GenerationParams,
    per_prompt_params,
    served_layer_ids,
)
from services.hidden_states.backends.replicated_stream import ReplicatedGenerationStream
from services.hidden_states.backends.vllm_capture import CaptureWorkerExtension

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from vllm import LLM, SamplingParams

logger = logging.getLogger(__name__)

_EXTENSION = f"{CaptureWorkerExtension.__module__}.{CaptureWorkerExtension.__qualname__}"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# Sequences a generation-only engine runs at once (vLLM's own default is 256 on GPU): small
# verifiers decode far faster per token in batches this big, and the KV cache of a 135M-8B model
# holds them at regeneration lengths. Capped by max_num_batched_tokens, which vLLM requires.
GENERATE_ONLY_MAX_NUM_SEQS = 1024


# --------------------------------------------------------------------------------------------
# Engine arguments
# --------------------------------------------------------------------------------------------


def parse_engine_args(engine_args: Sequence[str]) -> dict[str, Any]:
    """vLLM CLI flags (`--tensor-parallel-size 2 --gpu-memory-utilization 0.9`) as `LLM` kwargs.

    Parsed by vLLM's own `EngineArgs` parser, so every flag of `vllm serve` is accepted with its
    own types and spellings; only flags whose value differs from vLLM's default are returned.
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="engine arguments after `--`"))
    defaults = vars(parser.parse_args([]))
    try:
        given = vars(parser.parse_args(list(engine_args)))
    except SystemExit as exc:  # argparse has printed why to stderr
        raise ValueError(
            f"vLLM refused the engine arguments {' '.join(engine_args)!r} (its message is above)"
        ) from exc
    return {name: value for name, value in given.items() if defaults.get(name) != value}


def check_engine_kwargs(kwargs: dict[str, Any], *, max_length: int, generate_only: bool = False) -> None:
    """Refuse engine flags that would break capture or that the service owns; messages say what to do.

    A generation-only engine captures nothing, so only the flags the service owns are refused."""
    if "model" in kwargs:
        raise ValueError("drop --model from the engine arguments: the model is the service's MODEL argument")
    if "dtype" in kwargs:
        raise ValueError("drop --dtype from the engine arguments: use the service's own --dtype")
    if int(kwargs.get("data_parallel_size", 1)) > 1:
        raise ValueError(
            f"--data-parallel-size {kwargs['data_parallel_size']}: one hidden-state service drives one "
            "engine. Run one service per GPU group (e.g. CUDA_VISIBLE_DEVICES=0,1 and =2,3, each with "
            "its own --port) and give the trainer every address (--vllm-endpoint a --vllm-endpoint b)"
        )
    max_model_len = kwargs.get("max_model_len")
    if max_model_len is not None and int(max_model_len) <= max_length:
        raise ValueError(
            f"--max-model-len {max_model_len} must exceed --max-length {max_length} (an extraction "
            f"runs the whole sequence plus one sampled token): raise it or pass --max-length "
            f"{int(max_model_len) - 1}"
        )
    if generate_only:
        return
    if "worker_extension_cls" in kwargs:
        raise ValueError(
            "drop --worker-extension-cls from the engine arguments: the vllm backend installs its own "
            f"({_EXTENSION}) to reach the capture hooks"
        )
    if int(kwargs.get("pipeline_parallel_size", 1)) > 1:
        raise ValueError(
            f"--pipeline-parallel-size {kwargs['pipeline_parallel_size']}: the vllm backend captures "
            "hidden states on one pipeline stage only; use --tensor-parallel-size to spread the verifier"
        )
    if kwargs.get("enforce_eager") is False:
        raise ValueError(
            "--no-enforce-eager: the capture hooks only run in eager mode (compiled graphs skip them); "
            "a service started with --generate-only runs compiled"
        )
    if kwargs.get("enable_prefix_caching"):
        raise ValueError(
            "--enable-prefix-caching: cached prompt prefixes are never recomputed, so their hidden "
            "states would be missing; leave prefix caching off (--generate-only turns it on)"
        )


def _position_limit(config: PretrainedConfig) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if limit else None


def _eos_token_ids(name_or_path: str, config: PretrainedConfig, tokenizer: Any) -> tuple[int, ...]:
    """The ids generation stops at, found the way the transformers backend finds them."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        generation = GenerationConfig.from_model_config(config)
    eos = generation.eos_token_id
    ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = (int(tokenizer.eos_token_id),)
    return tuple(int(i) for i in ids)


# --------------------------------------------------------------------------------------------
# Rows back into sequences
# --------------------------------------------------------------------------------------------


def assemble_rows(
    pieces: Sequence[list[Any]],
    seq: torch.Tensor,
    *,
    width: int,
    hidden: int,
    dtype: torch.dtype,
    label: str,
) -> torch.Tensor:
    """[t, width, hidden] for token sequence `seq` ([t] int64, CPU) from the pieces captured for
    its request (`vllm_capture.Piece`: positions, token ids, planes), checked position by position.

    Raises RuntimeError naming `label` when a row was computed for another token id (the request
    layout was misread) or when a position never arrived.
    """
    length = seq.numel()
    out = torch.empty(length, width, hidden, dtype=dtype)
    covered = torch.zeros(length, dtype=torch.bool)
    for positions, piece_tokens, planes in pieces:
        if planes.shape[1:] != (width, hidden):
            raise RuntimeError(
                f"{label}: captured planes of shape {tuple(planes.shape[1:])}, expected {(width, hidden)}"
            )
        # Rows at position >= t are decode steps scheduled after the prompt (asynchronous
        # scheduling may run one before it learns the request is done): not ours to return.
        keep = positions < length
        where = positions[keep]
        if where.numel() == 0:
            continue
        if piece_tokens is not None and not torch.equal(piece_tokens[keep], seq[where]):
            raise RuntimeError(
                f"{label}: the rows captured at positions {where.min().item()}..{where.max().item()} "
                "were computed for other token ids; the runner's request layout was misread"
            )
        # A request preempted and recomputed arrives twice for the same positions; the rows
        # agree, and the later one wins.
        out[where] = planes[keep].to(dtype)
        covered[where] = True
    if not bool(covered.all()):
        missing = (~covered).nonzero().flatten()
        raise RuntimeError(
            f"{label}: rows for {missing.numel()} of {length} positions never arrived (first missing "
            f"position {missing[0].item()}). Prefix caching or a compiled (non-eager) engine would do this"
        )
    return out


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------


class VllmBackend:
    def __init__(
        self,
        model_name_or_path: str,
        *,
        target_layer_ids: Sequence[int] | None,
        dtype: torch.dtype,
        max_length: int,
        max_batch_tokens: int,
        engine_args: list[str],
        generate_only: bool = False,
        engine_replicas: int = 1,
    ) -> None:
        """`generate_only`: no capture, the engine configured for serving (see the module's
        docstring); `extract` then raises. `engine_replicas` engines (generation only) share the
        device(s) and --gpu-memory-utilization; prompts go to the least loaded."""
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype} is not one of {sorted(_DTYPE_NAMES.values())}")
        if engine_replicas < 1 or (engine_replicas > 1 and not generate_only):
            raise ValueError(f"--engine-replicas {engine_replicas}: several engines need --generate-only")
        if not generate_only:
            # The engine core in this process: the drain call is then a plain call (no copy), and
            # start-up takes seconds, not half a minute. Required, not just faster: an engine core in
            # another process returns collective_rpc results through msgpack, which hands tensors back
            # as untyped lists unless VLLM_ALLOW_INSECURE_SERIALIZATION turns pickle on. Worker
            # processes (tensor parallel) still work: their replies travel by pickle inside vLLM.
            # Generation only needs none of it: vLLM's default (an engine-core process, which keeps
            # stepping while this one turns outputs into replies) is left alone there.
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
                logger.warning(
                    "vllm backend: overriding VLLM_ENABLE_V1_MULTIPROCESSING=1 (needs the engine in-process)"
                )
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            # The model runner whose batch layout the hooks read, as verified here (vLLM's CPU build
            # has only V1). Model runner V2, the GPU default in 0.32 when Triton is present, has a shim
            # in vllm_capture that no test here reaches; the position/token check guards it as well.
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from vllm import LLM

        config = load_verifier_config(model_name_or_path)
        tokenizer = load_tokenizer(model_name_or_path)
        # Equal to what the transformers backend reports for the same folder (the identity check).
        fingerprint = fingerprint_of(config, tokenizer, name_or_path=model_name_or_path)
        ids = list(target_layer_ids or default_target_layer_ids(fingerprint.num_layers))
        validate_target_layer_ids(ids, fingerprint.num_layers)
        layer_ids = served_layer_ids(ids, fingerprint.num_layers)

        user = parse_engine_args(engine_args)
        check_engine_kwargs(user, max_length=max_length, generate_only=generate_only)
        limit = _position_limit(config)
        max_model_len = max_length + 1  # the sequence plus the one token an extraction samples
        if limit is not None and "max_model_len" not in user and max_model_len > limit:
            logger.warning(
                "--max-length %d needs max_model_len %d, beyond the verifier's %d positions; serving "
                "sequences of up to %d tokens",
                max_length,
                max_model_len,
                limit,
                limit - 1,
            )
            max_model_len = limit
        kwargs: dict[str, Any] = {
            # vLLM reads neither `embedded:` nor a bare GGUF's tokenizer: their converted folder.
            "model": transformers_folder(model_name_or_path),
            "dtype": _DTYPE_NAMES[dtype],
            "max_model_len": max_model_len,
            # One forward holds at most this many tokens; longer prompts are chunked by vLLM.
            "max_num_batched_tokens": max_batch_tokens,
        }
        if generate_only:
            # Serving settings: compiled forwards and CUDA graphs (vLLM's default, enforce_eager
            # unset), shared prefixes computed once (multi-turn regeneration and self-prompting
            # send long shared prefixes), and big batches. Engine flags after `--` still win.
            kwargs["enable_prefix_caching"] = True
            kwargs["max_num_seqs"] = min(GENERATE_ONLY_MAX_NUM_SEQS, max_batch_tokens)
        else:
            # Hooks do not run inside compiled graphs (torch.compile, CUDA graphs skip the Python
            # modules), so capture is eager; vLLM's fused custom ops still run, only inductor's extra
            # fusion is lost, which matters little for prefill-only batches. vLLM's own
            # `extract_hidden_states` method is CUDA-only and writes a safetensors file per request
            # through a KV connector; hooks work on every platform and hand tensors over in memory. A
            # compiled path would be the EAGLE-3 aux outputs (`set_aux_hidden_state_layers`) carried
            # out by an in-memory KV connector of our own.
            kwargs["enforce_eager"] = True
            kwargs["enable_prefix_caching"] = False  # every prompt token must be computed
            kwargs["worker_extension_cls"] = _EXTENSION  # the dflash_* capture calls on every worker
        world = int(user.get("tensor_parallel_size", 1)) * int(user.get("pipeline_parallel_size", 1))
        if world == 1:
            kwargs["distributed_executor_backend"] = "uni"  # the worker in this process too
        kwargs.update(user)
        if engine_replicas > 1:
            # A small verifier's engine is bound by the one CPU core of its engine-core process;
            # engines side by side add up until the GPU is busy (docs/benchmarks.md, "vLLM's engine
            # alone"). The memory share is of the whole device, so N engines split what one would take.
            from vllm.engine.arg_utils import EngineArgs

            share = float(user.get("gpu_memory_utilization", EngineArgs.gpu_memory_utilization))
            kwargs["gpu_memory_utilization"] = share / engine_replicas
        logger.info("vllm backend: starting %d engine(s) with %s", engine_replicas, kwargs)
        # One after another: each engine sizes its KV cache from the memory the earlier ones left.
        self._llms: list[LLM] = []
        try:
            for _ in range(engine_replicas):
                self._llms.append(LLM(**kwargs))
        except BaseException:
            for llm in self._llms:
                llm.llm_engine.engine_core.shutdown()
            raise
        self.llm: LLM | None = self._llms[0]  # extraction and the non-streamed generate run here

        self.generation_stream: VllmGenerationStream | ReplicatedGenerationStream | None = None
        if not generate_only:
            capturing = self.llm.collective_rpc("dflash_install_capture", args=(list(layer_ids),))
            if not any(capturing):
                raise RuntimeError("no vLLM worker installed the capture hooks (is TP rank 0 missing?)")
        served_max_length = min(max_length, int(self.llm.llm_engine.model_config.max_model_len) - 1)
        self._info = BackendInfo(
            name="vllm",
            fingerprint=fingerprint,
            layer_ids=layer_ids,
            dtype=dtype,
            max_length=served_max_length,
            max_batch_tokens=int(kwargs["max_num_batched_tokens"]),
            eos_token_ids=_eos_token_ids(model_name_or_path, config, tokenizer),
            generate_only=generate_only,
            engine_replicas=engine_replicas,
        )
        if generate_only:
            eos = self._info.eos_token_ids
            streams = [VllmGenerationStream(llm, eos_token_ids=eos) for llm in self._llms]
            self.generation_stream = streams[0] if len(streams) == 1 else ReplicatedGenerationStream(streams)
        self._request_numbers = itertools.count()
        logger.info(
            "vllm backend: %s in %s, %s, sequences up to %d tokens",
            model_name_or_path,
            self._info.dtype,
            "generation only" if generate_only else f"serving layer ids {list(layer_ids)}",
            served_max_length,
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    def _engine(self) -> LLM:
        if self.llm is None:
            raise RuntimeError("the vllm backend is closed")
        return self.llm

    # -- extraction ------------------------------------------------------------------------------

    def extract(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        llm = self._engine()
        if self._info.generate_only:
            raise RuntimeError("this vllm backend was started for generation only (--generate-only)")
        width, hidden = len(self._info.layer_ids), self._info.fingerprint.hidden_size
        tokens = [s.detach().to("cpu", torch.int64).reshape(-1) for s in sequences]
        for index, seq in enumerate(tokens):
            if seq.numel() > self._info.max_length:
                raise ValueError(
                    f"sequence {index} has {seq.numel()} tokens; this service takes at most "
                    f"{self._info.max_length} (--max-length)"
                )
        results: list[torch.Tensor | None] = [None] * len(tokens)
        for index, seq in enumerate(tokens):
            if seq.numel() == 0:  # vLLM refuses empty prompts; nothing to compute anyway
                results[index] = torch.empty(0, width, hidden, dtype=self._info.dtype)
        work = [index for index, seq in enumerate(tokens) if seq.numel() > 0]
        if not work:
            return results  # type: ignore[return-value]

        # Greedy, one token: the sampled token is never run through the model again.
        params = SamplingParams(
            max_tokens=1, temperature=0.0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )
        engine = llm.llm_engine
        llm.collective_rpc("dflash_arm_capture")
        request_ids: list[str] = []
        try:
            for index in work:
                # add_request returns vLLM's internal id (ours plus a random suffix), the id the
                # model runner, and so the hooks, see.
                request_ids.append(
                    engine.add_request(
                        f"dflash-extract-{next(self._request_numbers)}",
                        {"prompt_token_ids": tokens[index].tolist()},
                        params,
                    )
                )
            while engine.has_unfinished_requests():
                engine.step()
        except BaseException:
            # Leave no half-run request behind to be stepped (and captured) by the next call.
            if request_ids:
                try:
                    engine.abort_request(request_ids, internal=True)
                except Exception:
                    logger.exception("vllm backend: aborting the failed extraction's requests failed")
            raise
        finally:
            pieces: dict[str, list[list[Any]]] = {}
            failures = []
            for drained in llm.collective_rpc("dflash_drain_capture"):
                for request_id, rank_list in drained["pieces"].items():
                    pieces.setdefault(request_id, []).extend(rank_list)
                if drained["failure"]:
                    failures.append(drained["failure"])
        if failures:
            raise RuntimeError(f"hidden-state capture failed inside vLLM while {failures[0]}")
        for index, request_id in zip(work, request_ids, strict=True):
            results[index] = assemble_rows(
                pieces.get(request_id, []),
                tokens[index],
                width=width,
                hidden=hidden,
                dtype=self._info.dtype,
                label=f"sequence {index} (vLLM request {request_id})",
            )
        return results  # type: ignore[return-value]

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[list[int]], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[GeneratedSequence]:
        llm = self._engine()
        if not prompts:
            return []
        limit = int(llm.llm_engine.model_config.max_model_len)
        for index, prompt in enumerate(prompts):
            _check_prompt(prompt, limit=limit, label=f"prompt {index}")
        own = per_prompt_params(params, len(prompts))
        results = [GeneratedSequence(token_ids=[], finish_reason="length") for _ in prompts]
        work = [i for i, p in enumerate(own) if p.max_new_tokens > 0]
        if not work:
            return results
        outputs = llm.generate(
            [{"prompt_token_ids": list(prompts[i])} for i in work],
            [sampling_params(own[i], eos_token_ids=self._info.eos_token_ids) for i in work],
            use_tqdm=False,
        )
        for index, output in zip(work, outputs, strict=True):
            results[index] = _completion(output)
        return results

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        if isinstance(self.generation_stream, ReplicatedGenerationStream):
            self.generation_stream.close()
        try:
            if not self._info.generate_only:
                llm.collective_rpc("dflash_remove_capture")
        finally:
            for engine in self._llms:
                engine.llm_engine.engine_core.shutdown()


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def sampling_params(params: GenerationParams, *, eos_token_ids: Sequence[int]) -> SamplingParams:
    """vLLM's SamplingParams for one prompt (its own seed, as given), only the final output kept."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampling = params.temperature > 0
    return SamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature if sampling else 0.0,
        top_p=params.top_p if sampling else 1.0,
        top_k=params.top_k if sampling else 0,  # 0 = off in both conventions
        seed=params.seed if sampling else None,
        stop_token_ids=sorted({*eos_token_ids, *params.stop_token_ids}),
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _check_prompt(prompt: Sequence[int], *, limit: int, label: str) -> None:
    if not prompt or len(prompt) >= limit:
        raise ValueError(
            f"{label} has {len(prompt)} tokens; generation takes 1..{limit - 1} (max_model_len {limit})"
        )


def _completion(output: Any) -> GeneratedSequence:
    completion = output.outputs[0]
    # vLLM keeps the stop token in token_ids and reports "stop" for eos and stop ids alike;
    # running into max_model_len is "length", as is max_tokens.
    finish = "stop" if completion.finish_reason == "stop" else "length"
    return GeneratedSequence(token_ids=list(completion.token_ids), finish_reason=finish)


class VllmGenerationStream:
    """The engine's own loop, driven from the scheduler's worker (`base.GenerationStream`).

    `LLM.generate` adds its prompts and steps the engine until all of them finish, so prompts that
    arrive meanwhile wait for the slowest reply of the batch, and the batch thins out towards its
    end. Here prompts are added to the engine whenever a Generate call brings them and each step
    hands back whatever finished: the engine keeps up to max_num_seqs sequences running for as long
    as there is work. Outputs carry the id we gave (`add_request` returns vLLM's internal one, with
    a random suffix, which aborts need).
    """

    def __init__(self, llm: LLM, *, eos_token_ids: Sequence[int] = ()) -> None:
        self._llm = llm
        self._internal_ids: dict[str, str] = {}  # our key -> vLLM's internal request id
        self.eos_token_ids = tuple(eos_token_ids)

    @property
    def unfinished(self) -> int:
        return len(self._internal_ids)

    def check(self, prompt: list[int], params: GenerationParams) -> None:
        _check_prompt(prompt, limit=int(self._llm.llm_engine.model_config.max_model_len), label="the prompt")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {params.max_new_tokens} must be >= 1")

    def add(self, key: str, prompt: list[int], params: GenerationParams) -> None:
        self.check(prompt, params)
        engine = self._llm.llm_engine
        internal = engine.add_request(
            key, {"prompt_token_ids": list(prompt)}, sampling_params(params, eos_token_ids=self.eos_token_ids)
        )
        self._internal_ids[key] = internal if isinstance(internal, str) else key

    def step(self) -> list[tuple[str, GeneratedSequence]]:
        if not self._internal_ids:
            return []
        engine = self._llm.llm_engine
        if not engine.has_unfinished_requests():
            # Stepping an idle engine waits for outputs that never come (engine-core process).
            lost, self._internal_ids = len(self._internal_ids), {}
            raise RuntimeError(f"vLLM holds none of the {lost} prompts still expected to finish")
        finished = []
        for output in engine.step():
            if output.finished and self._internal_ids.pop(output.request_id, None) is not None:
                finished.append((output.request_id, _completion(output)))
        return finished

    def abort(self, keys: Sequence[str]) -> None:
        internal = [self._internal_ids.pop(key) for key in keys if key in self._internal_ids]
        if not internal:
            return
        engine = self._llm.llm_engine
        try:
            engine.abort_request(internal, internal=True)
        except TypeError:  # a vLLM whose ids are ours as given: no `internal` keyword
            engine.abort_request(internal)
