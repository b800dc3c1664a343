"""Hidden-state bytes/s landed in a client's memory over our service, vs a plain TCP socket on loopback.

    python bench/transport.py            # Qwen3-8B-like samples: 2048 tokens x 4 planes x 4096 bf16
    python bench/transport.py --quick    # 512-token samples, fewer configs, ~30 s

gRPC: the real service (`HiddenStateServer` around `SyntheticBackend`, which hands out
precomputed bf16 tensors) runs in its own process on 127.0.0.1, as in production. This process
opens Extract streams, sends one request per sample (sample id, token ids, layer ids) and feeds
every frame to a `FrameAssembler` per stream (samples land in a shared `SampleBuffers`, as the
trainer's client should); only fully reassembled tensors count. Configs: one stream over a sweep
of frame sizes, then at the best frame size several streams (one channel each, and all on one
channel), and for comparison one stream with a fresh buffer per sample and one through the
generated stub (protobuf messages instead of `parse_frame`).
Each config is checked: token digests of every sample, and the first (warm-up) and the last
sample of every stream byte for byte against the tensor the backend sent.

Through the trainer's client: `GrpcSource` itself (prefetch bounded by bytes, every sample
checked: digest, shape, layer ids, dtype, finite and non-zero) over the payload side channel
(`payload_*`, 1 and several streams; every timed sample must have come off gRPC) and, to compare,
with `payload_transport="grpc"` (`source_inband_*`, frames on the gRPC stream).

Socket: the same bytes between two processes, `sendall` of a preallocated sample-sized buffer
and `recv_into` a preallocated one, over 1 and several connections: what loopback can carry.

Each config runs `--repeats` times and keeps the best run, because a shared 2-core machine is
noisy. Rows go to bench/results/transport.json (`--quick`: transport_quick.json), replacing
earlier rows of the same host and keeping other hosts' rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.synthetic_backend import (  # noqa: E402
    SyntheticBackend,
    SyntheticShape,
    expected_planes,
    sample_token_ids,
)
from dflash_core.wire.codec import (  # noqa: E402
    DecodedSample,
    FrameAssembler,
    SampleBuffers,
    parse_frame,
    token_ids_digest,
)
from dflash_core.wire.pb import hidden_states_pb2 as pb  # noqa: E402
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc  # noqa: E402
from services.hidden_states import endpoints  # noqa: E402
from services.trainer.grpc_source import GrpcSource  # noqa: E402
from services.trainer.sources import SampleHiddenStates, SampleRequest  # noqa: E402

EXTRACT_METHOD = f"/{pb.DESCRIPTOR.services_by_name['HiddenStates'].full_name}/Extract"
MiB = 1 << 20


@dataclass(frozen=True)
class GrpcConfig:
    frame_mib: int
    streams: int = 1
    channels: int = 1  # streams share channels round-robin: 1 = all on one connection
    fast: bool = True  # `parse_frame` (payload stays a view) vs the generated stub's messages
    pooled: bool = True  # samples land in reused memory (`SampleBuffers`) vs a fresh buffer each

    @property
    def name(self) -> str:
        path = ("" if self.fast else "stub_") + ("" if self.pooled else "fresh_")
        streams = f"{self.streams}stream{'s' if self.streams > 1 else ''}"
        channels = f"_{self.channels}channel{'s' if self.channels > 1 else ''}" if self.streams > 1 else ""
        return f"grpc_{path}{streams}{channels}_{self.frame_mib}MiB"

    def describe(self) -> str:
        path = "fast path (parse_frame)" if self.fast else "generated stub"
        memory = "SampleBuffers" if self.pooled else "a fresh buffer per sample"
        return (
            f"{self.streams} stream(s) on {self.channels} channel(s), {self.frame_mib} MiB frames, "
            f"{path}, {memory}"
        )


@dataclass(frozen=True)
class SourceConfig:
    """`GrpcSource`, the trainer's client, with `streams` Extract streams on one endpoint."""

    streams: int
    transport: str  # GrpcSource's payload_transport: "auto" (the side channel) or "grpc" (in-band)
    frame_mib: int  # the service's frame size; only in-band frames use it

    @property
    def name(self) -> str:
        streams = f"{self.streams}stream{'s' if self.streams > 1 else ''}"
        if self.transport == "auto":
            return f"payload_{streams}"
        return f"source_inband_{streams}_{self.frame_mib}MiB"

    def describe(self) -> str:
        path = (
            "payload side channel (one TCP connection per stream, recv_into SampleBuffers)"
            if self.transport == "auto"
            else f"in-band gRPC frames of {self.frame_mib} MiB"
        )
        return f"GrpcSource, {self.streams} stream(s), {path}, every sample validated"


@dataclass
class Run:
    bytes_per_s: float
    client_cpu_s_per_gb: float
    server_cpu_s_per_gb: float


# ---------------------------------------------------------------------------------------- gRPC


def serve(shape: SyntheticShape, *, frame_bytes: int, options: list[tuple[str, int]], ready: Any) -> None:
    """The service process: the real server around the synthetic backend, until killed."""
    from services.hidden_states.server import HiddenStateServer

    # --grpc-option experiments: the server reads this list when it is built, so extend it first.
    endpoints.CHANNEL_OPTIONS[:] = merge_options(endpoints.CHANNEL_OPTIONS, options)
    server = HiddenStateServer(SyntheticBackend(shape), port=0, max_frame_bytes=frame_bytes).start()
    ready.put(server.address)
    server.wait()


def merge_options(base: list[tuple[str, Any]], extra: list[tuple[str, int]]) -> list[tuple[str, Any]]:
    merged = dict(base)
    merged.update(extra)
    return list(merged.items())


class Service:
    """One service process per frame size (max_frame_bytes is fixed when a server is built)."""

    def __init__(self, shape: SyntheticShape, *, frame_mib: int, options: list[tuple[str, int]]) -> None:
        context = mp.get_context("spawn")
        ready = context.Queue()
        self.process = context.Process(
            target=serve,
            args=(shape,),
            kwargs=dict(frame_bytes=frame_mib * MiB, options=options, ready=ready),
            daemon=True,
        )
        self.process.start()
        self.address: str = ready.get(timeout=180)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.kill()
        self.process.join()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StreamResult:
    def __init__(self) -> None:
        self.bytes = 0
        self.first: DecodedSample | None = None
        self.last: DecodedSample | None = None
        self.error: BaseException | None = None


def pull(
    extract: Callable[..., Iterator[Any]],
    *,
    requests: list[pb.ExtractRequest],
    digests: dict[int, bytes],
    result: StreamResult,
    buffers: SampleBuffers | None,
) -> None:
    """One Extract call: every request sent, every sample reassembled and its digest checked."""
    try:
        assembler = FrameAssembler(buffers)
        for response in extract(iter(requests)):
            if response.HasField("error"):
                raise RuntimeError(f"sample {response.sample_id}: {response.error.message}")
            decoded = assembler.add(response)
            if decoded is None:
                continue
            if decoded.token_ids_sha256 != digests[decoded.sample_id]:
                raise RuntimeError(f"sample {decoded.sample_id}: the token digest does not match")
            result.bytes += decoded.tensor.numel() * decoded.tensor.element_size()
            if result.first is None:
                result.first = decoded
            result.last = decoded
    except BaseException as exc:  # reported by the main thread
        result.error = exc


def check_bytes(decoded: DecodedSample | None, *, reference: torch.Tensor, shape: SyntheticShape) -> None:
    """The received tensor is exactly what the backend sent (all layers were requested, in order)."""
    if decoded is None:
        raise RuntimeError("a stream delivered no sample")
    expected = expected_planes(reference, sample_token_ids(decoded.sample_id, shape))
    if decoded.tensor.dtype != expected.dtype or not torch.equal(decoded.tensor, expected):
        raise RuntimeError(f"sample {decoded.sample_id}: received tensor differs from the one sent")


def grpc_run(
    service: Service,
    config: GrpcConfig,
    *,
    shape: SyntheticShape,
    reference: torch.Tensor,
    samples_per_stream: int,
    options: list[tuple[str, Any]],
    call_index: int,
) -> Run:
    channels = [grpc.insecure_channel(service.address, options=options) for _ in range(config.channels)]
    try:
        extracts = []
        for index in range(config.streams):
            channel = channels[index % config.channels]
            if config.fast:
                extracts.append(
                    channel.stream_stream(
                        EXTRACT_METHOD,
                        request_serializer=pb.ExtractRequest.SerializeToString,
                        response_deserializer=parse_frame,
                    )
                )
            else:
                extracts.append(pb_grpc.HiddenStatesStub(channel).Extract)
        plans = []
        for stream in range(config.streams):
            # Distinct ids per call and stream: a frame delivered to the wrong place shows.
            base = (call_index * 64 + stream) * 100_000
            ids = [base + k for k in range(samples_per_stream + 1)]
            requests = [
                pb.ExtractRequest(
                    sample_id=i, token_ids=sample_token_ids(i, shape).tolist(), layer_ids=shape.layer_ids
                )
                for i in ids
            ]
            digests = {i: token_ids_digest(sample_token_ids(i, shape)) for i in ids}
            plans.append((requests, digests))

        # Room for what each stream has in flight plus the samples this function keeps to check.
        buffers = SampleBuffers((4 * config.streams + 4) * shape.sample_bytes) if config.pooled else None
        # Warm-up: connect, one sample per stream, compared byte for byte.
        warm = [StreamResult() for _ in range(config.streams)]
        run_streams(extracts, plans=[(r[:1], d) for r, d in plans], results=warm, buffers=buffers)
        for result in warm:
            check_bytes(result.first, reference=reference, shape=shape)

        timed = [StreamResult() for _ in range(config.streams)]
        server_cpu, client_cpu = service.cpu_seconds(), own_cpu_seconds()
        started = time.perf_counter()
        run_streams(extracts, plans=[(r[1:], d) for r, d in plans], results=timed, buffers=buffers)
        elapsed = time.perf_counter() - started
        server_cpu, client_cpu = service.cpu_seconds() - server_cpu, own_cpu_seconds() - client_cpu
        for result in timed:
            check_bytes(result.last, reference=reference, shape=shape)
        total = sum(result.bytes for result in timed)
        expected_total = config.streams * samples_per_stream * shape.sample_bytes
        if total != expected_total:
            raise RuntimeError(f"{config.name}: {total} bytes arrived, {expected_total} expected")
        return Run(total / elapsed, client_cpu / (total / 1e9), server_cpu / (total / 1e9))
    finally:
        for channel in channels:
            channel.close()


def run_streams(
    extracts: list[Callable[..., Iterator[Any]]],
    *,
    plans: list[tuple[list[pb.ExtractRequest], dict[int, bytes]]],
    results: list[StreamResult],
    buffers: SampleBuffers | None,
) -> None:
    threads = [
        threading.Thread(
            target=pull,
            args=(extract,),
            kwargs=dict(requests=requests, digests=digests, result=result, buffers=buffers),
        )
        for extract, (requests, digests), result in zip(extracts, plans, results, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if result.error is not None:
            raise result.error


def source_run(
    service: Service,
    config: SourceConfig,
    *,
    shape: SyntheticShape,
    reference: torch.Tensor,
    samples: int,
    call_index: int,
) -> Run:
    """`samples` samples through one `GrpcSource`: all prefetched, consumed one by one in order."""
    base = call_index * 1_000_000  # distinct ids per run: a sample delivered twice would show
    warm_ids = list(range(base, base + 2 * config.streams))
    ids = list(range(base + len(warm_ids), base + len(warm_ids) + samples))
    requests = {i: SampleRequest(sample_id=i, input_ids=sample_token_ids(i, shape)) for i in warm_ids + ids}
    source = GrpcSource(
        [service.address],
        target_layer_ids=shape.layer_ids[:-1],
        # Four samples in flight per stream: enough to keep both ends busy, as a trainer would.
        inflight_bytes=4 * config.streams * shape.sample_bytes,
        streams_per_endpoint=config.streams,
        timeout_s=120.0,
        payload_transport=config.transport,  # type: ignore[arg-type]
    )
    try:
        # Warm-up: every stream connected (and its side channel bound), pool buffers allocated.
        warm = source.extract([requests[i] for i in warm_ids])
        check_source_bytes(warm[0], reference=reference, shape=shape)
        del warm
        endpoint = source._endpoints[0]
        on_payload = endpoint.delivered_on_payload_channel
        server_cpu, client_cpu = service.cpu_seconds(), own_cpu_seconds()
        started = time.perf_counter()
        source.prefetch([requests[i] for i in ids])
        total = 0
        last = None
        for i in ids:
            (last,) = source.extract([requests[i]])
            total += (last.aux.numel() + last.last.numel()) * last.last.element_size()
        elapsed = time.perf_counter() - started
        server_cpu, client_cpu = service.cpu_seconds() - server_cpu, own_cpu_seconds() - client_cpu
        check_source_bytes(last, reference=reference, shape=shape)
        came_off_grpc = endpoint.delivered_on_payload_channel - on_payload
        if config.transport == "auto" and came_off_grpc != samples:
            raise RuntimeError(f"{config.name}: {samples - came_off_grpc} of {samples} samples came in-band")
        if config.transport == "grpc" and came_off_grpc:
            raise RuntimeError(f"{config.name}: {came_off_grpc} samples came on the side channel")
    finally:
        source.close()
    if total != samples * shape.sample_bytes:
        raise RuntimeError(f"{config.name}: {total} bytes arrived, {samples * shape.sample_bytes} expected")
    return Run(total / elapsed, client_cpu / (total / 1e9), server_cpu / (total / 1e9))


def check_source_bytes(
    states: SampleHiddenStates | None, *, reference: torch.Tensor, shape: SyntheticShape
) -> None:
    """`GrpcSource`'s split of the sample (aux layers flattened, then N) is what the backend sent."""
    if states is None:
        raise RuntimeError("no sample arrived")
    expected = expected_planes(reference, sample_token_ids(states.sample_id, shape))
    aux, last = expected[:, :-1].flatten(1), expected[:, -1]
    if not (torch.equal(states.aux, aux) and torch.equal(states.last, last)):
        raise RuntimeError(f"sample {states.sample_id}: received tensor differs from the one sent")


# -------------------------------------------------------------------------------------- socket


def socket_sender(port: int, *, connections: int, sample_bytes: int, samples: int) -> None:
    """The sending process: one thread per connection, `sendall` of one preallocated buffer."""
    payload = memoryview(os.urandom(sample_bytes))

    def send(sock: socket.socket) -> None:
        with sock:
            sock.recv(1)  # go
            for _ in range(samples):
                sock.sendall(payload)

    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    threads = [threading.Thread(target=send, args=(s,)) for s in socks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def socket_run(connections: int, *, sample_bytes: int, samples_per_connection: int) -> Run:
    """Bytes/s this process receives from a sender process over `connections` connections."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
    port = listener.getsockname()[1]
    sender = mp.get_context("spawn").Process(
        target=socket_sender,
        args=(port,),
        kwargs=dict(connections=connections, sample_bytes=sample_bytes, samples=samples_per_connection),
        daemon=True,
    )
    sender.start()
    accepted = [listener.accept()[0] for _ in range(connections)]
    received = [0] * connections

    def drain(index: int, conn: socket.socket) -> None:
        buffer = memoryview(bytearray(sample_bytes))
        with conn:
            conn.sendall(b"g")
            while True:
                filled = 0
                while filled < sample_bytes:
                    count = conn.recv_into(buffer[filled:])
                    if not count:
                        return
                    filled += count
                received[index] += filled

    threads = [threading.Thread(target=drain, args=(i, c)) for i, c in enumerate(accepted)]
    sender_cpu, client_cpu = process_cpu_seconds(sender.pid), own_cpu_seconds()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    sender_cpu, client_cpu = process_cpu_seconds(sender.pid) - sender_cpu, own_cpu_seconds() - client_cpu
    sender.join()
    listener.close()
    total = sum(received)
    if total != sample_bytes * samples_per_connection * connections:
        raise RuntimeError(f"socket: {total} bytes arrived")
    return Run(total / elapsed, client_cpu / (total / 1e9), sender_cpu / (total / 1e9))


# ---------------------------------------------------------------------------------------- main


def describe_device() -> str:
    model = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    host = f"{model}, {os.cpu_count()} cores"
    if torch.cuda.is_available():  # the GPU hosts differ from CI machines by more than the CPU
        host += f", beside {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return host


def write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    """Replace this host's rows in `out` and keep other hosts' rows, so hosts can be compared."""
    kept = []
    if out.exists():
        kept = [row for row in json.loads(out.read_text()) if row["device"] != rows[0]["device"]]
    out.write_text(json.dumps(kept + rows, indent=2) + "\n")


def parse_option(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    return name, int(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--planes", type=int, default=4, help="layers per token: auxiliary layers + N")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--gib", type=float, default=3.0, help="GiB moved per config and repeat")
    parser.add_argument("--repeats", type=int, default=2, help="runs per config; the best is kept")
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 4, 8, 16], help="frame sizes, MiB")
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 4], help="multi-stream configs")
    parser.add_argument(
        "--grpc-option", type=parse_option, action="append", default=[], metavar="NAME=INT",
        help="extra gRPC channel/server option on both ends, to try one without editing code",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="512-token samples, fewer configs (~30 s)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.gib, args.repeats, args.frames, args.streams = 512, 0.5, 1, [1, 8], [2]
    shape = SyntheticShape(tokens=args.tokens, planes=args.planes, hidden=args.hidden)
    samples = max(2, round(args.gib * (1 << 30) / shape.sample_bytes))
    options = merge_options(endpoints.CHANNEL_OPTIONS, args.grpc_option)
    reference = shape.reference()
    config_text = (
        f"{shape.tokens} tokens x {shape.planes} planes x {shape.hidden} bf16 = "
        f"{shape.sample_bytes / MiB:.0f} MiB/sample, 127.0.0.1, best of {args.repeats}"
    )
    print(f"{config_text}; {samples} samples per config")

    results: dict[str, tuple[Run, str]] = {}

    def measure(name: str, describe: str, once: Callable[[], Run]) -> Run:
        best = max((once() for _ in range(args.repeats)), key=lambda run: run.bytes_per_s)
        results[name] = (best, describe)
        print(
            f"{name:>34}: {best.bytes_per_s / 1e9:6.2f} GB/s   cpu-s/GB client "
            f"{best.client_cpu_s_per_gb:5.2f} server {best.server_cpu_s_per_gb:5.2f}",
            flush=True,
        )
        return best

    calls = iter(range(1 << 20))
    services: dict[int, Service] = {}
    try:

        def grpc_measure(config: GrpcConfig) -> Run:
            if config.frame_mib not in services:
                service = Service(shape, frame_mib=config.frame_mib, options=args.grpc_option)
                services[config.frame_mib] = service
            per_stream = max(1, samples // config.streams)
            return measure(
                config.name,
                config.describe(),
                lambda: grpc_run(
                    services[config.frame_mib], config, shape=shape, reference=reference,
                    samples_per_stream=per_stream, options=options, call_index=next(calls),
                ),
            )  # fmt: skip

        def source_measure(config: SourceConfig) -> Run:
            return measure(
                config.name,
                config.describe(),
                lambda: source_run(
                    services[config.frame_mib], config, shape=shape, reference=reference,
                    samples=samples, call_index=next(calls),
                ),
            )  # fmt: skip

        sweep = {frame: grpc_measure(GrpcConfig(frame_mib=frame)) for frame in args.frames}
        best_frame = max(sweep, key=lambda frame: sweep[frame].bytes_per_s)
        grpc_measure(GrpcConfig(frame_mib=best_frame, pooled=False))
        grpc_measure(GrpcConfig(frame_mib=best_frame, fast=False))
        for streams in args.streams:
            grpc_measure(GrpcConfig(frame_mib=best_frame, streams=streams, channels=streams))
            grpc_measure(GrpcConfig(frame_mib=best_frame, streams=streams, channels=1))
        source_measure(SourceConfig(streams=1, transport="grpc", frame_mib=best_frame))
        for streams in (1, *args.streams):
            source_measure(SourceConfig(streams=streams, transport="auto", frame_mib=best_frame))
    finally:
        for service in services.values():
            service.stop()
    for connections in (1, *args.streams):
        measure(
            f"socket_{connections}connection{'s' if connections > 1 else ''}",
            f"{connections} TCP connection(s), sendall / recv_into of sample-sized buffers",
            lambda connections=connections: socket_run(
                connections, sample_bytes=shape.sample_bytes, samples_per_connection=samples // connections
            ),
        )

    rate = {name: run.bytes_per_s for name, (run, _) in results.items()}
    best_grpc = max((n for n in rate if n.startswith("grpc")), key=rate.__getitem__)
    best_socket = max((n for n in rate if n.startswith("socket")), key=rate.__getitem__)
    best_one_stream = max((n for n in rate if n.startswith("grpc_1stream")), key=rate.__getitem__)
    best_payload = max((n for n in rate if n.startswith("payload")), key=rate.__getitem__)
    device, today = describe_device(), date.today().isoformat()
    rows = [
        {"metric": f"{name}_bytes_per_s", "value": round(run.bytes_per_s), "unit": "bytes/s",
         "config": f"{describe}; {config_text}", "device": device, "date": today}
        for name, (run, describe) in results.items()
    ]  # fmt: skip
    # Where the time goes: CPU seconds each end spends per GB moved (the receiver is "client").
    rows += [
        {"metric": f"{name}_{end}_cpu_s_per_gb", "value": round(value, 3), "unit": "cpu-s/GB",
         "config": f"{describe}; {config_text}", "device": device, "date": today}
        for name, (run, describe) in results.items()
        for end, value in (("client", run.client_cpu_s_per_gb), ("server", run.server_cpu_s_per_gb))
    ]  # fmt: skip
    # In-band frames (the first two), then the payload side channel through GrpcSource (the
    # service's path to the trainer when the side channel is on, as it is by default).
    for metric, grpc_name, socket_name in (
        ("grpc_vs_socket_ratio", best_grpc, best_socket),
        ("grpc_vs_socket_ratio_one_stream", best_one_stream, "socket_1connection"),
        ("grpc_vs_socket_ratio_payload_channel", best_payload, best_socket),
        ("grpc_vs_socket_ratio_payload_channel_one_stream", "payload_1stream", "socket_1connection"),
    ):
        rows.append(
            {"metric": metric, "value": round(rate[grpc_name] / rate[socket_name], 3), "unit": "ratio",
             "config": f"{grpc_name} / {socket_name}; {config_text}", "device": device, "date": today}
        )  # fmt: skip
    print(f"\n{'metric':<44} {'value':>14}  unit")
    for row in rows:
        if row["unit"] != "cpu-s/GB":  # printed per config above
            value = f"{row['value'] / 1e9:.2f} GB/s" if row["unit"] == "bytes/s" else f"{row['value']:.3f}"
            print(f"{row['metric']:<44} {value:>14}")
    out = args.out or ROOT / "bench" / "results" / f"transport{'_quick' if args.quick else ''}.json"
    write_rows(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
