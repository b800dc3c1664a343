"""The agent executor: `dflash trainer-agent` processes claim jobs from a control plane over HTTP.

Agents here are real processes on 127.0.0.1 running real CPU trainers. The GPU bookkeeping tests
speak the agent protocol straight over HTTP (as an agent would), with made-up GPU indices: no
trainer runs there. Where a test needs an agent or a trainer to fall silent, it SIGSTOPs it (a
frozen host), so nothing depends on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dflash_core.config_args import ENV_SWITCH
from services.control_plane import agents
from tests.services.control_plane.conftest import tiny_job
from tests.services.control_plane.harness import ROOT, TOKEN, wait_for, write_agent_tokens

HEARTBEAT_S = 0.3


class AgentProcess:
    """`dflash trainer-agent` in its own process; output kept in a file for the failure message."""

    def __init__(self, url: str, *, name: str, work_dir: Path, gpus: str = "none", token: str | None = None):
        self.name = name
        self.work_dir = work_dir
        self._output = tempfile.NamedTemporaryFile(mode="w+", suffix=f"-{name}.log", delete=False)  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("DFLASH_")}
        if token is not None:
            env["DFLASH_CONTROL_PLANE_TOKEN"] = token
        # Flags and DFLASH_AGENT_* variables both configure it: the name and GPUs come from the
        # environment, as in docker compose. A job-config variable on the agent's host must not
        # reach the trainers (it would override every job's own config).
        env.update(DFLASH_AGENT_NAME=name, DFLASH_AGENT_GPUS=gpus, DFLASH_MAX_STEPS="1", **{ENV_SWITCH: "1"})
        command = [
            sys.executable, "-m", "services.cli.main", "trainer-agent",
            "--control-plane", url, "--work-dir", str(work_dir),
            "--heartbeat-interval-s", str(HEARTBEAT_S), "--stop-grace-s", "120",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self) -> str:
        self._output.seek(0)
        return self._output.read()

    def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        return self.process.wait(timeout=180)


@pytest.fixture
def start_agent(tmp_path):
    agents: list[AgentProcess] = []

    def start(url: str, name: str, **kwargs) -> AgentProcess:
        agent = AgentProcess(url, name=name, work_dir=tmp_path / f"agent-{name}", **kwargs)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()


def agent_server(start_server, workspace, **overrides):
    settings = {
        "data_root": workspace["root"],
        "executor": "agent",
        "max_concurrent_jobs": 8,
        "agent_heartbeat_interval_s": HEARTBEAT_S,
        "agent_lost_after_s": 3.0,
        **overrides,
    }
    return start_server(**settings)


def log_of(server, job_id: str) -> str:
    return server.client.get(f"/v1/jobs/{job_id}/logs", params={"lines": 10_000}).text


def agents_of(server) -> dict[str, dict]:
    return {a["name"]: a for a in server.client.get("/v1/agents").json()}


# ---------------------------------------------------------------------- real agents, real trainers
def test_two_agents_each_claim_and_run_a_job_to_success(start_server, workspace, start_agent, tmp_path):
    # agent-one has a token of its own; agent-two the admin token, as in the single-token setup.
    agent_token = "cp-agent-one-token-60c2f1"
    tokens = write_agent_tokens(tmp_path / "agent_tokens", {"agent-one": agent_token})
    server = agent_server(start_server, workspace, token=TOKEN, agent_token_file=tokens)
    jobs = [server.submit(tiny_job(workspace, epochs=1, name=f"job-{i}"))["id"] for i in range(2)]
    one = start_agent(server.url, "agent-one", token=agent_token)
    two = start_agent(server.url, "agent-two", token=TOKEN)
    wait_for(lambda: len(agents_of(server)) == 2, what="both agents to register")

    done = [server.wait_state(jid, "succeeded", "failed") for jid in jobs]
    assert [d["state"] for d in done] == ["succeeded", "succeeded"], [d["reason"] for d in done]
    # Each agent runs one job at a time (--max-jobs 1), so the two jobs went to different agents.
    assert {d["agent_id"] for d in done} == {"agent-one", "agent-two"}
    assert all(d["executor"] == "agent" and d["exit_code"] == 0 for d in done)
    assert all(d["epoch"] == 1.0 and d["step"] > 1 for d in done)  # not cut short by DFLASH_MAX_STEPS
    for d in done:
        # The trainer reported its metrics itself (with the trainer token its agent got in the
        # claim: an agent's token could not) and its output reached the job's log on the control
        # plane (shipped by the agent), no token included.
        assert server.metric_rows(d["id"])
        log = log_of(server, d["id"])
        assert f"claimed by agent {d['agent_id']}" in log and "trained " in log, log
        assert "exited with status 0: job succeeded" in log
        trainer_token = server.settings.credentials().trainer_token(d["id"], 1)
        assert all(token not in log for token in (TOKEN, agent_token, trainer_token))
        assert (Path(d["config"]["save_path"]) / "latest").exists()
    listed = agents_of(server)
    assert {a["state"] for a in listed.values()} == {"live"} and all(a["jobs"] == [] for a in listed.values())

    assert one.stop() == 0 and two.stop() == 0  # SIGTERM with nothing running: a clean goodbye
    assert {a["state"] for a in agents_of(server).values()} == {"gone"}
    assert all(token not in one.output() + two.output() for token in (TOKEN, agent_token))


def test_a_lost_agents_job_is_resumed_on_another_agent_from_its_checkpoint(
    start_server, workspace, start_agent
):
    server = agent_server(start_server, workspace)
    jid = server.submit(tiny_job(workspace, epochs=4, name="long"))["id"]
    first = start_agent(server.url, "agent-first")
    server.wait_state(jid, "running")

    def checkpointed() -> str | None:
        return server.client.get(f"/v1/jobs/{jid}/checkpoints").json()["latest"]

    wait_for(checkpointed, what="the first epoch's checkpoint")
    trainer = server.job(jid)["pid"]  # the launcher on the agent's host: its process group
    # The host freezes: agent and trainer both fall silent.
    os.killpg(trainer, signal.SIGSTOP)
    first.process.send_signal(signal.SIGSTOP)
    try:
        lost = server.wait_state(jid, "failed")
        assert lost["reason"].startswith("lost: trainer agent agent-first sent no heartbeat"), lost["reason"]
        assert agents_of(server)["agent-first"]["state"] == "lost"

        # Resumed, it is claimed by the other agent and continues from the last checkpoint.
        assert server.client.post(f"/v1/jobs/{jid}/resume").json()["attempt"] == 2
        start_agent(server.url, "agent-second")
        second_run = wait_for(
            lambda: server.job(jid)["agent_id"] == "agent-second" and server.job(jid),
            what="the second agent to claim the resumed job",
        )
        assert second_run["attempt"] == 2
    finally:
        # The frozen host comes back: its agent is told to kill the trainer it still holds for a
        # job that is no longer its own, before that trainer writes into the shared save_path.
        first.process.send_signal(signal.SIGCONT)
        os.killpg(trainer, signal.SIGCONT)
    wait_for(lambda: agents_of(server)["agent-first"]["state"] == "live", what="the first agent to be back")
    wait_for(lambda: not Path(f"/proc/{trainer}").exists(), what="the stale trainer to be killed")
    assert "says stop now; SIGKILL" in first.output()

    done = server.wait_state(jid, "succeeded")
    assert done["agent_id"] == "agent-second" and done["attempt"] == 2
    second = [r for r in server.metric_rows(jid) if r["attempt"] == 2]
    assert second and min(r["step"] for r in second) > 0  # continued, not restarted
    assert "resumed from" in log_of(server, jid)


def test_an_agent_restarted_under_its_name_readopts_its_running_trainer(
    start_server, workspace, start_agent, tmp_path
):
    agent_token = "cp-agent-r-token-d81b37"
    tokens = write_agent_tokens(tmp_path / "agent_tokens", {"agent-r": agent_token})
    server = agent_server(
        start_server, workspace, agent_lost_after_s=60.0, token=TOKEN, agent_token_file=tokens
    )
    jid = server.submit(tiny_job(workspace, epochs=3))["id"]
    agent = start_agent(server.url, "agent-r", token=agent_token)
    server.wait_state(jid, "running")
    trainer = server.job(jid)["pid"]
    os.killpg(trainer, signal.SIGSTOP)  # holds still while its agent is replaced
    try:
        # The state the next agent adopts from names the trainer, never its token.
        state = (agent.work_dir / "agent_state.json").read_text()
        assert jid in state and server.settings.credentials().trainer_token(jid, 1) not in state
        agent.process.kill()  # the agent dies; its trainer (own session) keeps going
        agent.process.wait()
        again = start_agent(server.url, "agent-r", token=agent_token)
        wait_for(
            lambda: "re-adopted its trainer" in again.output(), what="the new agent to adopt the trainer"
        )
    finally:
        os.killpg(trainer, signal.SIGCONT)
    done = server.wait_state(jid, "succeeded")
    assert done["attempt"] == 1 and done["pid"] == trainer and done["exit_code"] == 0


def test_sigterm_to_an_agent_checkpoints_its_trainer_and_the_job_can_resume(
    start_server, workspace, start_agent
):
    server = agent_server(start_server, workspace)
    jid = server.submit(tiny_job(workspace, epochs=4))["id"]
    agent = start_agent(server.url, "agent-t")
    server.wait_state(jid, "running")
    wait_for(lambda: server.job(jid)["step"], what="a training step to be reported")
    assert agent.stop() == 0
    stopped = server.wait_state(jid, "failed")
    assert stopped["exit_code"] == 143 and "the trainer agent was stopping" in stopped["reason"]
    assert agents_of(server)["agent-t"]["state"] == "gone"
    listing = server.client.get(f"/v1/jobs/{jid}/checkpoints").json()
    assert listing["latest"] is not None  # the trainer checkpointed on the way down

    server.client.post(f"/v1/jobs/{jid}/resume")
    start_agent(server.url, "agent-u")
    assert server.wait_state(jid, "succeeded")["agent_id"] == "agent-u"


# ---------------------------------------------------------------------- the protocol over HTTP
def register(server, name: str, gpus: list[int], max_jobs: int = 8) -> dict:
    response = server.client.post("/v1/agents", json={"name": name, "gpus": gpus, "max_jobs": max_jobs})
    assert response.status_code == 201, response.text
    return response.json()


def claim(server, name: str) -> dict | None:
    response = server.client.post(f"/v1/agents/{name}/claim")
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else None


def test_claims_never_give_one_gpu_to_two_jobs(start_server, workspace):
    server = agent_server(start_server, workspace, agent_lost_after_s=600.0)
    register(server, "a", [0, 1])
    register(server, "b", [0])
    ids = [server.submit(tiny_job(workspace, gpus=g, name=f"g{g}"))["id"] for g in (2, 1, 1, 1)]
    first = claim(server, "b")  # b cannot take the 2-GPU job: it gets the first 1-GPU one
    assert first["id"] == ids[1] and first["gpus"] == [0]
    assert claim(server, "b") is None  # its only GPU is busy
    big = claim(server, "a")
    assert big["id"] == ids[0] and big["gpus"] == [0, 1]
    assert big["config"]["nproc"] == 2 and server.job(ids[0])["state"] == "starting"
    assert claim(server, "a") is None  # both of a's GPUs are busy
    # GPU indices are per host: a's GPU 0 and b's GPU 0 are different GPUs.
    assert sorted(a["gpus_busy"] for a in agents_of(server).values()) == [[0], [0, 1]]

    # The 2-GPU job ends (its agent reports the exit): a's GPUs are free again.
    hb = {"running": {}, "exits": [{"job_id": ids[0], "exit_code": 0}]}
    assert server.client.post("/v1/agents/a/heartbeat", json=hb).json() == {"cancel": [], "kill": []}
    assert server.job(ids[0])["state"] == "succeeded"
    assert [claim(server, "a")["gpus"], claim(server, "a")["gpus"]] == [[0], [1]]
    assert claim(server, "a") is None


def test_heartbeats_carry_cancels_and_settle_jobs_an_agent_no_longer_runs(start_server, workspace):
    server = agent_server(start_server, workspace, agent_lost_after_s=600.0, cancel_grace_s=600.0)
    register(server, "a", [])
    first, second = (server.submit(tiny_job(workspace))["id"] for _ in range(2))
    assert claim(server, "a")["id"] == first and claim(server, "a")["id"] == second
    beat = {"running": {first: 4242, second: 4343}}
    assert server.client.post("/v1/agents/a/heartbeat", json=beat).json() == {"cancel": [], "kill": []}
    assert server.job(first)["pid"] == 4242

    server.client.post(f"/v1/jobs/{first}/cancel")
    orders = server.client.post("/v1/agents/a/heartbeat", json=beat).json()
    assert orders == {"cancel": [first], "kill": []}
    # The second job is missing from the next heartbeat: the agent lost it (a restart).
    orders = server.client.post("/v1/agents/a/heartbeat", json={"running": {first: 4242}}).json()
    gone = server.job(second)
    assert gone["state"] == "failed" and "no longer runs its trainer" in gone["reason"]
    # A trainer the agent still runs for a job that is not its own any more is killed.
    orders = server.client.post("/v1/agents/a/heartbeat", json={"running": {first: 4242, second: 77}}).json()
    assert orders == {"cancel": [first], "kill": [second]}
    exit_143 = {"running": {}, "exits": [{"job_id": first, "exit_code": 143}]}
    server.client.post("/v1/agents/a/heartbeat", json=exit_143)
    assert server.job(first)["state"] == "cancelled"


def test_a_finished_jobs_log_closes_after_its_agents_last_lines(start_server, workspace, monkeypatch):
    server = agent_server(start_server, workspace, agent_lost_after_s=600.0)
    register(server, "a", [])
    job_id = server.submit(tiny_job(workspace))["id"]
    assert claim(server, "a")["id"] == job_id
    upload = f"/v1/agents/a/jobs/{job_id}/log"
    assert server.client.post(upload, content=b"step 1\n").status_code == 204
    ended = {"running": {}, "exits": [{"job_id": job_id, "exit_code": 0}]}
    server.client.post("/v1/agents/a/heartbeat", json=ended).raise_for_status()
    assert server.client.post(upload, content=b"last line\n").status_code == 204  # sent after the exit
    monkeypatch.setattr(agents, "LATE_LOG_S", 0.0)  # long after the job ended
    late = server.client.post(upload, content=b"much later\n")
    assert late.status_code == 409 and "succeeded" in late.json()["detail"]
    log = server.client.get(f"/v1/jobs/{job_id}/logs").text
    assert "last line" in log and "much later" not in log


def test_agent_routes_need_the_token_and_a_registered_agent(start_server, workspace):
    server = agent_server(start_server, workspace, token=TOKEN)
    anonymous = server.client.post("/v1/agents", json={"name": "x"}, headers={"Authorization": ""})
    assert anonymous.status_code == 401
    wrong = server.client.post("/v1/agents", json={"name": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    unknown = server.client.post("/v1/agents/ghost/heartbeat", json={})
    assert unknown.status_code == 404 and "register first" in unknown.json()["detail"]
    bad = server.client.post("/v1/agents", json={"name": "a b", "gpus": [0, 0]})
    assert bad.status_code == 422 and {e["loc"][-1] for e in bad.json()["detail"]} == {"name", "gpus"}


def test_a_local_control_plane_has_no_agent_routes(start_server):
    server = start_server()
    response = server.client.get("/v1/agents")
    assert response.status_code == 404 and "--executor local" in response.json()["detail"]


def test_agents_are_not_lost_for_the_time_the_control_plane_was_down(start_server, workspace):
    settings = {"agent_lost_after_s": 4.0, "agent_heartbeat_interval_s": 0.2}
    server = agent_server(start_server, workspace, **settings)
    register(server, "a", [])
    jid = server.submit(tiny_job(workspace))["id"]
    claim(server, "a")
    server.stop()
    time.sleep(4.5)  # down for longer than lost_after_s: agents could not reach it meanwhile
    again = agent_server(start_server, workspace, **settings)  # the same SQLite file
    again.wait_ticks(2)
    assert again.job(jid)["state"] == "starting" and agents_of(again)["a"]["state"] == "live"
    # ...but silence after the restart counts as usual.
    again.wait_state(jid, "failed", timeout_s=60)
    assert agents_of(again)["a"]["state"] == "lost"
