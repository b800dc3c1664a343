"""The batch script of a job under the slurm executor: torchrun on every node of the allocation.

    #SBATCH --job-name=dflash-<job id>.<attempt> --nodes=N --ntasks-per-node=1 [--gpus-per-node=G] ...
    srun --ntasks-per-node=1 <python> -m torch.distributed.run --nnodes=$SLURM_NNODES
        --nproc-per-node=<ranks per node> --rdzv-backend=c10d --rdzv-endpoint=<first node>:<port>
        -m services.cli.main train --config <job folder>/trainer.yaml --control-plane-url ... --job-id ...

It is written to the job's folder (`job.sbatch`) so that a person can read it, and resubmit it by
hand (`sbatch job.sbatch`). The rendezvous is on the node the script runs on, the first of the
allocation; the node count comes from the allocation, so an edited `--nodes` just works. When Slurm
requeues the job (preemption, node failure: SLURM_RESTART_COUNT > 0) the trainer gets `--resume`
and continues from its last checkpoint. The script records the trainer's exit status in
`exit_status`, which outlives Slurm's memory of the job.

No cgroup or GPU settings of the cluster are assumed: a job asks for `--gpus-per-node` and gets
CUDA_VISIBLE_DEVICES from Slurm; a CPU job asks for one CPU per rank.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.control_plane.executors.local import CODE_ROOT
from services.control_plane.job_logs import JobFiles
from services.control_plane.settings import ControlPlaneSettings

SCRIPT_NAME = "job.sbatch"
OUTPUT_PATTERN = "slurm-%j.out"  # Slurm fills in the job id


def job_name(job_id: str, attempt: int) -> str:
    """The Slurm job name of one attempt: how a restarted control plane finds a submission whose
    id it never stored."""
    return f"dflash-{job_id}.{attempt}"


@dataclass(frozen=True, kw_only=True)
class SlurmOptions:
    """What every job's batch script asks of the cluster and runs there (the --slurm-* settings)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # for a job that does not give `gpus`
    constraint: str | None = None
    sbatch_args: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    requeue: bool = True
    python: str = sys.executable
    venv: Path | None = None
    container_image: str | None = None
    container_runtime: Literal["pyxis", "apptainer"] = "pyxis"
    mounts: tuple[Path, ...] = ()  # seen in the container at their own paths

    @classmethod
    def from_settings(cls, settings: ControlPlaneSettings, *, mounts: tuple[Path, ...]) -> SlurmOptions:
        return cls(
            partition=settings.slurm_partition,
            account=settings.slurm_account,
            qos=settings.slurm_qos,
            time_limit=settings.slurm_time_limit,
            nodes=settings.slurm_nodes,
            gpus_per_node=settings.slurm_gpus_per_node,
            constraint=settings.slurm_constraint,
            sbatch_args=tuple(shlex.split(settings.slurm_sbatch_args)),
            srun_args=tuple(shlex.split(settings.slurm_srun_args)),
            requeue=settings.slurm_requeue,
            python=settings.python,
            venv=settings.slurm_venv,
            container_image=settings.slurm_container_image,
            container_runtime=settings.slurm_container_runtime,
            mounts=mounts,
        )

    @property
    def trainer_python(self) -> str:
        if self.container_image is not None:
            return "python3"
        if self.venv is not None:
            return str(self.venv / "bin" / "python")
        return self.python


def sbatch_lines(
    options: SlurmOptions, *, job_id: str, attempt: int, folder: Path, gpus_per_node: int, ranks_per_node: int
) -> list[str]:
    values = [
        ("job-name", job_name(job_id, attempt)),
        # Appended to, not truncated: a requeued run's output follows the first one's.
        ("output", str(folder / OUTPUT_PATTERN)),
        ("open-mode", "append"),
        ("nodes", str(options.nodes)),
        ("ntasks-per-node", "1"),  # one torchrun per node; it starts the ranks
        ("gpus-per-node", str(gpus_per_node) if gpus_per_node else None),
        ("cpus-per-task", None if gpus_per_node else str(ranks_per_node)),  # a CPU rank per CPU
        ("partition", options.partition),
        ("account", options.account),
        ("qos", options.qos),
        ("time", options.time_limit),
        ("constraint", options.constraint),
    ]
    lines = [f"#SBATCH --{key}={shlex.quote(value)}" for key, value in values if value is not None]
    lines.append("#SBATCH --requeue" if options.requeue else "#SBATCH --no-requeue")
    if options.sbatch_args:
        lines.append(f"#SBATCH {shlex.join(options.sbatch_args)}")
    return lines


def node_command(options: SlurmOptions, *, folder: Path) -> list[str]:
    """srun's options for the container, then what runs before python on each node."""
    if options.container_image is None:
        return []
    if options.container_runtime == "pyxis":
        mounts = ",".join(f"{m}:{m}" for m in options.mounts)
        return [
            f"--container-image={options.container_image}",
            *([f"--container-mounts={mounts}"] if mounts else []),
            f"--container-workdir={folder}",
        ]
    binds = ",".join(str(m) for m in options.mounts)
    return ["apptainer", "exec", "--nv", *(["--bind", binds] if binds else []), options.container_image]


def render(
    options: SlurmOptions,
    *,
    job_id: str,
    attempt: int,
    files: JobFiles,
    control_plane_url: str,
    gpus_per_node: int,
    ranks_per_node: int,
) -> str:
    """The batch script of one attempt of a job whose files (trainer config, exit status) are
    `files`: `gpus_per_node` GPUs and `ranks_per_node` ranks on each of `options.nodes` nodes."""
    q = shlex.quote
    folder = files.folder
    exit_file, exit_tmp = q(str(files.exit_status)), q(str(files.exit_status.with_name(".exit_status.tmp")))
    container = node_command(options, folder=folder)
    pyxis = container if options.container_runtime == "pyxis" else []
    prefix = [] if pyxis else container
    srun = [*options.srun_args, *pyxis]
    setup: list[str] = []
    if options.container_image is None:
        # The control plane's own code, as the local executor runs it (a checkout on the shared
        # file system, or the venv's site-packages): trainers run what the control plane is.
        setup.append(f'export PYTHONPATH={q(str(CODE_ROOT))}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    if options.venv is not None:
        setup.append(f"source {q(str(options.venv / 'bin' / 'activate'))}")
    sbatch = sbatch_lines(
        options,
        job_id=job_id,
        attempt=attempt,
        folder=folder,
        gpus_per_node=gpus_per_node,
        ranks_per_node=ranks_per_node,
    )
    train = [
        "-m", "services.cli.main", "train", "--config", str(files.trainer_config),
        "--control-plane-url", control_plane_url, "--job-id", job_id,
    ]  # fmt: skip
    return f"""#!/bin/bash
# dflash job {job_id}, attempt {attempt}: torchrun on every node of the allocation, FSDP2 ranks.
# Written by the control plane's slurm executor (docs/deployment.md, "On a Slurm cluster").
# Resubmit by hand with `sbatch {q(str(folder / SCRIPT_NAME))}` (the control plane tracks only what
# it submitted; set $DFLASH_CONTROL_PLANE_TOKEN to the job's token to have metrics reach it).
{chr(10).join(sbatch)}

JOB_DIR={q(str(folder))}
cd "$JOB_DIR" || exit 1
export PYTHONUNBUFFERED=1  # lines reach the job log as they are written
export TQDM_MININTERVAL=10  # a log file is not a terminal
{chr(10).join(setup)}

# c10d rendezvous on this node, the first of the allocation. DFLASH_RDZV_HOST names another
# address of it (a fast network's), DFLASH_RDZV_PORT another port.
RDZV_HOST=${{DFLASH_RDZV_HOST:-$(hostname)}}
RDZV_PORT=${{DFLASH_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}}
RESUME=""
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then
    RESUME="--resume"  # requeued by Slurm: continue from the last checkpoint
fi
echo "slurm job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST:" \\
    "torchrun on $SLURM_NNODES node(s) x {ranks_per_node} rank(s), rendezvous $RDZV_HOST:$RDZV_PORT"

srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\
    ${{SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}} {shlex.join(srun)} \\
    {shlex.join([*prefix, options.trainer_python])} -m torch.distributed.run \\
    --nnodes="$SLURM_NNODES" --nproc-per-node={ranks_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \\
    {shlex.join(train)} $RESUME
STATUS=$?
echo "$STATUS" > {exit_tmp} && mv -f {exit_tmp} {exit_file}
exit "$STATUS"
"""
