"""Tests for dflash_core.checkpoint: speculators config mapping, atomic saves, resume points."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dflash_core import checkpoint as ckpt
from dflash_core.checkpoint import (
    CheckpointWriteError,
    find_resume_point,
    load_checkpoint,
    save_checkpoint,
    update_link,
)
from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.rng_state import capture_rng_state, restore_rng_state
from dflash_core.speculators_config import drafter_config_from_speculators, drafter_config_to_speculators
from tests.factories.testvectors import testvectors_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["A", "B", "C"]

# Keys whose values legitimately differ when we re-serialize a speculators 0.9.0 file.
#   transformers_version: whatever is installed here.
#   max_window_layers: speculators writes Qwen3's default 28; we write the value consistent with
#     layer_types (inert for every reader, because layer_types is always written and wins).
VOLATILE = {"transformers_version", "max_window_layers"}


def _testvector_config(variant: str) -> dict:
    return json.loads((testvectors_dir() / f"drafter_{variant}" / "config.json").read_text())


def _config(**overrides) -> DrafterConfig:
    """The test vectors' drafter B geometry: 2 full-attention Qwen3 layers on a 64-wide verifier."""
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        layer_types=["full_attention"] * 2,
        sliding_window=None,
        sliding_window_non_causal=True,
        block_size=4,
        aux_hidden_state_layer_ids=[1, 3],
        mask_token_id=255,
        vocab_size=256,
        draft_vocab_size=256,
        verifier_name_or_path="verifier",
        verifier_architectures=["Qwen3ForCausalLM"],
    )
    fields.update(overrides)
    return DrafterConfig(**fields)


def test_config_helper_matches_testvector_b():
    assert drafter_config_from_speculators(_testvector_config("B")) == _config()


def _train_a_step(drafter: torch.nn.Module):
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    loss = sum((p.float() ** 2).sum() for p in params)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


# --- config.json -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_testvector_configs_parse_and_reserialize(variant):
    original = _testvector_config(variant)
    config = drafter_config_from_speculators(original)
    written = drafter_config_to_speculators(config)
    assert drafter_config_from_speculators(written) == config  # round trip
    assert set(original) - set(written) == {"auto_map"}  # everything but the config.py pointer
    assert "auto_map" not in written
    inner, inner_written = original["transformer_layer_config"], written["transformer_layer_config"]
    assert set(inner) <= set(inner_written)
    for key in set(inner) - VOLATILE:
        assert inner_written[key] == inner[key], key
    for key in set(original) - VOLATILE - {"auto_map", "transformer_layer_config"}:
        assert written[key] == original[key], key


def test_testvector_attention_semantics():
    a, b, c = (drafter_config_from_speculators(_testvector_config(v)) for v in VARIANTS)
    assert a.layer_types == ["sliding_attention"] * 2 and a.sliding_window == 2048
    assert not a.sliding_window_non_causal and a.layer_is_causal_in_block(0)
    assert b.layer_types == ["full_attention"] * 2 and b.sliding_window is None
    assert b.sliding_window_non_causal and not b.layer_is_causal_in_block(0)
    assert c.sliding_window == 3 and c.layer_window(1) == 3
    assert (a.block_size, a.mask_token_id, a.aux_hidden_state_layer_ids) == (4, 255, [1, 3])
    assert (a.vocab_size, a.draft_vocab_size, a.verifier_name_or_path) == (256, 256, "verifier")


def test_config_carries_every_design_key():
    config = _config(verifier_name_or_path="Qwen/Qwen3-8B", verifier_architectures=["Qwen3ForCausalLM"])
    d = drafter_config_to_speculators(config, dtype=torch.bfloat16)
    assert d["architectures"] == ["DFlashDraftModel"]
    assert d["speculators_model_type"] == "dflash" and d["speculators_version"]
    assert d["aux_hidden_state_layer_ids"] == [1, 3]  # our ids, unshifted (vLLM subtracts 1 itself)
    assert (d["mask_token_id"], d["block_size"], d["draft_vocab_size"]) == (255, 4, 256)
    assert d["target_hidden_size"] is None and d["sample_from_anchor"] is False
    assert d["sliding_window_non_causal"] is True and d["dtype"] == "bfloat16"
    spec = d["speculators_config"]
    assert spec["algorithm"] == "dflash"
    assert spec["proposal_methods"][0]["proposal_type"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 3
    assert spec["verifier"] == {"name_or_path": "Qwen/Qwen3-8B", "architectures": ["Qwen3ForCausalLM"]}
    inner = d["transformer_layer_config"]
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_parameters",
        "rope_theta",
        "max_position_embeddings",
        "layer_types",
        "sliding_window",
        "use_sliding_window",
        "vocab_size",
        "hidden_act",
        "attention_bias",
        "tie_word_embeddings",
    ):
        assert key in inner, key
    assert inner["model_type"] == "qwen3" and inner["attention_bias"] is False
    assert inner["tie_word_embeddings"] is False
    assert inner["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    # The inner dict is a valid transformers Qwen3 config (what speculators and vLLM build from it).
    from transformers import Qwen3Config

    built = Qwen3Config(**inner)
    assert built.layer_types == config.layer_types and built.rope_parameters["rope_theta"] == 10000.0
    assert json.loads(json.dumps(d)) == d  # plain JSON


def test_full_attention_is_always_written_bidirectional(caplog):
    # speculators trains full layers bidirectionally whatever the flag says; vLLM 0.32 reads the flag
    # as a global causal switch, so `false` here would serve a bidirectional drafter causally.
    config = _config(sliding_window_non_causal=False)
    with caplog.at_level(logging.INFO, logger="dflash_core.speculators_config"):
        d = drafter_config_to_speculators(config)
    assert d["sliding_window_non_causal"] is True
    assert "bidirectional" in caplog.text
    causal = _config(
        layer_types=["sliding_attention"] * 2, sliding_window=2048, sliding_window_non_causal=False
    )
    assert drafter_config_to_speculators(causal)["sliding_window_non_causal"] is False


def test_rope_scaling_round_trip():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    config = _config(rope_theta=1_000_000.0, rope_scaling=scaling)
    d = drafter_config_to_speculators(config)
    assert d["transformer_layer_config"]["rope_parameters"] == {"rope_theta": 1_000_000.0, **scaling}
    assert drafter_config_from_speculators(d) == config


def test_old_or_foreign_configs_get_logged_defaults(caplog):
    d = drafter_config_to_speculators(
        _config(layer_types=["sliding_attention"] * 2, sliding_window=2048, sliding_window_non_causal=False)
    )
    d["transformer_layer_config"]["max_window_layers"] = 28  # what speculators writes
    del d["sliding_window_non_causal"]
    del d["transformer_layer_config"]["layer_types"]
    with caplog.at_level(logging.INFO, logger="dflash_core.speculators_config"):
        config = drafter_config_from_speculators(d)
    assert config.sliding_window_non_causal is False  # speculators' default
    assert config.layer_types == ["full_attention"] * 2  # Qwen3's rule: max_window_layers 28 > 2 layers
    assert "sliding_window_non_causal" in caplog.text and "layer_types" in caplog.text
    with pytest.raises(ValueError, match="speculators_model_type"):
        drafter_config_from_speculators({**d, "speculators_model_type": "eagle3"})
    with pytest.raises(ValueError, match="sample_from_anchor"):
        drafter_config_from_speculators({**d, "sample_from_anchor": True})


# --- save / load -----------------------------------------------------------------------------


def test_round_trip_weights_optimizer_scheduler_state(tmp_path):
    config = _config()
    torch.manual_seed(0)
    drafter = DFlashDrafter(config)
    optimizer, scheduler = _train_a_step(drafter)
    training_state = {
        "epoch": 1,
        "step_in_epoch": 5,
        "global_step": 12,
        "best_val_loss": float("inf"),
        "history": [{"epoch": 0, "val/loss": 2.5}],
        "data": {"seed": 0, "num_train_rows": 40},
    }
    path = save_checkpoint(
        tmp_path / "1",
        drafter_state=drafter.state_dict(),
        config=config,
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        training_state=training_state,
    )
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [
            "config.json",
            "model.safetensors",
            "optimizer_state_dict.pt",
            "scheduler_state_dict.pt",
            "training_state.json",
        ]
    )
    loaded = load_checkpoint(path, map_location="cpu")
    assert loaded.config == config
    state = drafter.state_dict()
    assert set(loaded.state_dict) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded.state_dict[name], tensor), name
    fresh = DFlashDrafter(config)
    fresh.load_state_dict(loaded.state_dict, strict=True)

    fresh_optimizer, fresh_scheduler = _train_a_step(DFlashDrafter(config))
    fresh_optimizer.load_state_dict(loaded.optimizer_state)
    fresh_scheduler.load_state_dict(loaded.scheduler_state)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch
    for group_state, expected in zip(
        loaded.optimizer_state["state"].values(), optimizer.state_dict()["state"].values(), strict=True
    ):
        assert torch.equal(group_state["exp_avg"], expected["exp_avg"])

    saved = loaded.training_state
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 5, 12)
    assert saved["best_val_loss"] is None  # JSON has no Infinity
    assert saved["history"] == training_state["history"] and saved["data"] == training_state["data"]
    assert saved["format_version"] == ckpt.TRAINING_STATE_VERSION


def test_tensor_names_shapes_and_files_match_speculators(tmp_path):
    config = _config()
    drafter = DFlashDrafter(config)
    path = save_checkpoint(tmp_path / "0", drafter_state=drafter.state_dict(), config=config)
    reference = testvectors_dir() / "drafter_B" / "model.safetensors"
    with safe_open(path / "model.safetensors", "pt") as ours, safe_open(reference, "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())  # 25 tensors, no `model.` prefix, no embed/lm_head
        for name in theirs.keys():  # noqa: SIM118 - safe_open has no __iter__
            assert ours.get_slice(name).get_shape() == theirs.get_slice(name).get_shape(), name
    assert not (path / "training_state.json").exists()  # an export: no training files
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"


def test_full_vocab_never_saves_embedding_or_head(tmp_path):
    config = _config()
    state = dict(DFlashDrafter(config).state_dict())
    state["embed_tokens.weight"] = torch.zeros(config.vocab_size, config.hidden_size)
    state["lm_head.weight"] = torch.zeros(config.vocab_size, config.hidden_size)
    path = save_checkpoint(tmp_path / "0", drafter_state=state, config=config)
    with safe_open(path / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert not names & {"embed_tokens.weight", "lm_head.weight", "d2t", "t2d"}


def test_reduced_vocab_writes_d2t_t2d_and_lm_head_in_the_given_dtype(tmp_path):
    config = _config(draft_vocab_size=100)
    drafter = DFlashDrafter(config)
    t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
    chosen = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(0))[:100].sort().values
    t2d[chosen] = True
    d2t = chosen - torch.arange(100)  # offsets: target id = i + d2t[i]
    drafter.set_draft_vocab(
        d2t=d2t, t2d=t2d, verifier_lm_head=torch.randn(config.vocab_size, config.hidden_size)
    )
    path = save_checkpoint(
        tmp_path / "0", drafter_state=drafter.state_dict(), config=config, dtype=torch.bfloat16
    )
    with safe_open(path / "model.safetensors", "pt") as handle:
        assert {"d2t", "t2d", "lm_head.weight"} <= set(handle.keys())
        assert handle.get_tensor("d2t").dtype == torch.int64 and torch.equal(handle.get_tensor("d2t"), d2t)
        assert handle.get_tensor("t2d").dtype == torch.bool and torch.equal(handle.get_tensor("t2d"), t2d)
        assert handle.get_slice("lm_head.weight").get_shape() == [100, config.hidden_size]
        assert handle.get_tensor("fc.weight").dtype == torch.bfloat16
    written = json.loads((path / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and written["draft_vocab_size"] == 100
    assert written["transformer_layer_config"]["vocab_size"] == config.vocab_size
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.state_dict["d2t"] + torch.arange(100), chosen)


def test_prefixed_or_incomplete_states_are_refused(tmp_path):
    config = _config()
    state = DFlashDrafter(config).state_dict()
    with pytest.raises(CheckpointWriteError, match=r"`model\.`-prefixed"):
        save_checkpoint(
            tmp_path / "0", drafter_state={f"model.{k}": v for k, v in state.items()}, config=config
        )
    with pytest.raises(CheckpointWriteError, match="d2t"):
        save_checkpoint(tmp_path / "0", drafter_state=state, config=_config(draft_vocab_size=100))
    assert not (tmp_path / "0").exists()


def test_speculators_checkpoint_loads(caplog):
    with caplog.at_level(logging.INFO, logger="dflash_core.checkpoint"):
        loaded = load_checkpoint(testvectors_dir() / "drafter_C")
    assert loaded.config.sliding_window == 3 and len(loaded.state_dict) == 25
    assert loaded.optimizer_state is None and loaded.scheduler_state is None
    assert loaded.training_state["global_step"] == 0  # defaults for a weights-only folder
    DFlashDrafter(loaded.config).load_state_dict(loaded.state_dict, strict=True)


def test_old_training_state_gets_defaults(tmp_path, caplog):
    config = _config()
    path = save_checkpoint(
        tmp_path / "0",
        drafter_state=DFlashDrafter(config).state_dict(),
        config=config,
        training_state={"epoch": 0},
    )
    (path / "training_state.json").write_text(json.dumps({"epoch": 2, "step": 17}))  # an early file
    with caplog.at_level(logging.INFO, logger="dflash_core.checkpoint"):
        state = load_checkpoint(path).training_state
    assert state["epoch"] == 2 and state["global_step"] == 17
    assert (
        state["step_in_epoch"] == 0
        and state["history"] == []
        and state["data"] == {}
        and state["rng"] is None
    )
    assert "step_in_epoch" in caplog.text and "older format" in caplog.text


def test_rng_state_round_trips_through_json(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = json.loads(json.dumps(capture_rng_state()))
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    assert isinstance(state["torch"], str)  # base64, not a pickled object


# --- atomicity -------------------------------------------------------------------------------


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_unserializable_training_state_leaves_nothing(tmp_path):
    config = _config()
    with pytest.raises(CheckpointWriteError, match=re.escape(str(tmp_path / "3"))) as info:
        save_checkpoint(
            tmp_path / "3",
            drafter_state=DFlashDrafter(config).state_dict(),
            config=config,
            training_state={"epoch": 3, "oops": object()},
        )
    assert isinstance(info.value.__cause__, TypeError)
    assert not (tmp_path / "3").exists() and _leftovers(tmp_path) == []


def test_disk_full_mid_save_leaves_nothing(tmp_path, monkeypatch):
    config = _config()
    state = DFlashDrafter(config).state_dict()
    real_torch_save = ckpt._torch_save

    def full_disk(obj, path):
        real_torch_save(obj, path)  # a file half the checkpoint is already written ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... when the disk fills up

    monkeypatch.setattr(ckpt, "_torch_save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(
            tmp_path / "2",
            drafter_state=state,
            config=config,
            optimizer_state={"state": {}},
            training_state={"epoch": 2},
        )
    assert info.value.errno == errno.ENOSPC
    assert str(tmp_path / "2") in str(info.value) and "disk space" in str(info.value)
    assert not (tmp_path / "2").exists() and _leftovers(tmp_path) == []
    assert find_resume_point(tmp_path) is None


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = _config()
    state = DFlashDrafter(config).state_dict()
    first = save_checkpoint(
        tmp_path / "0", drafter_state=state, config=config, training_state={"global_step": 1}
    )
    update_link(tmp_path, "latest", first)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(ckpt.TEMP_PREFIX) and Path(dst).name == "0":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointWriteError):
        save_checkpoint(tmp_path / "0", drafter_state=state, config=config, training_state={"global_step": 2})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "0").training_state["global_step"] == 1  # the old one is back
    assert _leftovers(tmp_path) == []
    assert find_resume_point(tmp_path) == (tmp_path / "0").resolve()


def test_resaving_a_folder_replaces_it(tmp_path):
    config = _config()
    state = DFlashDrafter(config).state_dict()
    save_checkpoint(
        tmp_path / "0",
        drafter_state=state,
        config=config,
        training_state={"global_step": 1},
        optimizer_state={"state": {}},
    )
    save_checkpoint(tmp_path / "0", drafter_state=state, config=config, training_state={"global_step": 2})
    assert load_checkpoint(tmp_path / "0").training_state["global_step"] == 2
    assert not (tmp_path / "0" / "optimizer_state_dict.pt").exists()  # nothing stale survives
    assert _leftovers(tmp_path) == []


# --- links and resume ------------------------------------------------------------------------


def test_update_link_is_relative_and_replaces(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "1").mkdir()
    link = update_link(tmp_path, "latest", tmp_path / "0")
    assert os.readlink(link) == "0" and link.resolve() == (tmp_path / "0").resolve()
    update_link(tmp_path, "latest", tmp_path / "1")
    assert os.readlink(link) == "1"
    assert _leftovers(tmp_path) == []
    (tmp_path / "checkpoint_best").mkdir()
    with pytest.raises(FileExistsError, match="not a symlink"):
        update_link(tmp_path, "checkpoint_best", tmp_path / "1")


def test_find_resume_point(tmp_path):
    assert find_resume_point(tmp_path / "missing") is None
    assert find_resume_point(tmp_path) is None
    config = _config()
    state = DFlashDrafter(config).state_dict()
    for epoch in range(3):
        save_checkpoint(
            tmp_path / str(epoch),
            drafter_state=state,
            config=config,
            training_state={"epoch": epoch, "global_step": 10 * (epoch + 1)},
        )
    update_link(tmp_path, "latest", tmp_path / "1")
    update_link(tmp_path, "checkpoint_best", tmp_path / "0")
    assert find_resume_point(tmp_path) == (tmp_path / "1").resolve()  # latest wins when intact

    # A crash mid-save leaves a complete-looking hidden temp folder: never a candidate.
    crashed = tmp_path / f"{ckpt.TEMP_PREFIX}3-deadbeef"
    crashed.mkdir()
    for name in ("config.json", "model.safetensors", "training_state.json"):
        (crashed / name).write_text(json.dumps({"global_step": 999}))
    (tmp_path / "latest").unlink()
    os.symlink("gone", tmp_path / "latest")  # dangling
    assert find_resume_point(tmp_path) == (tmp_path / "2").resolve()  # newest complete by global_step
    # An export (no training_state.json) is not a resume point either.
    save_checkpoint(tmp_path / "9", drafter_state=state, config=config)
    assert find_resume_point(tmp_path) == (tmp_path / "2").resolve()
