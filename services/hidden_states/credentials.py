"""Who may talk to the hidden-state service: its shared-secret token and TLS material, both ends.

Server: `TokenInterceptor` refuses every RPC but health checks with UNAUTHENTICATED unless the call
carries `authorization: Bearer <token>`; the token comes from `--token-file` or
$DFLASH_SERVICE_TOKEN, never from a flag's value (flags show up in `ps` and shell histories).
`server_credentials` makes the port TLS (client certificates required when a client CA is given).
`check_exposure` refuses to listen beyond loopback with no token unless `--insecure` says so.

Client: `client_credentials()` reads the same token ($DFLASH_SERVICE_TOKEN or the file named by
$DFLASH_SERVICE_TOKEN_FILE) and the TLS files ($DFLASH_SERVICE_CA_FILE, and
$DFLASH_SERVICE_CLIENT_CERT_FILE / $DFLASH_SERVICE_CLIENT_KEY_FILE for client certificates), so
every client (trainer, prepare-data, control plane, healthcheck) reaches a secured service the
same way, without a flag of its own.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.hidden_states.token_file import CredentialsError, read_token_file

TOKEN_ENV = "DFLASH_SERVICE_TOKEN"
TOKEN_FILE_ENV = "DFLASH_SERVICE_TOKEN_FILE"
CA_FILE_ENV = "DFLASH_SERVICE_CA_FILE"
CLIENT_CERT_ENV = "DFLASH_SERVICE_CLIENT_CERT_FILE"
CLIENT_KEY_ENV = "DFLASH_SERVICE_CLIENT_KEY_FILE"
CREDENTIAL_ENVS = (TOKEN_ENV, TOKEN_FILE_ENV, CA_FILE_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV)
_METADATA_KEY = "authorization"
_OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"  # load balancers and orchestrators probe without secrets


# ---------------------------------------------------------------------------- the token


def _service_token_file(path: Path, name: str) -> str:
    token = read_token_file(path, name=name)
    if any(c.isspace() or not c.isprintable() for c in token):
        raise CredentialsError(f"the token in {path} holds spaces or control characters (one word, one line)")
    return token


def service_token(token_file: Path | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The shared secret: `token_file`, else $DFLASH_SERVICE_TOKEN, else $DFLASH_SERVICE_TOKEN_FILE."""
    env = os.environ if environ is None else environ
    if token_file is not None:
        return _service_token_file(token_file, "--token-file")
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    if env.get(TOKEN_FILE_ENV):
        return _service_token_file(Path(env[TOKEN_FILE_ENV]), f"${TOKEN_FILE_ENV}")
    return None


class TokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for a call without the token; health checks pass."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        if method.startswith(_OPEN_METHOD_PREFIX) or self._allowed(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return _refusal(handler) if handler is not None else None

    def _allowed(self, metadata: Any) -> bool:
        given = [value for key, value in metadata or () if key == _METADATA_KEY]
        if len(given) != 1:
            return False
        value = given[0].encode() if isinstance(given[0], str) else bytes(given[0])
        return hmac.compare_digest(value, self._expected)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call before reading any request."""

    def refuse(_request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "this hidden-state service needs its token: set $DFLASH_SERVICE_TOKEN (or "
            "$DFLASH_SERVICE_TOKEN_FILE) to the service's --token-file content",
        )

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


# ---------------------------------------------------------------------------- TLS


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """TLS for the gRPC port; with `client_ca_file`, clients must show a certificate it signed."""
    pair = (_read(key_file, "TLS key"), _read(cert_file, "TLS certificate"))
    client_ca = _read(client_ca_file, "client CA") if client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: assume it is reachable from elsewhere


def check_exposure(host: str, *, token: str | None, tls: bool, insecure: bool) -> str | None:
    """Refuse a port others can reach with no token, unless `insecure`; the warning to log, if any."""
    if is_loopback(host) or token is not None:
        if token is not None and not tls and not is_loopback(host):
            return (
                f"serving on {host} without TLS: the token and the hidden states cross the network in "
                "clear text (--tls-cert-file/--tls-key-file encrypt the gRPC port)"
            )
        return None
    if not insecure:
        raise CredentialsError(
            f"--host {host} lets other machines run the verifier on this GPU and read every stream, and "
            "no token is set: give one with --token-file FILE (or $DFLASH_SERVICE_TOKEN; clients set the "
            "same variable), or pass --insecure to serve anyone who can reach the port"
        )
    return (
        f"--insecure: anyone who reaches {host} can run forwards and Generate on this verifier and take "
        "every stream slot; set --token-file to close it"
    )


# ---------------------------------------------------------------------------- the client side


@dataclass(frozen=True)
class ClientCredentials:
    token: str | None = None
    channel_credentials: grpc.ChannelCredentials | None = None  # None: plaintext


def client_credentials(environ: Mapping[str, str] | None = None) -> ClientCredentials:
    """What a client presents, from the environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    token = service_token(environ=env)
    ca, cert, key = env.get(CA_FILE_ENV), env.get(CLIENT_CERT_ENV), env.get(CLIENT_KEY_ENV)
    if bool(cert) != bool(key):
        raise CredentialsError(f"${CLIENT_CERT_ENV} and ${CLIENT_KEY_ENV} go together: set both or neither")
    if not ca and not cert:
        return ClientCredentials(token=token)
    tls = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA file") if ca else None,
        private_key=_read(key, "client key") if key else None,
        certificate_chain=_read(cert, "client certificate") if cert else None,
    )
    return ClientCredentials(token=token, channel_credentials=tls)


class _TokenMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of the channel it wraps."""

    def __init__(self, token: str) -> None:
        self._pair = (_METADATA_KEY, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return _CallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=[*(details.metadata or ()), self._pair],
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
            compression=details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def secure_channel(
    address: str, options: list[tuple[str, Any]], credentials: ClientCredentials
) -> grpc.Channel:
    """A channel to `address` that presents `credentials` (TLS when set, the token on every call)."""
    if credentials.channel_credentials is not None:
        channel = grpc.secure_channel(address, credentials.channel_credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if credentials.token is None:
        return channel
    return grpc.intercept_channel(channel, _TokenMetadata(credentials.token))
