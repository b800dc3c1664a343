"""Run the hidden-state service in the foreground until SIGINT/SIGTERM.

    dflash serve-hidden-states MODEL --target-layer-ids 2 18 33 [--backend vllm] [-- <engine args>]
    python -m services.hidden_states.main --resolved-config JSON   # a config resolved by a parent

The second form is how a parent process starts the service (`LocalService`, `dflash
serve-hidden-states` handing over to vLLM's Python): the config arrives whole, no layer applied
again (`dflash_core.config_handover`).

Prints one line `hidden-state service ready on HOST:PORT` once it accepts calls (scripts and
tests wait for it; with `--port 0` it names the port picked). The payload side channel's port
(`--payload-port`, a free one by default) is logged and advertised by GetInfo.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from dflash_core.config import ServeHiddenStatesConfig
from dflash_core.config_handover import config_from_handover
from services.hidden_states.backends.base import SERVICE_DTYPES, Backend
from services.hidden_states.credentials import (
    CredentialsError,
    check_exposure,
    server_credentials,
    service_token,
)
from services.hidden_states.server import HiddenStateServer, ServiceAccess
from services.hidden_states.servicer import GenerateLimits

logger = logging.getLogger(__name__)

READY_LINE = "hidden-state service ready on"


def build_backend(config: ServeHiddenStatesConfig) -> Backend:
    dtype = SERVICE_DTYPES[config.dtype]
    if config.backend == "vllm":
        from services.hidden_states.backends.vllm_backend import VllmBackend

        return VllmBackend(
            config.model,
            target_layer_ids=config.target_layer_ids,
            dtype=dtype,
            max_length=config.max_length,
            max_batch_tokens=config.max_batch_tokens,
            engine_args=config.engine_args,
            generate_only=config.generate_only,
            engine_replicas=config.engine_replicas,
        )
    if config.engine_args:
        raise SystemExit(
            f"error: engine arguments after `--` ({' '.join(config.engine_args)}) are for --backend vllm"
        )
    from services.hidden_states.backends.transformers_backend import TransformersBackend

    return TransformersBackend.load(
        config.model,
        target_layer_ids=config.target_layer_ids,
        dtype=dtype,
        device=config.device,
        max_length=config.max_length,
        max_batch_tokens=config.max_batch_tokens,
        generate_only=config.generate_only,
    )


def access_of(config: ServeHiddenStatesConfig) -> ServiceAccess:
    """Token, TLS and reflection as configured; refuses an open port beyond loopback (before any
    model is loaded). Raises `CredentialsError`."""
    token = service_token(config.token_file)
    tls = (
        server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
        if config.tls_cert_file is not None and config.tls_key_file is not None
        else None
    )
    warning = check_exposure(config.host, token=token, tls=tls is not None, insecure=config.insecure)
    if warning:
        logger.warning("%s", warning)
    return ServiceAccess(token=token, tls=tls, reflection=config.reflection)


def serve(config: ServeHiddenStatesConfig) -> int:
    try:
        access = access_of(config)
    except CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's answer to a bad setting
        return 2
    backend = build_backend(config)
    server = HiddenStateServer(
        backend,
        host=config.host,
        port=config.port,
        max_frame_bytes=config.max_frame_bytes,
        max_streams=config.max_streams,
        max_pending_per_stream=config.max_pending_per_stream,
        generate_limits=GenerateLimits(config.max_generate_prompts, config.max_generate_tokens),
        max_pending_bytes=config.max_pending_bytes,
        stall_timeout_s=config.stall_timeout_s,
        # Hidden-state bytes are all the payload port carries: none to carry here.
        payload_port=0 if config.generate_only else config.payload_port,
        access=access,
    ).start()
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logger.info("signal %d: draining and stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"{READY_LINE} {server.address}", flush=True)  # noqa: T201 - the line scripts wait for
    stopping.wait()
    server.stop()
    logger.info("stopped after serving %d samples", server.scheduler.samples_served)
    return 0


def main(argv: list[str] | None = None) -> int:
    config = config_from_handover(ServeHiddenStatesConfig, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
