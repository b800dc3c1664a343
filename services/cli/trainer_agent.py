"""`dflash trainer-agent`: run the control plane's training jobs on this host's GPUs.

    dflash trainer-agent --control-plane http://control-plane:8600 --gpus 0,1 --work-dir /var/lib/dflash-agent

Start the control plane with `--executor agent`. The agent registers this host's GPUs, claims
queued jobs that fit them, runs `dflash train` for each (torchrun with one rank per GPU when a
job has several), ships the trainers' logs, and heartbeats. A silent agent's jobs are marked
lost and can be resumed on another agent from their last checkpoint, so the checkpoint root
must be storage the agents and the control plane share (a volume mounted at the same path).
Every flag can also be set as DFLASH_AGENT_<FLAG>; the token comes from --token-file or
$DFLASH_CONTROL_PLANE_TOKEN. SIGTERM: the trainers checkpoint, then the agent exits.
"""

from __future__ import annotations

import argparse
import logging

from services.cli.settings_args import add_settings_arguments, settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.agent.settings import AgentSettings

    add_settings_arguments(parser, AgentSettings, title="trainer agent")


def run(args: argparse.Namespace) -> int:
    from services.agent.runner import AgentError, TrainerAgent
    from services.agent.settings import AgentSettings
    from services.trainer.metric_sinks.control_plane import read_token

    settings = settings_from_args(AgentSettings, args)
    if settings is None:
        return 2
    try:
        agent = TrainerAgent(settings, token=read_token(settings.token_file, flag="--token-file"))
        return agent.run()
    except (AgentError, ValueError, OSError) as exc:
        logging.getLogger("dflash.trainer_agent").error("%s", exc)
        return 2
