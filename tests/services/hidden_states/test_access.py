"""Who gets into the hidden-state service: the token on every method, TLS, reflection, exposure.

Real servers on 127.0.0.1 (transformers backend, the tiny verifier) and real clients, no mocks.
The methods refused are enumerated from what the server itself lists over reflection, so a method
added later is covered without touching this file; health checks stay open for orchestrators.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.credentials import (
    CA_FILE_ENV,
    CLIENT_CERT_ENV,
    CLIENT_KEY_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ClientCredentials,
    CredentialsError,
    check_exposure,
    secure_channel,
    server_credentials,
    service_token,
)
from services.hidden_states.endpoints import open_channel
from services.hidden_states.generate_client import GenerateClient, GenerateError
from services.hidden_states.server import HiddenStateServer, ServiceAccess
from services.trainer.grpc_source import GrpcSource, HiddenStateServiceError
from services.trainer.sources import SampleRequest
from tests.factories.certificates import TestAuthority
from tests.factories.services import running_service

TOKEN = "s3cret-token-for-tests"
LAYERS = [1, 2]
TIMEOUT_S = 30.0
HEALTH = "grpc.health.v1.Health"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def no_credentials_from_outside(monkeypatch):
    for name in (TOKEN_ENV, TOKEN_FILE_ENV, CA_FILE_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def secured(verifier_path) -> Iterator[HiddenStateServer]:
    access = ServiceAccess(token=TOKEN, reflection=True)
    with running_service(verifier_path, target_layer_ids=LAYERS, access=access) as server:
        yield server


def served_methods(address: str) -> list[tuple[str, object]]:
    """(path, method descriptor) of every method the server lists over reflection, asked with the token."""
    with secure_channel(address, [], ClientCredentials(token=TOKEN)) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        return [
            (f"/{name}/{method.name}", method)
            for name in database.get_services()
            for method in pool.FindServiceByName(name).methods
        ]


def call(channel: grpc.Channel, path: str, method, metadata=()) -> grpc.StatusCode:
    """Call `path` with an empty request of its type; the status it ends with."""
    from google.protobuf import message_factory

    request = message_factory.GetMessageClass(method.input_type)()
    make = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    rpc = make(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=bytes)
    argument = iter([request]) if method.client_streaming else request
    try:
        result = rpc(argument, metadata=list(metadata), timeout=TIMEOUT_S)
        if method.server_streaming:
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_method_but_health_refuses_a_call_without_the_right_token(secured):
    methods = served_methods(secured.address)
    names = {path.rsplit("/", 1)[0].lstrip("/") for path, _ in methods}
    assert {"dflash.v1.HiddenStates", "grpc.reflection.v1alpha.ServerReflection", HEALTH} <= names
    assert {"/dflash.v1.HiddenStates/Extract", "/dflash.v1.HiddenStates/Generate"} <= {p for p, _ in methods}
    with grpc.insecure_channel(secured.address) as channel:
        for path, method in methods:
            if path.startswith(f"/{HEALTH}/"):
                continue
            for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
                assert call(channel, path, method, metadata) == grpc.StatusCode.UNAUTHENTICATED, (
                    path,
                    metadata,
                )
            assert call(channel, path, method, [("authorization", f"Bearer {TOKEN}")]) not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.UNIMPLEMENTED,
            ), path


def test_health_answers_without_a_token(secured):
    with grpc.insecure_channel(secured.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_clients_with_the_token_in_their_environment_get_through(secured, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with open_channel(secured.address) as channel:
        info = pb_grpc.HiddenStatesStub(channel).GetInfo(pb.GetInfoRequest(), timeout=TIMEOUT_S)
    assert info.payload_port != 0  # no TLS: the side channel is offered
    with GenerateClient([secured.address]) as client:
        (reply,) = client.complete([[5, 17, 33]], max_new_tokens=4)
    assert len(reply) >= 1
    # The trainer's path, its payload side channel included (bound to the authenticated call).
    source = GrpcSource([secured.address], target_layer_ids=LAYERS, timeout_s=TIMEOUT_S)
    try:
        (sample,) = source.extract([SampleRequest(sample_id=7, input_ids=torch.arange(1, 9))])
        assert sample.sample_id == 7 and source._endpoints[0].delivered_on_payload_channel == 1
    finally:
        source.close()


def test_a_client_with_a_wrong_token_is_told_why(secured, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(token_file))
    with pytest.raises(GenerateError, match="UNAUTHENTICATED"):
        GenerateClient([secured.address])


def test_a_trainer_without_the_token_stops_at_once_saying_so(secured):
    with pytest.raises(HiddenStateServiceError, match=r"needs its token.*\(UNAUTHENTICATED\)"):
        GrpcSource([secured.address], target_layer_ids=LAYERS, timeout_s=TIMEOUT_S)


def test_reflection_is_off_unless_asked_for(verifier_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    access = ServiceAccess(token=TOKEN)
    with (
        running_service(verifier_path, target_layer_ids=LAYERS, access=access) as server,
        open_channel(server.address) as channel,
        pytest.raises(Exception) as raised,
    ):
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "UNIMPLEMENTED" in str(raised.value)


# ---------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def authority(tmp_path_factory) -> TestAuthority:
    return TestAuthority(tmp_path_factory.mktemp("ca"))


def tls_service(verifier_path: Path, authority: TestAuthority, *, client_ca: bool):
    issued = authority.issue("service", server=True)
    tls = server_credentials(issued.cert, issued.key, authority.cert if client_ca else None)
    return running_service(verifier_path, target_layer_ids=LAYERS, access=ServiceAccess(token=TOKEN, tls=tls))


def get_info(address: str) -> pb.ServiceInfo:
    with open_channel(address) as channel:
        return pb_grpc.HiddenStatesStub(channel).GetInfo(pb.GetInfoRequest(), timeout=TIMEOUT_S)


def test_tls_round_trip_with_the_ca_and_no_way_in_without_it(verifier_path, authority, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with tls_service(verifier_path, authority, client_ca=False) as server:
        with pytest.raises(grpc.RpcError) as raised:
            get_info(server.address)  # plaintext against a TLS port
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        monkeypatch.setenv(CA_FILE_ENV, str(authority.cert))
        info = get_info(server.address)
        assert info.payload_port == 0  # the plain-TCP side channel is off under TLS
        source = GrpcSource([server.address], target_layer_ids=LAYERS, timeout_s=TIMEOUT_S)
        try:
            (sample,) = source.extract([SampleRequest(sample_id=3, input_ids=torch.arange(1, 6))])
            assert sample.aux.shape[0] == 5 and source._endpoints[0].delivered_on_payload_channel == 0
        finally:
            source.close()
        monkeypatch.setenv(CA_FILE_ENV, str(TestAuthority(authority.folder / "other").cert))
        with pytest.raises(grpc.RpcError) as raised:
            get_info(server.address)  # a CA that did not sign the service's certificate
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_takes_only_certificates_the_client_ca_signed(verifier_path, authority, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv(CA_FILE_ENV, str(authority.cert))
    rogue = TestAuthority(authority.folder / "rogue").issue("rogue-trainer", server=False)
    trainer = authority.issue("trainer", server=False)
    with tls_service(verifier_path, authority, client_ca=True) as server:
        for cert, key in ((None, None), (rogue.cert, rogue.key)):
            if cert is not None:
                monkeypatch.setenv(CLIENT_CERT_ENV, str(cert))
                monkeypatch.setenv(CLIENT_KEY_ENV, str(key))
            with pytest.raises(grpc.RpcError) as raised:
                get_info(server.address)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, cert
        monkeypatch.setenv(CLIENT_CERT_ENV, str(trainer.cert))
        monkeypatch.setenv(CLIENT_KEY_ENV, str(trainer.key))
        assert get_info(server.address).num_layers == 4


# ---------------------------------------------------------------------------- exposure and settings


def test_listening_beyond_loopback_needs_a_token_or_insecure():
    assert check_exposure("127.0.0.1", token=None, tls=False, insecure=False) is None
    assert check_exposure("::1", token=None, tls=False, insecure=False) is None
    for host in ("0.0.0.0", "10.0.0.5", "::", "trainer-host"):
        with pytest.raises(CredentialsError, match="--token-file"):
            check_exposure(host, token=None, tls=False, insecure=False)
        assert "anyone who reaches" in check_exposure(host, token=None, tls=False, insecure=True)
        assert "clear text" in check_exposure(host, token=TOKEN, tls=False, insecure=False)
        assert check_exposure(host, token=TOKEN, tls=True, insecure=False) is None


def test_the_cli_refuses_an_open_port_before_loading_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFLASH_")}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "serve-hidden-states", "--host", "0.0.0.0",
         "--port", "0"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no token is set: give one with --token-file" in result.stderr


def test_token_files_that_cannot_work_are_named(tmp_path):
    assert service_token(environ={TOKEN_ENV: " abc \n"}) == "abc"
    empty, spaced = tmp_path / "empty", tmp_path / "spaced"
    empty.write_text("\n")
    spaced.write_text("two words\n")
    for path, message in ((empty, "is empty"), (spaced, "spaces"), (tmp_path / "missing", "cannot read")):
        with pytest.raises(CredentialsError, match=message) as raised:
            service_token(path, environ={})
        assert str(path) in str(raised.value)
