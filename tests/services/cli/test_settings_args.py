"""The services' settings as flags: a secret field is never one, a bad value is told and exits 2."""

from __future__ import annotations

import argparse

import pytest

from services.agent.settings import AgentSettings
from services.cli import control_plane, trainer_agent
from services.cli.main import main
from services.control_plane.settings import ControlPlaneSettings


@pytest.mark.parametrize(
    ("command", "settings_cls", "secret"),
    [
        # The admin token would show in `ps` as a flag: --token-file or $DFLASH_CONTROL_PLANE_TOKEN give it.
        (control_plane, ControlPlaneSettings, {"token"}),
        (trainer_agent, AgentSettings, set()),
    ],
)
def test_every_setting_but_a_secret_is_a_flag(command, settings_cls, secret):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    flags = {action.dest for action in parser._actions}
    assert set(settings_cls.model_fields) - flags == secret


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["control-plane", "--port", "0"], "port"),
        (["trainer-agent", "--control-plane", "ftp://x"], "--control-plane must be an http(s) URL"),
    ],
)
def test_bad_settings_are_told_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().out
