"""The control plane's read routes under load: many jobs with metric history, a bounded number of clients.

    python bench/control_plane_load.py            # 500 jobs x 200 metric rows, 16 clients, 10 s per route
    python bench/control_plane_load.py --quick    # 100 jobs x 50 rows, 8 clients, 3 s per route (~30 s)

Setup: a fresh SQLite file is filled through the store (`JobStore`, the same SQL the service runs):
`--jobs` jobs, 15% queued and the rest succeeded, failed or cancelled, each finished one with
`--rows` metric rows carrying the keys the trainer logs (loss, per-slot accuracy, acceptance
length, throughput, data wait, step times; ~1 KiB of JSON each) plus one validation row per epoch.
Then `dflash control-plane` (the real CLI: one uvicorn worker, its INFO access log to a file) starts
on that file in its own process on 127.0.0.1, with `--max-concurrent-jobs 0` so no job starts.

This process drives it with `--clients` concurrent keep-alive connections, each sending its next
request when the previous answer is complete, for `--duration` seconds per route:

    list          GET /v1/jobs?limit=50                           the dashboard's jobs page
    list_state    GET /v1/jobs?state=succeeded&limit=50&offset=N  a filtered page, random offset
    get           GET /v1/jobs/<random job>                       the job page's polling
    metrics       GET /v1/jobs/<random finished job>/metrics      the whole history (--rows rows)
    metrics_tail  GET /v1/jobs/<id>/metrics?after_id=<last - 5>   an incremental poll (5 rows)
    mixed         all of the above at random, 3:1:3:1:2

Latency is measured from sending the request to the last byte of the answer; an error is any
non-2xx status or a transport error. Each phase starts after a 1 s warm-up that is not counted.
The connections are plain asyncio streams speaking the little HTTP/1.1 these GETs need (~0.1 ms of
CPU per request): with httpx (~1.5 ms per request) the client, not the service, used a whole core
of the two, and its own queueing was most of the p99. This process's objects are frozen out of the
garbage collector before the load (a full collection would pause every connection at once).

The server's and this process's CPU time over each phase (from /proc) give the CPU per request
and say which side was the limit. Rows {metric, value, unit, config, device, date} with metric
p50_ms, p99_ms, rps, errors and server_cpu_ms_per_request per route go to
bench/results/control_plane_load.json (`--quick`: control_plane_load_quick.json), replacing this
host's earlier rows with the same `--label` and keeping the rest. Exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dflash_core.config import TrainConfig  # noqa: E402
from services.control_plane.schemas import MetricRowIn  # noqa: E402
from services.control_plane.service import new_job_id  # noqa: E402
from services.control_plane.states import JobState  # noqa: E402
from services.control_plane.store import JobStore  # noqa: E402

BLOCK_SIZE = 8
EPOCHS = 3
LOG_FREQ = 10
FINISHED = [(JobState.SUCCEEDED, 0.70), (JobState.FAILED, 0.10), (JobState.CANCELLED, 0.05)]
MIX = {"list": 3, "list_state": 1, "get": 3, "metrics": 1, "metrics_tail": 2}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------- setup
def metric_row(step: int, total: int, rng: random.Random) -> dict[str, float]:
    """One training row with the keys and magnitudes the trainer logs."""
    progress = step / total
    metrics = {
        "train/loss": 2.2 + 8 * 2.718 ** (-6 * progress) + rng.gauss(0, 0.05),
        "train/acc": 0.55 * progress + rng.gauss(0, 0.01),
        "train/eal": 1 + 2.5 * progress + rng.gauss(0, 0.03),
        "train/supervised_slots": 3584.0,
        "train/grad_norm": 0.4 + rng.random(),
        "train/lr": 3e-4,
        "train/tokens_per_s": 52_000 + rng.gauss(0, 1500),
        "train/samples_per_s": 25 + rng.random(),
        "train/data_wait_frac": abs(rng.gauss(0.04, 0.02)),
        "time/fetch_s": 0.01,
        "time/forward_s": 0.08,
        "time/backward_s": 0.12,
        "time/optimizer_s": 0.02,
        "epoch": EPOCHS * progress,
    }
    for k in range(1, BLOCK_SIZE):
        metrics[f"train/acc_slot_{k}"] = (0.85 - 0.09 * k) * progress + rng.gauss(0, 0.01)
    return metrics


def seed(db: Path, data_root: Path, checkpoint_root: Path, *, jobs: int, rows: int) -> dict[str, list]:
    """Fill the store; returns the job ids by kind and each finished job's newest row id."""
    rng = random.Random(0)
    store = JobStore(f"sqlite:///{db}")
    (data_root / "sharegpt").mkdir(parents=True, exist_ok=True)
    ids: dict[str, list] = {"all": [], "finished": [], "last_row": []}
    now = time.time()
    for i in range(jobs):
        job_id = f"{new_job_id()}-{i:04d}"  # ids made in the same second must still differ
        config = TrainConfig(
            verifier_name_or_path="Qwen/Qwen3-8B",
            data_path=data_root / "sharegpt",
            save_path=checkpoint_root / job_id,
            block_size=BLOCK_SIZE,
            num_layers=5,
            epochs=EPOCHS,
            target_layer_ids=[2, 18, 33],
            hidden_states_endpoint=["127.0.0.1:8000"],
            log_freq=LOG_FREQ,
        )
        store.insert_job(
            job_id=job_id,
            name=f"load {i}",
            config=config.model_dump(mode="json"),
            gpus_requested=rng.choice([0, 1, 2, 4, 8]),
            executor="local",
        )
        ids["all"].append(job_id)
        draw = rng.random()
        state = next((s for s, p in _cumulative(FINISHED) if draw < p), JobState.QUEUED)
        if state is JobState.QUEUED:
            continue
        total = rows * LOG_FREQ
        batch = [
            MetricRowIn(step=s, time=now - total + s, metrics=metric_row(s, total, rng))
            for s in range(LOG_FREQ, total + 1, LOG_FREQ)
        ]
        for epoch in range(EPOCHS):
            step = total * (epoch + 1) // EPOCHS
            batch.append(
                MetricRowIn(step=step, time=now, metrics={"val/loss": 2.5, "val/eal": 3.1, "epoch": epoch})
            )
        store.add_metric_rows(job_id, attempt=1, rows=batch)
        store.transition(
            job_id,
            expect=[JobState.QUEUED],
            to=state,
            step=total,
            total_steps=total,
            epoch=float(EPOCHS),
            exit_code=0 if state is JobState.SUCCEEDED else 1,
            started_at=now - total,
            finished_at=now,
        )
        ids["finished"].append(job_id)
        ids["last_row"].append(store.metric_rows(job_id, since_step=total, limit=10)[-1].id)
    store.close()
    return ids


def _cumulative(weights: list[tuple[JobState, float]]) -> list[tuple[JobState, float]]:
    out, acc = [], 0.0
    for state, p in weights:
        acc += p
        out.append((state, acc))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(work: Path, db: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "services.cli.main", "control-plane", "--port", str(port), "--db", str(db),
        "--data-root", str(work / "data"), "--checkpoint-root", str(work / "checkpoints"),
        "--max-concurrent-jobs", "0",
    ]  # fmt: skip
    log = (work / "control_plane.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"control plane exited {process.returncode}: {(work / 'control_plane.log').read_text()}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the control plane did not answer within 120 s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


# ---------------------------------------------------------------------------------------- load
@dataclass
class RouteStats:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None


# What a broken, refused or silent connection raises; each counts as a failed request.
TRANSPORT_ERRORS = (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


class Connection:
    """One keep-alive HTTP/1.1 connection for GETs whose answers carry a Content-Length (every
    route measured here); anything else counts as an error, and the connection is opened again."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise ConnectionError(f"{status} answer without a Content-Length")
            return status, await reader.readexactly(length)
        except TRANSPORT_ERRORS:
            self.close()
            raise

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def request_makers(ids: dict[str, list], jobs: int) -> dict[str, Callable[[random.Random], str]]:
    finished = list(zip(ids["finished"], ids["last_row"], strict=True))
    succeeded_pages = max(1, int(jobs * 0.7) // 50)
    return {
        "list": lambda rng: "/v1/jobs?limit=50",
        "list_state": lambda rng: (
            f"/v1/jobs?state=succeeded&limit=50&offset={50 * rng.randrange(succeeded_pages)}"
        ),
        "get": lambda rng: f"/v1/jobs/{rng.choice(ids['all'])}",
        "metrics": lambda rng: f"/v1/jobs/{rng.choice(ids['finished'])}/metrics",
        "metrics_tail": lambda rng: "/v1/jobs/{}/metrics?after_id={}".format(*_tail(rng.choice(finished))),
    }


def _tail(job: tuple[str, int]) -> tuple[str, int]:
    return job[0], job[1] - 5


async def drive(
    base: str,
    makers: dict[str, Callable[[random.Random], str]],
    routes: list[str],
    *,
    clients: int,
    seconds: float,
) -> dict[str, RouteStats]:
    """`clients` workers, each with one request in flight, for `seconds`; per-route stats."""
    stats = {route: RouteStats() for route in makers}
    weights = [MIX[r] for r in routes]
    host, port = base.removeprefix("http://").rsplit(":", 1)
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        connection = Connection(host, int(port))
        while time.perf_counter() < deadline:
            route = routes[0] if len(routes) == 1 else rng.choices(routes, weights)[0]
            url = makers[route](rng)
            started = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(connection.get(url), timeout=30)
                problem = None if 200 <= status < 300 else f"{status} on {url}: {body[:200]!r}"
            except TRANSPORT_ERRORS as exc:  # TimeoutError is an OSError
                connection.close()
                problem = f"{type(exc).__name__} on {url}: {exc}"
            elapsed = time.perf_counter() - started
            if problem is None:
                stats[route].latencies_s.append(elapsed)
            else:
                stats[route].errors += 1
                stats[route].first_error = stats[route].first_error or problem
        connection.close()

    await asyncio.gather(*(worker(i) for i in range(clients)))
    return stats


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def check_answers(base: str, ids: dict[str, list], *, jobs: int, rows: int) -> None:
    """The routes answer what the bench seeded (so the timings are of real answers)."""
    with httpx.Client(base_url=base, timeout=30) as client:
        page = client.get("/v1/jobs?limit=50").json()
        assert page["count"] == jobs and len(page["data"]) == min(50, jobs), page["count"]
        history = client.get(f"/v1/jobs/{ids['finished'][0]}/metrics").json()
        assert history["count"] == rows + EPOCHS, history["count"]
        tail = client.get(f"/v1/jobs/{ids['finished'][0]}/metrics?after_id={ids['last_row'][0] - 5}").json()
        assert tail["count"] == 5, tail["count"]


# ---------------------------------------------------------------------------------------- main
def describe_device() -> str:
    model = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} cores"


def write_rows(out: Path, rows: list[dict[str, Any]], *, label: str) -> None:
    """Replace this host's rows with the same label in `out` and keep the rest, so hosts (and
    code before and after a change) can be compared."""
    kept = []
    if out.exists():
        mine = f"[{label}] "
        kept = [
            row
            for row in json.loads(out.read_text())
            if row["device"] != rows[0]["device"] or not row["config"].startswith(mine)
        ]
    out.write_text(json.dumps(kept + rows, indent=2) + "\n")


@dataclass
class Phase:
    name: str
    stats: RouteStats
    wall_s: float
    server_cpu: float  # share of one core the server used over the phase
    client_cpu: float

    @property
    def rps(self) -> float:
        return len(self.stats.latencies_s) / self.wall_s

    def cpu_ms_per_request(self, share: float) -> float:
        answered = len(self.stats.latencies_s) + self.stats.errors
        return share * self.wall_s / max(answered, 1) * 1e3

    def summary(self) -> str:
        p50, p99 = (percentile(self.stats.latencies_s, q) * 1e3 for q in (0.5, 0.99))
        server, client = self.cpu_ms_per_request(self.server_cpu), self.cpu_ms_per_request(self.client_cpu)
        text = (
            f"{self.name:13s} {self.rps:8.1f} req/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
            f"errors {self.stats.errors}  CPU: server {self.server_cpu:.0%} ({server:.2f} ms/request), "
            f"client {self.client_cpu:.0%} ({client:.2f} ms/request)"
        )
        return text + (f"  first error: {self.stats.first_error}" if self.stats.first_error else "")


def run_phase(base: str, makers: dict, routes: list[str], *, clients: int, seconds: float, pid: int) -> Phase:
    asyncio.run(drive(base, makers, routes, clients=clients, seconds=1.0))  # warm-up, not counted
    server_before, client_before = cpu_seconds(pid), time.process_time()
    wall = time.perf_counter()
    stats = asyncio.run(drive(base, makers, routes, clients=clients, seconds=seconds))
    wall = time.perf_counter() - wall
    merged = RouteStats()
    for route in routes:
        merged.latencies_s += stats[route].latencies_s
        merged.errors += stats[route].errors
        merged.first_error = merged.first_error or stats[route].first_error
    return Phase(
        name=routes[0] if len(routes) == 1 else "mixed",
        stats=merged,
        wall_s=wall,
        server_cpu=(cpu_seconds(pid) - server_before) / wall,
        client_cpu=(time.process_time() - client_before) / wall,
    )


def result_rows(phases: list[Phase], args: argparse.Namespace, load: float) -> list[dict[str, Any]]:
    described = {
        "list": "GET /v1/jobs?limit=50",
        "list_state": "GET /v1/jobs?state=succeeded&limit=50&offset=<random page>",
        "get": "GET /v1/jobs/<random job>",
        "metrics": f"GET /v1/jobs/<random finished job>/metrics ({args.rows + EPOCHS} rows)",
        "metrics_tail": "GET /v1/jobs/<id>/metrics?after_id=<last-5> (5 rows)",
        "mixed": "all five at random 3:1:3:1:2",
    }
    setup = (
        f"{args.jobs} jobs, {args.rows} metric rows per finished job, SQLite file; `dflash control-plane` "
        f"(1 uvicorn worker) on 127.0.0.1; {args.clients} concurrent keep-alive connections "
        f"(asyncio streams), {args.duration:g} s"
    )
    device, today = describe_device(), date.today().isoformat()
    rows = []
    for phase in phases:
        config = (
            f"[{args.label}] {phase.name}: {described[phase.name]}; {setup}; server CPU "
            f"{phase.server_cpu:.0%} of a core, client {phase.client_cpu:.0%}; host load average "
            f"{load:.1f} before the run"
        )
        latencies = phase.stats.latencies_s
        for metric, value, unit in (
            ("p50_ms", round(percentile(latencies, 0.5) * 1e3, 2), "ms"),
            ("p99_ms", round(percentile(latencies, 0.99) * 1e3, 2), "ms"),
            ("rps", round(phase.rps, 1), "requests/s"),
            ("errors", phase.stats.errors, "requests"),
            ("server_cpu_ms_per_request", round(phase.cpu_ms_per_request(phase.server_cpu), 3), "ms"),
        ):
            row = {"metric": metric, "value": value, "unit": unit, "config": config}
            rows.append({**row, "device": device, "date": today})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=500, help="Jobs in the store.")
    parser.add_argument("--rows", type=int, default=200, help="Training metric rows per finished job.")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent connections, one request each.")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per route (after 1 s warm-up).")
    parser.add_argument("--quick", action="store_true", help="100 jobs x 50 rows, 8 clients, 3 s per route.")
    parser.add_argument("--out", type=Path, default=None, help="Result file (default: bench/results/...).")
    parser.add_argument(
        "--label",
        default="latest",
        help="Tag of these rows (e.g. `before` a change); this host's rows with the same tag are replaced.",
    )
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.rows, args.clients, args.duration = 100, 50, 8, 3.0
    out = args.out or ROOT / "bench" / "results" / f"control_plane_load{'_quick' if args.quick else ''}.json"

    with tempfile.TemporaryDirectory(prefix="cp-load-") as tmp:
        work = Path(tmp)
        db = work / "jobs.db"
        started = time.perf_counter()
        ids = seed(db, work / "data", work / "checkpoints", jobs=args.jobs, rows=args.rows)
        print(
            f"seeded {args.jobs} jobs ({len(ids['finished'])} with {args.rows + EPOCHS} metric rows each) "
            f"in {time.perf_counter() - started:.1f} s; database {db.stat().st_size / 2**20:.1f} MiB"
        )
        # What the seeding left lives to the end: frozen, a full collection never walks it (a pause
        # of every connection at once, counted as latency).
        gc.collect()
        gc.freeze()
        load = os.getloadavg()[0]  # this machine may be shared: other work takes CPU from both sides
        print(f"load average {load:.1f} on {os.cpu_count()} cores before the run")
        port = free_port()
        server = start_server(work, db, port)
        base = f"http://127.0.0.1:{port}"
        phases = []
        try:
            check_answers(base, ids, jobs=args.jobs, rows=args.rows)
            makers = request_makers(ids, args.jobs)
            for routes in [[route] for route in makers] + [list(makers)]:
                phase = run_phase(
                    base, makers, routes, clients=args.clients, seconds=args.duration, pid=server.pid
                )
                phases.append(phase)
                print(phase.summary(), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_rows(out, result_rows(phases, args, load), label=args.label)
    print(f"rows written to {out}")
    return 1 if any(phase.stats.errors for phase in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
