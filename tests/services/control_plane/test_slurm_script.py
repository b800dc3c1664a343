"""The slurm executor's settings and the batch script it writes, read as a person (and bash) would.

What runs it on a real cluster is in test_slurm.py; here: every --slurm-* setting lands in the
script, the container and venv variants start torchrun the way their runtime needs, the script
is valid bash, and bad settings are refused with the flag named.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.control_plane.executors.slurm_script import CODE_ROOT, SlurmOptions, render
from services.control_plane.job_logs import JobFiles
from services.control_plane.settings import ControlPlaneSettings


def script_for(tmp_path: Path, *, gpus: int = 0, ranks: int = 1, **settings: object) -> str:
    options = SlurmOptions.from_settings(
        ControlPlaneSettings(executor="slurm", **settings), mounts=(tmp_path / "jobs", tmp_path / "data")
    )
    text = render(
        options,
        job_id="20261206-101500-3fa9c2",
        attempt=2,
        files=JobFiles.of(tmp_path / "jobs", "20261206-101500-3fa9c2"),
        control_plane_url="http://login-1:8600",
        gpus_per_node=gpus,
        ranks_per_node=ranks,
    )
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    return text


def test_every_setting_is_an_sbatch_line_and_torchrun_runs_on_each_node(tmp_path):
    script = script_for(
        tmp_path,
        gpus=8,
        ranks=8,
        slurm_partition="gpu",
        slurm_account="drafters",
        slurm_qos="high",
        slurm_time_limit="2-00:00:00",
        slurm_nodes=4,
        slurm_constraint="h100&ib",
        slurm_sbatch_args="--exclusive --cpus-per-task=64 --comment='dflash run'",
    )
    folder = tmp_path / "jobs" / "20261206-101500-3fa9c2"
    for line in (
        "#SBATCH --job-name=dflash-20261206-101500-3fa9c2.2",  # the attempt: a restart finds it by name
        f"#SBATCH --output={folder}/slurm-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=drafters",
        "#SBATCH --qos=high",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --constraint='h100&ib'",
        "#SBATCH --requeue",
        "#SBATCH --exclusive --cpus-per-task=64 '--comment=dflash run'",  # last: it overrides
    ):
        assert line in script.splitlines(), line
    assert "--cpus-per-task=8" not in script  # GPU ranks: CPUs are the cluster's or the user's call
    assert 'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1' in script
    assert '--nnodes="$SLURM_NNODES" --nproc-per-node=8' in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"' in script
    assert (
        f"-m services.cli.main train --config {folder}/trainer.yaml --control-plane-url http://login-1:8600 "
        "--job-id 20261206-101500-3fa9c2 $RESUME"
    ) in script
    assert f"mv -f {folder}/.exit_status.tmp {folder}/exit_status" in script
    assert f"export PYTHONPATH={CODE_ROOT}" in script  # the control plane's own code


def test_a_cpu_job_asks_a_cpu_per_rank_and_the_defaults_ask_nothing_else(tmp_path):
    script = script_for(tmp_path, ranks=2)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=dflash-20261206-101500-3fa9c2.2",
        f"#SBATCH --output={tmp_path}/jobs/20261206-101500-3fa9c2/slurm-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --requeue",
    ]
    assert "--nproc-per-node=2" in script
    assert "#SBATCH --no-requeue" in script_for(tmp_path, slurm_requeue="false")


def test_the_trainer_runs_in_a_venv_or_a_container_image(tmp_path):
    venv = script_for(tmp_path, slurm_venv=tmp_path / "venv")
    assert f"source {tmp_path}/venv/bin/activate" in venv
    assert f"{tmp_path}/venv/bin/python -m torch.distributed.run" in venv

    pyxis = script_for(
        tmp_path, slurm_container_image="nvcr.io#dflash/trainer:1", slurm_srun_args="--mpi=none"
    )
    mounts = f"{tmp_path}/jobs:{tmp_path}/jobs,{tmp_path}/data:{tmp_path}/data"
    assert (
        f"--mpi=none '--container-image=nvcr.io#dflash/trainer:1' --container-mounts={mounts} "
        f"--container-workdir={tmp_path}/jobs/20261206-101500-3fa9c2"
    ) in pyxis
    assert "\n    python3 -m torch.distributed.run" in pyxis
    assert "PYTHONPATH" not in pyxis  # the image's dflash, not a path of this host

    apptainer = script_for(
        tmp_path, slurm_container_image="/shared/dflash.sif", slurm_container_runtime="apptainer"
    )
    assert (
        f"apptainer exec --nv --bind {tmp_path}/jobs,{tmp_path}/data /shared/dflash.sif python3 "
        "-m torch.distributed.run"
    ) in apptainer


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"slurm_partition": "gpu"},
            r"--slurm-partition: only for --executor slurm \(this one's is local\)",
        ),
        ({"executor": "slurm", "slurm_sbatch_args": "--comment='x"}, "cannot split .* as a shell would"),
        (
            {"executor": "slurm", "slurm_venv": "/v", "slurm_container_image": "i"},
            "--slurm-venv and --slurm-container-image: give one",
        ),
        ({"executor": "slurm", "slurm_nodes": 0}, "slurm_nodes"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag(settings, message):
    with pytest.raises(ValidationError, match=message):
        ControlPlaneSettings(**settings)
