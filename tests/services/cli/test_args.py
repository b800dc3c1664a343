"""The CLI flags are generated from the job configs: defaults, YAML, overrides and errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dflash_core.config import PrepareDataConfig, TrainConfig
from services.cli.args import add_config_arguments, config_from_args
from services.cli.flags_doc import main as flags_doc_main
from services.cli.main import build_parser

REPO = Path(__file__).resolve().parents[3]

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


def parse(config_cls, argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_cls)
    return config_from_args(config_cls, parser.parse_args(argv))


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
