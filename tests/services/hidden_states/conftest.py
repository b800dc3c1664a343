"""Fixtures for the hidden-state service tests: one tiny verifier saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedModel

from dflash_core.verifier import load_verifier
from tests.factories.verifiers import make_tiny_verifier

# 4 decoder layers, so the service serves the requested ids and N = 4.
NUM_LAYERS = 4
HIDDEN_SIZE = 128


@pytest.fixture(scope="session")
def verifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = make_tiny_verifier(
        tmp_path_factory.mktemp("verifier"),
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=256,
    )
    assert tiny.path is not None
    return tiny.path


@pytest.fixture(scope="session")
def reference_model(verifier_path: Path) -> PreTrainedModel:
    """The same saved verifier loaded by the real loader in float32: what the service must match."""
    model, _ = load_verifier(str(verifier_path), device="cpu")
    return model
