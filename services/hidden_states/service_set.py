"""One client's view of a set of hidden-state endpoints: what each serves, and that they agree.

    services = ServiceSet(["10.0.0.5:8000", "10.0.0.6:8000"])
    info = services.connect(timeout_s=60.0, others_grace_s=10.0)  # GetInfo, retried; same verifier
    ...
    services.admit(late_endpoint, layer_ids=[2, 18, 33, 36])      # one that came up afterwards
    services.close()

Invariants:
- Every endpoint with an `info` serves the same verifier (fingerprint) as every other one:
  `connect` refuses a set that disagrees and `admit` refuses a late endpoint that does.
- A missing or refused token (UNAUTHENTICATED, PERMISSION_DENIED) fails at once: waiting does
  not fix it. Every other GetInfo failure is retried until the deadline.
- Errors are `HiddenStateServiceError` and name the endpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc

from dflash_core.verifier import VerifierFingerprint
from dflash_core.wire.identity import fingerprint_from_info
from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import open_channel, parse_endpoint

logger = logging.getLogger(__name__)

# Answers that mean the token is missing or wrong: no retry helps.
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# Longest single GetInfo while retrying, and the pause between rounds.
_GET_INFO_TIMEOUT_S, _RETRY_PAUSE_S = 5.0, 0.5


class HiddenStateServiceError(RuntimeError):
    """The service cannot deliver: a configuration mismatch, a rejected sample, or nobody answers."""


@dataclass(eq=False)
class ServiceEndpoint:
    """One endpoint of the set: its `host:port`, its channel, and its ServiceInfo once it answered."""

    address: str
    channel: grpc.Channel
    info: pb.ServiceInfo | None = None


class ServiceSet:
    """Channels to the given endpoints (in order, repeats kept) and what each of them serves."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise ValueError("no hidden-state endpoint given")
        addresses = [parse_endpoint(e) for e in endpoints]  # all parsed before any channel opens
        self.endpoints = [ServiceEndpoint(address=a, channel=open_channel(a)) for a in addresses]

    @property
    def info(self) -> pb.ServiceInfo:
        """The ServiceInfo of the first endpoint that answered (all that answered serve the same)."""
        info = next((e.info for e in self.endpoints if e.info is not None), None)
        if info is None:
            raise HiddenStateServiceError("no hidden-state endpoint has answered GetInfo yet")
        return info

    @property
    def infos(self) -> dict[str, pb.ServiceInfo]:
        """ServiceInfo by address, of the endpoints that answered."""
        return {e.address: e.info for e in self.endpoints if e.info is not None}

    @property
    def fingerprint(self) -> VerifierFingerprint:
        return fingerprint_from_info(self.info)

    def connect(self, *, timeout_s: float, others_grace_s: float | None = None) -> pb.ServiceInfo:
        """GetInfo from the endpoints, retried until `timeout_s`; returns `info`.

        `others_grace_s` None: every endpoint must answer within `timeout_s`. A number: once one
        answered, the others get that much longer (within `timeout_s`); those still silent then
        are logged and left for `admit`. Raises `HiddenStateServiceError` when too few answer, a
        token is refused, or the endpoints that answered serve different verifiers.
        """
        deadline = time.monotonic() + timeout_s
        errors: dict[str, str] = {}
        first_answer: float | None = None
        while True:
            for endpoint in self.endpoints:
                if endpoint.info is None:
                    remaining = max(deadline - time.monotonic(), 0.1)
                    self._try_get_info(endpoint, timeout_s=min(_GET_INFO_TIMEOUT_S, remaining), errors=errors)
            now = time.monotonic()
            silent = [e.address for e in self.endpoints if e.info is None]
            if not silent:
                break
            if others_grace_s is not None and len(silent) < len(self.endpoints):
                first_answer = now if first_answer is None else first_answer
                if now - first_answer >= others_grace_s or now >= deadline:
                    break  # the rest join through `admit` when they come up
            if now >= deadline:
                raise HiddenStateServiceError(
                    f"{', '.join(silent)} did not answer GetInfo within {timeout_s:g} s ("
                    + "; ".join(f"{a}: {errors.get(a, 'no answer')}" for a in dict.fromkeys(silent))
                    + "); is `dflash serve-hidden-states` running there?"
                )
            time.sleep(_RETRY_PAUSE_S)
        self._check_same_verifier()
        for address in silent:
            logger.warning("hidden-state endpoint %s is not answering yet (%s)", address, errors.get(address))
        return self.info

    def admit(self, endpoint: ServiceEndpoint, *, layer_ids: Sequence[int], timeout_s: float = 10.0) -> None:
        """Take in an endpoint that was silent at `connect`: it must serve the set's verifier and
        every one of `layer_ids`. Raises `grpc.RpcError` while it does not answer (retry later),
        `HiddenStateServiceError` when it serves something else (no retry fixes that)."""
        info = pb_grpc.HiddenStatesStub(endpoint.channel).GetInfo(pb.GetInfoRequest(), timeout=timeout_s)
        problems = self.fingerprint.mismatches(
            fingerprint_from_info(info), this_side="other endpoints", other_side=endpoint.address
        )
        missing = [i for i in layer_ids if i not in info.layer_ids]
        if problems or missing:
            detail = problems + ([f"layer ids {missing} are not served"] if missing else [])
            raise HiddenStateServiceError(
                f"{endpoint.address} serves something else:\n  " + "\n  ".join(detail)
            )
        endpoint.info = info

    def close(self) -> None:
        """Close every channel; calls in flight on them are cancelled."""
        for endpoint in self.endpoints:
            endpoint.channel.close()

    def __enter__(self) -> ServiceSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def _try_get_info(endpoint: ServiceEndpoint, *, timeout_s: float, errors: dict[str, str]) -> None:
        """Set `endpoint.info`, or record why not in `errors`; a refused token raises at once."""
        try:
            endpoint.info = pb_grpc.HiddenStatesStub(endpoint.channel).GetInfo(
                pb.GetInfoRequest(), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            if exc.code() in _REFUSED:
                raise HiddenStateServiceError(
                    f"{endpoint.address}: {exc.details()} ({exc.code().name})"
                ) from None
            errors[endpoint.address] = f"{exc.code().name}: {exc.details()}"

    def _check_same_verifier(self) -> None:
        answered = [(e.address, fingerprint_from_info(e.info)) for e in self.endpoints if e.info is not None]
        first, fingerprint = answered[0]
        for other, other_fingerprint in answered[1:]:
            problems = fingerprint.mismatches(other_fingerprint, this_side=first, other_side=other)
            if problems:
                raise HiddenStateServiceError(
                    f"the hidden-state endpoints serve different verifiers ({first} vs {other}):\n  "
                    + "\n  ".join(problems)
                )


def query_service_info(endpoints: Sequence[str], *, timeout_s: float = 60.0) -> pb.ServiceInfo:
    """GetInfo of the first endpoint that answers (to learn what a service serves before using it)."""
    with ServiceSet(endpoints) as services:
        return services.connect(timeout_s=timeout_s, others_grace_s=0.0)
