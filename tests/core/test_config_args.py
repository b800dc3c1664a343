"""The CLI flags are generated from the job configs: defaults, YAML, overrides and errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dflash_core.config import PrepareDataConfig, ServeHiddenStatesConfig, TrainConfig
from dflash_core.config_args import (
    ENV_SWITCH,
    RESERVED_ENV_PREFIXES,
    add_config_arguments,
    config_from_args,
    env_name,
)
from services.cli.flags_doc import main as flags_doc_main
from services.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]

# The tutorial's single-GPU training command, verbatim apart from the program name.
TUTORIAL_TRAIN = [
    "--verifier-name-or-path",
    "Qwen/Qwen3-8B",
    "--data-path",
    "./output/dflash_qwen3_8b_sharegpt",
    "--vllm-endpoint",
    "http://localhost:8000/v1",
    "--save-path",
    "./output/dflash_qwen3_8b_sharegpt/checkpoints",
    "--speculator-type",
    "dflash",
    "--block-size",
    "8",
    "--max-anchors",
    "3072",
    "--num-layers",
    "5",
    "--draft-vocab-size",
    "8192",
    "--target-layer-ids",
    "2",
    "18",
    "33",
    "--epochs",
    "5",
    "--lr",
    "3e-4",
    "--total-seq-len",
    "8192",
    "--on-missing",
    "generate",
    "--on-generate",
    "delete",
]

TUTORIAL_PREPARE = [
    "--model",
    "Qwen/Qwen3-8B",
    "--data",
    "sharegpt",
    "--output",
    "./output/dflash_qwen3_8b_sharegpt",
    "--max-samples",
    "5000",
    "--seq-length",
    "8192",
]


def parse(config_cls, argv, environ=None, *, env_layer=True):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_cls)
    environ = {ENV_SWITCH: "1", **(environ or {})} if env_layer else environ or {}
    return config_from_args(config_cls, parser.parse_args(argv), environ=environ)


def test_tutorial_train_command_parses_into_the_config():
    config = parse(TrainConfig, TUTORIAL_TRAIN)
    assert config.target_layer_ids == [2, 18, 33]
    assert config.block_size == 8 and config.max_anchors == 3072 and config.num_layers == 5
    assert config.draft_vocab_size == 8192 and config.lr == pytest.approx(3e-4)
    assert config.vllm_endpoint == ["http://localhost:8000/v1"]
    assert config.on_missing == "generate" and config.on_generate == "delete"


def test_tutorial_prepare_command_parses_into_the_config():
    config = parse(PrepareDataConfig, TUTORIAL_PREPARE)
    assert config.data == ["sharegpt"] and config.max_samples == 5000 and config.seq_length == 8192


def test_flags_left_out_keep_the_config_defaults():
    config = parse(TrainConfig, ["--data-path", "d", "--save-path", "s"])
    assert config == TrainConfig(data_path=Path("d"), save_path=Path("s"))


def test_yaml_sits_between_defaults_and_flags(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("data_path: d\nsave_path: s\nblock_size: 16\nepochs: 2\n")
    config = parse(TrainConfig, ["--config", str(job), "--epochs", "3"])
    assert config.block_size == 16 and config.epochs == 3


def test_bad_values_exit_with_the_flag_named(tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse(TrainConfig, ["--data-path", "d", "--save-path", "s", "--block-size", "1"])
    assert "--block-size" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        parse(TrainConfig, ["--data-path", "d", "--save-path", "s", "--target-layer-ids", "3", "3"])
    assert "--target-layer-ids" in str(exc.value) and "duplicates" in str(exc.value)


def test_unknown_yaml_keys_are_errors(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("data_path: d\nsave_path: s\nblock_sise: 16\n")
    with pytest.raises(SystemExit) as exc:
        parse(TrainConfig, ["--config", str(job)])
    assert "block_sise" in str(exc.value)


def test_every_subcommand_builds_its_parser():
    parser = build_parser()
    args = parser.parse_args(["train", *TUTORIAL_TRAIN])
    assert args.command == "train" and callable(args.run)


def test_readme_flag_tables_are_fresh():
    assert flags_doc_main(["--check", str(REPO / "README.md")]) == 0


# ---------------------------------------------------------------------------- DFLASH_<NAME> variables


def test_environment_sits_between_yaml_and_flags(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("data_path: d\nsave_path: s\nblock_size: 16\nepochs: 2\nlr: 0.001\n")
    environ = {"DFLASH_EPOCHS": "3", "DFLASH_LR": "0.002", "DFLASH_NUM_LAYERS": "2"}
    config = parse(TrainConfig, ["--config", str(job), "--lr", "0.004"], environ)
    assert config.block_size == 16  # YAML, no variable
    assert config.epochs == 3 and config.num_layers == 2  # variables over YAML and defaults
    assert config.lr == pytest.approx(0.004)  # the flag over the variable


def test_environment_lists_bools_and_empty_values():
    environ = {
        "DFLASH_DATA_PATH": "d",
        "DFLASH_SAVE_PATH": "s",
        "DFLASH_TARGET_LAYER_IDS": "2, 18 33",
        "DFLASH_REPORT_TO": "jsonl,tensorboard",
        "DFLASH_HIDDEN_STATES_ENDPOINT": "hidden-states:8000 other:8000",
        "DFLASH_FULL_ATTENTION": "no",
        "DFLASH_SLIDING_WINDOW": "64",
        "DFLASH_RESUME": "0",
        "DFLASH_COMPILE": "Yes",
        "DFLASH_MAX_STEPS": "",  # compose's `${MAX_STEPS:-}`: unset
    }
    config = parse(TrainConfig, [], environ)
    assert config.target_layer_ids == [2, 18, 33] and config.report_to == ["jsonl", "tensorboard"]
    assert config.hidden_states_endpoint == ["hidden-states:8000", "other:8000"]
    assert config.full_attention is False and config.sliding_window == 64
    assert config.resume is False and config.compile is True
    assert config.max_steps is None and config.data_path == Path("d")


def test_environment_sets_the_positional_model_and_the_flag_still_wins():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ServeHiddenStatesConfig, positional=("model",))
    environ = {ENV_SWITCH: "1", "DFLASH_MODEL": "from-env", "DFLASH_PORT": "8123"}
    config = config_from_args(ServeHiddenStatesConfig, parser.parse_args([]), environ=environ)
    assert config.model == "from-env" and config.port == 8123
    config = config_from_args(ServeHiddenStatesConfig, parser.parse_args(["positional"]), environ=environ)
    assert config.model == "positional"


def test_without_the_switch_variables_are_named_in_a_warning_and_ignored(caplog):
    environ = {"DFLASH_EPOCHS": "3", "DFLASH_BLOCK_SIZE": "eight", "DFLASH_CONTROL_PLANE_DB": "x.db"}
    with caplog.at_level("WARNING"):
        config = parse(TrainConfig, ["--data-path", "d", "--save-path", "s"], environ, env_layer=False)
    assert config.epochs == TrainConfig.model_fields["epochs"].default and config.block_size == 8
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "DFLASH_EPOCHS" in warning and "DFLASH_BLOCK_SIZE" in warning and ENV_SWITCH in warning
    assert "DFLASH_CONTROL_PLANE_DB" not in warning  # the control plane's own setting
    for off in ("0", "no", ""):
        assert (
            parse(
                TrainConfig,
                ["--data-path", "d", "--save-path", "s"],
                {**environ, ENV_SWITCH: off},
                env_layer=False,
            ).epochs
            != 3
        )
    assert (
        parse(
            TrainConfig,
            ["--data-path", "d", "--save-path", "s"],
            {"DFLASH_EPOCHS": "3", ENV_SWITCH: "yes"},
            env_layer=False,
        ).epochs
        == 3
    )


def test_bad_environment_values_name_the_variable():
    base = {"DFLASH_DATA_PATH": "d", "DFLASH_SAVE_PATH": "s"}
    with pytest.raises(SystemExit) as exc:
        parse(TrainConfig, [], {**base, "DFLASH_BLOCK_SIZE": "eight"})
    assert "$DFLASH_BLOCK_SIZE" in str(exc.value) and "--block-size" not in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        parse(TrainConfig, [], {**base, "DFLASH_TARGET_LAYER_IDS": "2,x"})
    assert "$DFLASH_TARGET_LAYER_IDS" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        parse(TrainConfig, [], {**base, "DFLASH_RESUME": "maybe"})
    assert "$DFLASH_RESUME" in str(exc.value) and "yes" in str(exc.value)
    # The same bad value given as a flag is reported as the flag.
    with pytest.raises(SystemExit) as exc:
        parse(TrainConfig, ["--block-size", "1"], {**base, "DFLASH_BLOCK_SIZE": "1"})
    assert "--block-size" in str(exc.value)


def test_service_variables_are_never_read_as_job_fields():
    # The control plane's own DFLASH_CONTROL_PLANE_TOKEN_FILE / _URL-like variables and the trainer
    # agent's DFLASH_AGENT_* would otherwise land in TrainConfig.control_plane_*.
    environ = {
        "DFLASH_DATA_PATH": "d",
        "DFLASH_SAVE_PATH": "s",
        "DFLASH_CONTROL_PLANE_TOKEN_FILE": "/run/secrets/token",
        "DFLASH_CONTROL_PLANE_URL": "http://control-plane:8600",
        "DFLASH_CONTROL_PLANE_TOKEN": "secret",
    }
    config = parse(TrainConfig, [], environ)
    assert config.control_plane_token_file is None and config.control_plane_url is None
    assert env_name("control_plane_token_file") is None and env_name("block_size") == "DFLASH_BLOCK_SIZE"


def test_no_job_field_variable_collides_with_a_service_setting():
    """A new job-config field must not spell a variable the control plane or agent already reads."""
    from services.agent.settings import AgentSettings
    from services.control_plane.settings import ControlPlaneSettings

    service_vars = {
        settings.model_config["env_prefix"] + name.upper()
        for settings in (ControlPlaneSettings, AgentSettings)
        for name in settings.model_fields
    }
    assert all(var.startswith(RESERVED_ENV_PREFIXES) for var in service_vars)
    from services.cli.flags_doc import COMMANDS

    job_vars = {env_name(name) for _, config_cls in COMMANDS for name in config_cls.model_fields}
    assert not job_vars & service_vars


def test_help_names_the_variable():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    text = parser.format_help()
    assert "[$DFLASH_TARGET_LAYER_IDS]" in text and "$DFLASH_CONTROL_PLANE_URL" not in text
