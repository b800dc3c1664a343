"""Job configs are built from sections: one rule per concept, flat fields, help grouped by section."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from dflash_core.config import (
    DemoConfig,
    GenerateOfflineConfig,
    PrepareDataConfig,
    ServeHiddenStatesConfig,
    TrainConfig,
)
from dflash_core.config_args import add_config_arguments, config_sections

CONFIGS = [PrepareDataConfig, ServeHiddenStatesConfig, GenerateOfflineConfig, TrainConfig, DemoConfig]
REQUIRED = {
    TrainConfig: {"data_path": "d", "save_path": "s"},
    GenerateOfflineConfig: {"data_path": "d", "vllm_endpoint": ["127.0.0.1:1"]},
    ServeHiddenStatesConfig: {},
}


@pytest.mark.parametrize("config_cls", [TrainConfig, ServeHiddenStatesConfig, GenerateOfflineConfig])
@pytest.mark.parametrize("ids, problem", [([], "at least one"), ([3, 3], "duplicates"), ([-1, 2], ">= 0")])
def test_every_config_that_names_layer_ids_checks_them_by_one_rule(config_cls, ids, problem):
    with pytest.raises(ValidationError, match=problem):
        config_cls(**REQUIRED[config_cls], target_layer_ids=ids)
    assert config_cls(**REQUIRED[config_cls], target_layer_ids=[2, 5]).target_layer_ids == [2, 5]


def test_the_transfer_settings_are_one_section_shared_by_train_and_generate_offline():
    shared = {"hidden_states_cache", "inflight_bytes", "streams_per_endpoint", "payload_transport"}
    for config_cls in (TrainConfig, GenerateOfflineConfig):
        (section,) = [names for title, _, names in config_sections(config_cls) if shared & set(names)]
        assert set(section) == shared
        assert config_cls(**REQUIRED[config_cls], payload_transport="grpc").payload_transport == "grpc"


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_every_field_is_in_exactly_one_section_and_each_section_is_a_help_group(config_cls):
    sections = config_sections(config_cls)
    listed = [name for _, _, names in sections for name in names]
    assert sorted(listed) == sorted(config_cls.model_fields)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_cls)
    groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    for title, _, names in sections:
        assert groups[title] == set(names), title


def test_rules_of_different_sections_all_hold_in_the_whole_config():
    base = REQUIRED[TrainConfig]
    with pytest.raises(ValidationError, match="--sliding-window needs --no-full-attention"):
        TrainConfig(**base, sliding_window=64)  # the drafter's section
    with pytest.raises(ValidationError, match="--best-metric tau needs live acceptance"):
        TrainConfig(**base, best_metric="tau")  # the evaluation section
    with pytest.raises(ValidationError, match="--job-id needs --control-plane-url"):
        TrainConfig(**base, job_id="j1")  # the reporting section
    config = TrainConfig(**base, vllm_endpoint=["127.0.0.1:9"])  # the hidden-state section
    assert config.hidden_states_endpoint == ["127.0.0.1:9"]
