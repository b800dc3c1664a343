"""Runtime settings of the control plane: where it listens, where it keeps state, what it may touch.

Job configs are `TrainConfig` (dflash_core.config); these are the service's own knobs. Each comes
from a `dflash control-plane` flag, else a `DFLASH_CONTROL_PLANE_<NAME>` environment variable,
else the default below. Tokens are never flags (they would show in `ps`): `--token-file F` or
`$DFLASH_CONTROL_PLANE_TOKEN` for the admin token, `--agent-token-file F` for the agents'.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.control_plane.credentials import Credentials, read_agent_tokens
from services.hidden_states.token_file import read_token_file

MIB = 1 << 20


class ControlPlaneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DFLASH_CONTROL_PLANE_", extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address to bind; 0.0.0.0 serves other hosts.")
    port: int = Field(default=8600, ge=1, lt=65536, description="HTTP port.")
    db: str = Field(
        default="dflash-control-plane.db",
        description="Job store: a SQLite file path, or any SQLAlchemy URL (postgresql://...).",
    )
    data_root: Path = Field(
        default=Path("output"),
        description="Jobs may read and write data (data_path, hidden_states_cache) only under this folder.",
    )
    checkpoint_root: Path = Field(
        default=Path("output/checkpoints"),
        description="Jobs write checkpoints (save_path) only under this folder; a job without a "
        "save_path gets <checkpoint-root>/<job id>.",
    )
    model_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a job's local verifier (a path, not a hub id) may also be read from, "
        "besides the data and checkpoint roots.",
    )
    jobs_dir: Path | None = Field(
        default=None,
        description="Per-job files (trainer config, log, exit status). Default: `<db>.jobs/` beside "
        "a SQLite file, else ./dflash-control-plane-jobs.",
    )
    token: SecretStr | None = Field(
        default=None,
        description="Admin bearer token: needed on every route but /healthz and the dashboard's files "
        "($DFLASH_CONTROL_PLANE_TOKEN).",
    )
    token_file: Path | None = Field(default=None, description="File holding the admin bearer token.")
    agent_token_file: Path | None = Field(
        default=None,
        description="File of trainer agents' tokens, one per line: `AGENT_NAME TOKEN` (that agent only) "
        "or `TOKEN` (agents of any name). They reach the agent routes only. Needs --token-file.",
    )
    max_concurrent_jobs: int = Field(
        default=1, ge=0, description="Jobs starting or running at once; 0 holds every job queued."
    )
    gpus: list[int] | None = Field(
        default=None,
        description="GPU indices jobs may use (`0,1,2`); default: every GPU nvidia-smi lists (none on "
        "a CPU-only host).",
    )
    executor: Literal["local", "agent", "slurm"] = Field(
        default="local",
        description="How trainers run: `local` subprocesses of this service; `agent`: "
        "`dflash trainer-agent`s on trainer hosts claim jobs over HTTP; `slurm`: each job is a Slurm "
        "batch job (the --slurm-* settings).",
    )
    hidden_states_endpoints: str = Field(
        default="",
        description="Hidden-state services to list and health-check (`host:port,host:port`), besides "
        "those the jobs name.",
    )
    hidden_states_registry: Path | None = Field(
        default=None,
        description="Folder where hidden-state services register as `NAME.endpoint` (`dflash "
        "slurm-hidden-states` writes its batch script to do so): all are listed and checked, and a job "
        "names one as `registry:NAME`.",
    )
    agent_heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="How often trainer agents heartbeat (they are told at registration)."
    )
    agent_lost_after_s: float = Field(
        default=60.0,
        gt=0,
        description="A trainer agent silent this long is lost: its jobs fail, resumable on another agent.",
    )
    # --- the slurm executor: each job one `sbatch` (docs/deployment.md, "On a Slurm cluster") ---
    slurm_partition: str | None = Field(
        default=None, description="Slurm partition of the jobs (`--partition`); default: the cluster's."
    )
    slurm_account: str | None = Field(default=None, description="Slurm account charged (`--account`).")
    slurm_qos: str | None = Field(default=None, description="Slurm quality of service (`--qos`).")
    slurm_time_limit: str | None = Field(
        default=None,
        description="Time limit of each Slurm job (`--time`, e.g. `2-00:00:00`); default: the partition's. "
        "At the limit the trainer gets SIGTERM and checkpoints; the job fails with TIMEOUT and resume "
        "continues it.",
    )
    slurm_nodes: int = Field(
        default=1, ge=1, description="Nodes per job: torchrun on each, one c10d rendezvous on the first."
    )
    slurm_gpus_per_node: int = Field(
        default=0,
        ge=0,
        description="GPUs per node for a job that does not give `gpus` (a job's `gpus` is per node here; "
        "one rank per GPU); 0: CPU ranks (`nproc` per node).",
    )
    slurm_constraint: str | None = Field(
        default=None, description="Node features the jobs need (`--constraint`)."
    )
    slurm_sbatch_args: str = Field(
        default="",
        description="More `sbatch` options for every job, split as a shell would; given with `=` "
        "(`--slurm-sbatch-args='--exclusive --cpus-per-task=32'`).",
    )
    slurm_srun_args: str = Field(
        default="", description="More `srun` options for the trainer step, split as a shell would."
    )
    slurm_venv: Path | None = Field(
        default=None,
        description="A virtual environment on the shared file system with dflash installed: activated on "
        "the nodes, its python runs the trainer (default: --python, which must exist on the nodes).",
    )
    slurm_container_image: str | None = Field(
        default=None,
        description="Run the trainer in this image instead (`python3` in it runs dflash): an enroot/pyxis "
        "image (`srun --container-image`) or an apptainer .sif (--slurm-container-runtime); the roots and "
        "the jobs folder are mounted at their own paths.",
    )
    slurm_container_runtime: Literal["pyxis", "apptainer"] = Field(
        default="pyxis", description="How --slurm-container-image runs: pyxis (enroot) or apptainer."
    )
    slurm_requeue: bool = Field(
        default=True,
        description="Let Slurm requeue a preempted or node-failed job (`--requeue`); it resumes from its "
        "last checkpoint.",
    )
    slurm_poll_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often Slurm is asked about the jobs: one `squeue` for all of them.",
    )
    public_url: str | None = Field(
        default=None,
        description="URL trainers post metrics to; default http://<host>:<port> (127.0.0.1 for 0.0.0.0).",
    )
    python: str = Field(default=sys.executable, description="Interpreter that runs `dflash train`.")
    cancel_grace_s: float = Field(
        default=300.0,
        gt=0,
        description="After a cancel's SIGTERM, seconds the trainer gets to checkpoint before SIGKILL.",
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, description="Scheduler period: start queued jobs, collect exits."
    )
    allowed_hosts: str = Field(
        default="",
        description="Without a token: Host names the control plane answers besides loopback, the bound "
        "host and --public-url's (`a.example,10.0.0.5`; `*`: any), against DNS rebinding.",
    )
    insecure: bool = Field(
        default=False,
        description="Listen beyond loopback with no token: anyone who reaches the port may submit, "
        "cancel and read jobs.",
    )
    max_body_bytes: int = Field(default=MIB, gt=0, description="Largest request body (413 beyond).")
    max_metrics_body_bytes: int = Field(
        default=16 * MIB,
        gt=0,
        description="Largest metric POST: the trainer sends up to 500 buffered rows at once after an "
        "outage, and it gives up on a 413 for good.",
    )
    max_streams: int = Field(
        default=64, ge=1, description="Live streams (metric streams, followed logs) open at once; 429 beyond."
    )
    max_streams_per_client: int = Field(
        default=8,
        ge=1,
        description="Live streams one client address may hold open at once (429 beyond); behind a "
        "reverse proxy every user shares its address.",
    )
    max_probed_job_endpoints: int = Field(
        default=16,
        ge=0,
        description="Of the hidden-state services only jobs name (not --hidden-states-endpoints), how "
        "many are health-checked; the others are listed unchecked.",
    )
    max_log_bytes: int = Field(
        default=64 * MIB,
        ge=64 * 1024,
        description="A job log beyond this keeps its newest half (older lines are dropped, with a marker).",
    )

    _agent_tokens: dict[str, str | None] = PrivateAttr(default_factory=dict)  # token -> agent name

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus_from_text(cls, value: Any) -> Any:
        """`0,1,2` (flag or variable) as well as a JSON list; an empty string means no GPU."""
        if isinstance(value, str):
            text = value.strip().strip("[]")
            return [int(part) for part in text.split(",") if part.strip()]
        return value

    @field_validator("gpus")
    @classmethod
    def _gpus_distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(set(value)) != len(value) or any(g < 0 for g in value)):
            raise ValueError(f"--gpus must be distinct indices >= 0, got {value}")
        return value

    @field_validator("slurm_sbatch_args", "slurm_srun_args")
    @classmethod
    def _shell_words(cls, value: str) -> str:
        try:
            shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split {value!r} as a shell would: {exc}") from None
        return value

    @model_validator(mode="after")
    def _slurm_settings_need_slurm(self) -> ControlPlaneSettings:
        given = sorted(n for n in self.model_fields_set if n.startswith("slurm_"))
        if given and self.executor != "slurm":
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise ValueError(f"{flags}: only for --executor slurm (this one's is {self.executor})")
        if self.slurm_venv is not None and self.slurm_container_image is not None:
            raise ValueError("--slurm-venv and --slurm-container-image: give one (an image has its python)")
        return self

    @field_validator("hidden_states_endpoints")
    @classmethod
    def _endpoints_parse(cls, value: str) -> str:
        from services.hidden_states.endpoints import parse_endpoint  # grpc: not for `--help`

        for endpoint in value.split(","):
            if endpoint.strip():
                parse_endpoint(endpoint)  # ValueError names the bad one
        return value

    @field_validator("db")
    @classmethod
    def _db_is_path_or_url(cls, value: str) -> str:
        if "://" in value:
            # Imported here: `dflash --help` reads these fields and should not load SQLAlchemy.
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError, NoSuchModuleError

            try:
                make_url(value).get_dialect()  # parses, and knows the database kind
            except (ArgumentError, NoSuchModuleError, ValueError) as exc:
                # The URL is not repeated: it may hold a password.
                raise ValueError(f"--db is not a usable SQLAlchemy URL: {exc}") from None
        return value

    @model_validator(mode="after")
    def _token_from_file(self) -> ControlPlaneSettings:
        # The file wins over the variable, as for the trainer's --control-plane-token-file.
        if self.token_file is not None:
            self.token = SecretStr(read_token_file(self.token_file, name="--token-file"))
        elif self.token is not None and not self.token.get_secret_value().strip():
            self.token = None  # an empty variable means "no token", not "the empty token"
        if self.agent_token_file is not None:
            if self.token is None:
                raise ValueError(
                    "--agent-token-file needs an admin token as well: give --token-file FILE (or "
                    "$DFLASH_CONTROL_PLANE_TOKEN)"
                )
            self._agent_tokens = read_agent_tokens(self.agent_token_file)
            if self.token.get_secret_value() in self._agent_tokens:
                raise ValueError(f"--agent-token-file {self.agent_token_file} lists the admin token")
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def database_url(self) -> str:
        """`db` as a SQLAlchemy URL (a plain path is a SQLite file)."""
        if "://" in self.db:
            return self.db
        return f"sqlite:///{Path(self.db).expanduser().resolve()}"

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database file, given as a path or a sqlite:/// URL; None for other stores."""
        if "://" not in self.db:
            return Path(self.db).expanduser().resolve()
        from sqlalchemy.engine import make_url

        url = make_url(self.db)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            return Path(url.database).expanduser().resolve()
        return None

    @property
    def resolved_jobs_dir(self) -> Path:
        if self.jobs_dir is not None:
            return self.jobs_dir.expanduser().resolve()
        db = self.sqlite_file
        if db is not None:
            return db.with_name(db.name + ".jobs")
        return Path("dflash-control-plane-jobs").resolve()

    @property
    def own_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def hidden_states_endpoint_list(self) -> list[str]:
        return [e.strip() for e in self.hidden_states_endpoints.split(",") if e.strip()]

    @property
    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token is not None else None

    def credentials(self) -> Credentials:
        """The admin, agent and trainer tokens, as the auth middleware checks them."""
        return Credentials(admin=self.token_value, agents=self._agent_tokens)
