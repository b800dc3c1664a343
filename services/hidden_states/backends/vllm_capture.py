"""Worker-side half of the vllm backend: forward hooks inside vLLM's model runner.

Runs in the process that owns the model, reached only through `LLM.collective_rpc(name)` on the
methods `CaptureWorkerExtension` adds to vLLM's worker:

    dflash_install_capture(layer_ids)   hooks on the verifier, disarmed
    dflash_arm_capture()                start keeping rows (before an extraction's requests run)
    dflash_drain_capture()              stop; hand back the pieces per request and any failure
    dflash_remove_capture()             take the hooks out

Layer ids follow docs/architecture.md. Each request's rows are kept as pieces (first position,
token ids, planes); the caller checks every position arrived as sent. Hooks fire in eager mode only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dflash_core.capture import find_decoder_layers

logger = logging.getLogger(__name__)

# Where the capture state lives on the model runner (one per engine; the runner outlives us).
_STATE_ATTR = "_dflash_hidden_state_capture"

# A piece as handed back: [positions [n] int64, token ids [n] int64 (or None), planes [n, K, H]].
# Plain lists and tensors: returned as is in-process, pickled by vLLM from worker processes (TP).
Piece = list[Any]


@dataclass
class _Step:
    """What one forward is computing: who owns which rows."""

    req_ids: list[str]
    query_start_loc: np.ndarray  # [num_reqs + 1]: request i owns rows [qsl[i], qsl[i+1])
    positions: torch.Tensor  # [rows] on the model's device
    input_ids: torch.Tensor | None  # [rows]; None when the runner passes embeddings instead
    planes: dict[int, torch.Tensor] = field(default_factory=dict)


def _runner_batch_layout(runner: Any) -> tuple[list[str], np.ndarray]:
    """(request ids, query_start_loc) of the batch the runner is about to run.

    V1 model runner (vLLM's CPU runner, and the GPU one with VLLM_USE_V2_MODEL_RUNNER=0): the
    persistent `input_batch.req_ids` and the `query_start_loc` buffer filled by `_prepare_inputs`
    just before the forward. V2 runner (GPU default in 0.32): the per-step InputBatch that our
    wrapper around `prepare_inputs` stashed (see `_wrap_v2_prepare_inputs`).
    """
    stashed = getattr(runner, "_dflash_last_input_batch", None)
    if stashed is not None:
        return list(stashed.req_ids), np.asarray(stashed.query_start_loc_np[: stashed.num_reqs + 1])
    input_batch = runner.input_batch
    num_reqs = int(input_batch.num_reqs)
    return list(input_batch.req_ids[:num_reqs]), runner.query_start_loc.np[: num_reqs + 1].copy()


def _wrap_v2_prepare_inputs(runner: Any) -> None:
    """Model runner V2 builds its InputBatch per step inside `execute_model`; keep the latest.

    Set on the instance, so only this engine's runner changes. Untested here (V2 needs Triton,
    which the CPU build lacks); the backend asks for the V1 runner by default, and the caller's
    position/token check guards this path like the other.
    """
    original = runner.prepare_inputs

    def prepare_inputs(*args: Any, **kwargs: Any) -> Any:
        input_batch = original(*args, **kwargs)
        runner._dflash_last_input_batch = input_batch
        return input_batch

    runner.prepare_inputs = prepare_inputs
    runner._dflash_original_prepare_inputs = original


def _layer_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, residual) passed to a vLLM decoder layer `forward(positions, hidden, residual)`."""
    hidden = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
    residual = kwargs.get("residual", args[2] if len(args) > 2 else None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(
            f"{type(module).__name__}.forward does not take (positions, hidden_states, residual); "
            "the vllm backend supports Llama/Qwen-style vLLM models"
        )
    return hidden, residual


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    # A new tensor either way: the next fused add-norm overwrites `hidden` and `residual` in place.
    return hidden + residual if residual is not None else hidden.clone()


class WorkerCapture:
    """Hooks on one runner's model, and the pieces captured since the last drain."""

    def __init__(self, runner: Any, layer_ids: Sequence[int]) -> None:
        self.runner = runner
        self.layer_ids = [int(i) for i in layer_ids]
        self.armed = False
        self.pieces: dict[str, list[Piece]] = {}
        self.failure: str | None = None
        self._step: _Step | None = None
        self._handles: list[Any] = []
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        _, layers = find_decoder_layers(model)
        self.num_layers = len(layers)
        bad = [i for i in self.layer_ids if not 0 <= i <= self.num_layers]
        if bad:
            raise ValueError(f"layer ids {bad} are out of range for a {self.num_layers}-layer model")
        if not hasattr(runner, "input_batch") and hasattr(runner, "prepare_inputs"):
            _wrap_v2_prepare_inputs(runner)
        # The runner calls the model with keyword arguments (input_ids=, positions=, ...).
        self._handles.append(model.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        for layer_id in sorted(set(self.layer_ids)):
            if layer_id < self.num_layers:
                hook = self._make_pre_hook(layer_id)
                self._handles.append(layers[layer_id].register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(
                    layers[-1].register_forward_hook(self._last_layer_hook, with_kwargs=True)
                )
        self._handles.append(model.register_forward_hook(self._end_step, with_kwargs=True))

    # -- hooks ------------------------------------------------------------------------------
    # A hook that raised would abort vLLM's step and could leave the engine unusable, so each one
    # records its first failure instead and drops the forward; the drain reports it to the caller.

    def _fail(self, where: str, exc: Exception) -> None:
        if self.failure is None:
            self.failure = f"{where}: {type(exc).__name__}: {exc}"
        self._step = None

    def _begin_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._step = None
        if not self.armed:
            return
        try:
            positions = kwargs.get("positions")
            if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
                # M-RoPE models (Qwen2-VL, ...) pass [3, rows]; a text verifier passes [rows].
                raise TypeError(
                    f"{type(module).__name__} was called without 1-D positions=; the vllm backend "
                    "serves text decoder models only"
                )
            req_ids, query_start_loc = _runner_batch_layout(self.runner)
            input_ids = kwargs.get("input_ids")
            self._step = _Step(
                req_ids=req_ids,
                query_start_loc=query_start_loc,
                positions=positions,
                input_ids=input_ids if isinstance(input_ids, torch.Tensor) else None,
            )
        except Exception as exc:
            self._fail("reading the batch layout", exc)

    def _make_pre_hook(self, layer_id: int) -> Callable[[nn.Module, tuple, dict], None]:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._step is None:
                return
            try:
                self._step.planes[layer_id] = _stream(*_layer_inputs(module, args, kwargs))
            except Exception as exc:
                self._fail(f"capturing layer id {layer_id}", exc)

        return pre_hook

    def _last_layer_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._step is None:
            return
        if isinstance(output, tuple):
            hidden, residual = output[0], output[1] if len(output) > 1 else None
        else:
            hidden, residual = output, None
        self._step.planes[self.num_layers] = _stream(hidden, residual)

    def _end_step(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        try:
            self._keep(step)
        except Exception as exc:
            self._fail("splitting the forward's rows by request", exc)

    def _keep(self, step: _Step) -> None:
        missing = [i for i in self.layer_ids if i not in step.planes]
        if missing:
            raise RuntimeError(f"the hooks for layer ids {missing} did not run in this forward")
        rows = int(step.query_start_loc[-1])  # the runner may pad the batch beyond its real rows
        # One device-to-host copy per forward: [rows, K, H] in the model's dtype.
        planes = torch.stack([step.planes[i][:rows] for i in self.layer_ids], dim=1).to("cpu")
        # copy=True: positions and input ids are views of the runner's persistent buffers, which the
        # next forward overwrites; on CPU a plain `.to` would hand back those views.
        positions = step.positions[:rows].to("cpu", torch.int64, copy=True)
        tokens = None
        if step.input_ids is not None:
            tokens = step.input_ids[:rows].to("cpu", torch.int64, copy=True)
        for index, req_id in enumerate(step.req_ids):
            start, end = int(step.query_start_loc[index]), int(step.query_start_loc[index + 1])
            if end <= start:
                continue
            piece_tokens = tokens[start:end] if tokens is not None else None
            # A prompt chunk (chunked prefill), a whole prompt, or one decode token. Slices share
            # the step's tensors; they live until the caller drains them.
            self.pieces.setdefault(req_id, []).append([positions[start:end], piece_tokens, planes[start:end]])

    # -- control ------------------------------------------------------------------------------

    def drain(self) -> dict[str, Any]:
        """{"pieces": {request id: [piece, ...]}, "failure": first hook failure or None}; disarms."""
        drained = {"pieces": self.pieces, "failure": self.failure}
        self.pieces, self.failure = {}, None
        self.armed = False
        self._step = None
        return drained

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        original = getattr(self.runner, "_dflash_original_prepare_inputs", None)
        if original is not None:
            self.runner.prepare_inputs = original


# -- the worker side of LLM.collective_rpc ----------------------------------------------------------


def _is_capturing_rank() -> bool:
    """Only TP rank 0 captures: after each layer's all-reduce the stream is the same on every rank."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank() == 0


class CaptureWorkerExtension:
    """Mixed into vLLM's worker class (engine argument `worker_extension_cls`), so that
    `llm.collective_rpc("dflash_...")` reaches these methods by name on every worker.

    By name rather than by passing functions: vLLM refuses to serialize callables to an engine
    core in another process (VLLM_ENABLE_V1_MULTIPROCESSING=1) unless insecure pickling is turned
    on, while names and the plain lists and tensors returned travel through any of its transports.
    The `dflash_` prefix keeps clear of the worker's own attributes (vLLM asserts no clash).
    """

    model_runner: Any  # the worker's, once the mixin is in place

    def _dflash_capture(self) -> WorkerCapture | None:
        return getattr(self.model_runner, _STATE_ATTR, None)

    def dflash_install_capture(self, layer_ids: list[int]) -> bool:
        """Install the hooks (disarmed). True on the rank that captures."""
        self.dflash_remove_capture()
        if not _is_capturing_rank():
            return False
        setattr(self.model_runner, _STATE_ATTR, WorkerCapture(self.model_runner, layer_ids))
        return True

    def dflash_arm_capture(self) -> None:
        capture = self._dflash_capture()
        if capture is not None:
            capture.drain()  # drop anything left by an extraction that failed half way
            capture.armed = True

    def dflash_drain_capture(self) -> dict[str, Any]:
        """Disarm and return what was captured since arming (`WorkerCapture.drain`; nothing on
        ranks that do not capture)."""
        capture = self._dflash_capture()
        return capture.drain() if capture is not None else {"pieces": {}, "failure": None}

    def dflash_remove_capture(self) -> None:
        capture = self._dflash_capture()
        if capture is not None:
            capture.remove()
            setattr(self.model_runner, _STATE_ATTR, None)
