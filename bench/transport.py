"""Hidden-state bytes/s into the trainer's memory over gRPC vs a plain TCP socket on loopback.

    python bench/transport.py            # Qwen3-8B-like samples: 2048 tokens x 4 layers x 4096, bf16
    python bench/transport.py --quick    # small samples, ~30 s

The service runs in its own process (as in production) with a synthetic backend that returns a
precomputed bf16 tensor, so the figure is the wire's, not the verifier's. The client is the
trainer's `GrpcSource`: every sample is checked (token digest, shape, finite, non-zero) and
lands as torch tensors. The baseline moves the same bytes between two processes over loopback
TCP (`sendall` of a preallocated buffer, `recv_into` a preallocated buffer): the most a wire can
deliver on this host. Rows go to bench/results/transport.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import socket
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dflash_core.verifier import VerifierFingerprint  # noqa: E402
from services.hidden_states.backends.base import BackendInfo  # noqa: E402


class SyntheticBackend:
    """A Backend whose 'verifier' returns slices of one random bf16 tensor: wire cost only."""

    def __init__(self, *, hidden: int, num_layers: int, layer_ids: Sequence[int], max_tokens: int) -> None:
        self._info = BackendInfo(
            name="transformers",
            fingerprint=VerifierFingerprint(
                name_or_path="synthetic", architecture="Synthetic", num_layers=num_layers,
                hidden_size=hidden, vocab_size=1000, tokenizer_sha256="0" * 64,
            ),
            layer_ids=tuple(layer_ids),
            dtype=torch.bfloat16,
            max_length=max_tokens,
            max_batch_tokens=max_tokens * 4,
        )  # fmt: skip
        self._planes = torch.randn(max_tokens, len(layer_ids), hidden).to(torch.bfloat16)

    @property
    def info(self) -> BackendInfo:
        return self._info

    def extract(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self._planes[: s.numel()] for s in sequences]

    def generate(self, prompts, params):  # pragma: no cover - not part of this benchmark
        raise NotImplementedError

    def close(self) -> None:
        pass


def serve(args: argparse.Namespace, ready) -> None:
    from services.hidden_states.server import HiddenStateServer

    layer_ids = range(1, args.layers + 1)
    backend = SyntheticBackend(
        hidden=args.hidden, num_layers=args.layers, layer_ids=layer_ids, max_tokens=args.tokens
    )
    frame_bytes = args.frame_mib << 20
    server = HiddenStateServer(backend, port=0, max_frame_bytes=frame_bytes, max_pending_per_stream=8)
    server.start()
    ready.put(server.address)
    time.sleep(3600)


def grpc_rate(address: str, args: argparse.Namespace, streams: int) -> float:
    from services.trainer.grpc_source import GrpcSource
    from services.trainer.sources import SampleRequest

    aux = list(range(1, args.layers))  # + N = args.layers: `layers` planes per token
    source = GrpcSource([address], target_layer_ids=aux, inflight_bytes=2 << 30, streams_per_endpoint=streams)
    ids = torch.arange(args.tokens) % 1000  # the synthetic vocabulary has 1000 ids
    requests = [SampleRequest(sample_id=i, input_ids=ids) for i in range(args.samples)]
    source.extract(requests[:2])  # connect, warm up
    started = time.perf_counter()
    source.prefetch(requests[2:])
    delivered = 0
    for start in range(2, args.samples, 4):
        for states in source.extract(requests[start : start + 4]):
            delivered += states.aux.numel() * 2 + states.last.numel() * 2
    elapsed = time.perf_counter() - started
    source.close()
    return delivered / elapsed


def socket_sender(port: int, total: int, chunk: int) -> None:
    buffer = memoryview(bytearray(chunk))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sent = 0
        while sent < total:
            sock.sendall(buffer[: min(chunk, total - sent)])
            sent += min(chunk, total - sent)


def socket_rate(total_per_connection: int, connections: int, chunk: int) -> float:
    """Bytes/s received by this process from `connections` sender processes over loopback."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.listen(connections)
    senders = [
        mp.get_context("spawn").Process(target=socket_sender, args=(port, total_per_connection, chunk))
        for _ in range(connections)
    ]
    received = [0] * connections

    def drain(index: int, conn: socket.socket) -> None:
        buffer = memoryview(bytearray(chunk))
        with conn:
            while True:
                count = conn.recv_into(buffer)
                if not count:
                    return
                received[index] += count

    for sender in senders:
        sender.start()
    accepted = [server.accept()[0] for _ in range(connections)]
    started = time.perf_counter()
    threads = [threading.Thread(target=drain, args=(i, c)) for i, c in enumerate(accepted)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for sender in senders:
        sender.join()
    server.close()
    assert sum(received) == total_per_connection * connections
    return sum(received) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4, help="planes per token (aux layers + N)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=34)
    parser.add_argument("--frame-mib", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.samples = 512, 34
    sample_bytes = args.tokens * args.layers * args.hidden * 2
    cpu = platform.processor() or platform.machine()
    device = f"{cpu}, {mp.cpu_count()} cores, loopback"
    config = (
        f"{args.tokens} tokens x {args.layers} planes x {args.hidden} bf16 = "
        f"{sample_bytes / 2**20:.0f} MiB/sample, {args.frame_mib} MiB frames"
    )

    ready: mp.Queue = mp.get_context("spawn").Queue()
    service = mp.get_context("spawn").Process(target=serve, args=(args, ready), daemon=True)
    service.start()
    address = ready.get(timeout=120)
    results: dict[str, float] = {}
    try:
        for streams in (1, 4):
            results[f"grpc_{streams}_stream"] = grpc_rate(address, args, streams)
    finally:
        service.kill()
    total = sample_bytes * (args.samples - 2)
    for connections in (1, 4):
        results[f"socket_{connections}_connection"] = socket_rate(total // connections, connections, 1 << 20)

    best_grpc = max(v for k, v in results.items() if k.startswith("grpc"))
    best_socket = max(v for k, v in results.items() if k.startswith("socket"))
    today = date.today().isoformat()
    rows = [
        {"metric": f"{name}_bytes_per_s", "value": round(value), "unit": "bytes/s", "config": config,
         "device": device, "date": today}
        for name, value in results.items()
    ]  # fmt: skip
    for name, value in (
        ("grpc_vs_socket_ratio", best_grpc / best_socket),
        ("grpc_vs_socket_ratio_one_stream", results["grpc_1_stream"] / results["socket_1_connection"]),
    ):
        rows.append({"metric": name, "value": round(value, 3), "unit": "ratio", "config": config,
                     "device": device, "date": today})  # fmt: skip
    for row in rows:
        print(f"{row['metric']:>36}: {row['value']:>16,} {row['unit']}")
    out = ROOT / "bench" / "results" / f"transport{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
