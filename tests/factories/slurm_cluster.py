"""A real Slurm cluster on this host for the tests: munged, slurmctld and two slurmd (nodes n1, n2).

    cluster = SlurmCluster.start(Path(tempfile.mkdtemp()))   # or pytest.skip(slurm_unavailable())
    cluster.env        # {"SLURM_CONF": ...}: what sbatch, squeue and the control plane need
    cluster.scontrol("update", "nodename=n[1-2]", "state=drain", "reason=maintenance")
    cluster.stop()     # cancels every job, then ends the daemons it started

Debian's slurm-wlm and munge (`make slurm-env` installs them), run as root, CPU only: no cgroup
plugins (proctrack/linuxproc, task/none), no accounting (so no sacct: squeue and scontrol keep
ended jobs for MinJobAge). Everything lives in one folder: the munge key and socket, slurm.conf,
state, spool and logs; the ports are free ones, so the cluster never meets a real one. Both
slurmd run on this host under their own node names (Debian builds Slurm with multiple-slurmd
support); `nodes_up` says how many registered, so a test that needs two can skip otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")
NODES = ("n1", "n2")
NODE_CPUS = 2
START_TIMEOUT_S = 60.0


def slurm_unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    if os.geteuid() != 0:
        return "the Slurm tests start slurmd, which runs as root"
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): `make slurm-env` installs it"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_conf(root: Path, *, host: str, ctld_port: int, node_ports: dict[str, int]) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={NODE_CPUS} "
        "RealMemory=1000 State=UNKNOWN"
        for name, port in node_ports.items()
    )
    return f"""ClusterName=dflashtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/run/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# CPU only, no cgroups: processes are tracked through /proc, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
# No accounting: an ended job is known to squeue and scontrol for this long.
MinJobAge=3600
# A stopped or timed-out job's trainer gets SIGTERM, and this long to checkpoint before SIGKILL.
KillWait=10
InactiveLimit=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    nodes_up: int = 0

    @classmethod
    def start(cls, root: Path) -> SlurmCluster:
        """Start munged, slurmctld and the slurmd of every node under `root` (made readable by all:
        munged refuses a socket in a folder others cannot enter)."""
        for sub in ("munge", "run", "state", "log", *(f"spool/{n}" for n in NODES)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for folder in (root, root / "run"):
            folder.chmod(0o755)
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        host = socket.gethostname().split(".")[0]
        ports = {name: free_port() for name in NODES}
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, host=host, ctld_port=free_port(), node_ports=ports))
        env = {"SLURM_CONF": str(conf)}
        try:
            socket.gethostbyname(host)
        except OSError:  # the batch scripts' c10d rendezvous is at $(hostname) unless told otherwise
            env["DFLASH_RDZV_HOST"] = "127.0.0.1"
        cluster = cls(root=root, env=env)
        try:
            cluster._spawn(
                "munged",
                ["munged", "--foreground", "--force", f"--socket={root}/run/munge.socket",
                 f"--key-file={key}", f"--pid-file={root}/run/munged.pid",
                 f"--seed-file={root}/munge/munged.seed", f"--log-file={root}/log/munged.log"],
            )  # fmt: skip
            cluster._wait(lambda: (root / "run" / "munge.socket").exists(), "munged's socket")
            cluster._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            cluster._wait(lambda: cluster.run("scontrol", "ping").returncode == 0, "slurmctld to answer")
            for name in NODES:
                cluster._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name])
            cluster._wait(lambda: cluster._idle_nodes() >= 1, "a node to register")
            # The second node has a few seconds more; a build without multiple-slurmd never has it.
            with contextlib.suppress(AssertionError):
                cluster._wait(lambda: cluster._idle_nodes() == len(NODES), "both nodes", timeout_s=15)
            cluster.nodes_up = cluster._idle_nodes()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60
        )

    def scontrol(self, *args: str) -> str:
        done = self.run("scontrol", *args)
        assert done.returncode == 0, f"scontrol {' '.join(args)}: {done.stderr}"
        return done.stdout

    def squeue(self) -> dict[int, str]:
        """Every job slurmctld holds: id -> state."""
        out = self.run("squeue", "--noheader", "--states=all", "--format=%i %T").stdout
        return {int(i): state for i, state in (line.split() for line in out.splitlines())}

    def job(self, slurm_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (values without spaces are exact)."""
        fields = self.scontrol("--oneliner", "show", "job", str(slurm_id)).split()
        return dict(item.split("=", 1) for item in fields if "=" in item)

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _idle_nodes(self) -> int:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%N %t").stdout
        return sum(1 for line in out.splitlines() if line.split()[1:] == ["idle"])

    def _spawn(self, name: str, command: list[str]) -> None:
        output = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - the daemon's, closed at exit
        self.processes[name] = subprocess.Popen(
            command, env={**os.environ, **self.env}, stdout=output, stderr=subprocess.STDOUT, cwd=self.root
        )
        output.close()

    def _wait(self, condition: Callable[[], bool], what: str, *, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(
                        f"{name} exited {process.returncode} while waiting for {what}:\n"
                        + (self.root / "log" / f"{name}.out").read_text(errors="replace")[-3000:]
                    )
            if time.monotonic() > deadline:
                log = self.log("slurmctld")[-3000:]
                raise AssertionError(f"gave up waiting for {what}; slurmctld's log ends:\n{log}")
            time.sleep(0.2)

    def cancel_all(self, *, timeout_s: float = 60) -> None:
        """Cancel every job and wait until none runs (their processes gone with them)."""
        self.run("scancel", f"--user={os.getuid()}")
        deadline = time.monotonic() + timeout_s
        busy = ("RUNNING", "COMPLETING", "CONFIGURING", "PENDING", "SUSPENDED")
        while any(state in busy for state in self.squeue().values()) and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel the jobs, then end the daemons this cluster started (slurmd first)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.cancel_all()
        for name in sorted(self.processes, key=lambda n: ("slurmd" not in n, n != "slurmctld")):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=20)
