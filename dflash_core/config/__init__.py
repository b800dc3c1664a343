"""Typed job configurations shared by the CLI, the REST API and YAML files.

Every default is written once, here. `dflash_core.config_args` turns these fields (their types,
defaults and descriptions) into argparse flags, so `dflash <cmd> --help` is this package's text.
A command's config is built from sections (one class per concept, with that concept's rules);
its fields stay flat. Cross-field rules run when a config is built and name the flag to change.
"""

from dflash_core.config.base import (
    EMBEDDED_DATA,
    EMBEDDED_VERIFIER,
    IN_PROCESS,
    SELF_DATA,
    JobConfig,
    LayerIds,
)
from dflash_core.config.demo import DemoConfig
from dflash_core.config.hidden_state_transfer import HiddenStateTransfer
from dflash_core.config.hidden_states import GenerateOfflineConfig, ServeHiddenStatesConfig
from dflash_core.config.prepare import PrepareDataConfig
from dflash_core.config.train import TrainConfig

__all__ = [
    "EMBEDDED_DATA",
    "EMBEDDED_VERIFIER",
    "IN_PROCESS",
    "SELF_DATA",
    "DemoConfig",
    "GenerateOfflineConfig",
    "HiddenStateTransfer",
    "JobConfig",
    "LayerIds",
    "PrepareDataConfig",
    "ServeHiddenStatesConfig",
    "TrainConfig",
]
