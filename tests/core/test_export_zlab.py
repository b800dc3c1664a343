"""Export to the z-lab / SGLang DFlash layout and back (dflash_core.export_zlab, `dflash export`).

The round trip must give back the very same config.json and tensors, and the z-lab layer ids
must name the same hidden-state planes ours do, as z-lab reads them: `output_hidden_states[id + 1]`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dflash_core.capture import capture_hidden_states
from dflash_core.checkpoint import load_checkpoint, save_checkpoint
from dflash_core.export_zlab import (
    ExportError,
    detect_layout,
    export_checkpoint,
    from_zlab_layer_ids,
    to_zlab_layer_ids,
)
from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from services.cli.main import main as dflash
from tests.factories.verifiers import make_tiny_verifier


def drafter_config(**overrides) -> DrafterConfig:
    values: dict = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rope_theta=5e5, block_size=8,
        aux_hidden_state_layer_ids=[1, 3, 4],
        mask_token_id=399, vocab_size=400, draft_vocab_size=400, verifier_name_or_path="org/verifier-4l",
        verifier_architectures=["Qwen3ForCausalLM"],
    )  # fmt: skip
    values.update(overrides)
    return DrafterConfig(**values)


def saved_drafter(
    folder: Path, config: DrafterConfig, *, dtype: torch.dtype | None = None, seed: int = 0
) -> Path:
    torch.manual_seed(seed)
    drafter = DFlashDrafter(config)
    for param in drafter.parameters():  # non-trivial norm gains too, so a dropped or swapped tensor shows
        torch.nn.init.normal_(param, std=0.5)
    return save_checkpoint(folder, drafter_state=drafter.state_dict(), config=config, dtype=dtype)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
VARIANTS = {
    "full attention, float32": (drafter_config(), None),
    "sliding causal, bfloat16": (
        drafter_config(
            layer_types=["sliding_attention"] * 2, sliding_window=64, sliding_window_non_causal=False
        ),
        torch.bfloat16,
    ),
    "sliding bidirectional, llama3 rope": (
        drafter_config(
            layer_types=["sliding_attention"] * 2,
            sliding_window=16,
            sliding_window_non_causal=True,
            rope_scaling=LLAMA3_ROPE,
        ),
        None,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ours_to_zlab_to_ours_gives_identical_config_and_tensors(tmp_path, variant):
    config, dtype = VARIANTS[variant]
    ours = saved_drafter(tmp_path / "ours", config, dtype=dtype)
    zlab = export_checkpoint(ours, tmp_path / "zlab", layout="zlab", num_target_layers=4)
    back = export_checkpoint(zlab, tmp_path / "back", layout="speculators")

    assert detect_layout(zlab) == "zlab" and detect_layout(back) == "speculators"
    assert json.loads((back / "config.json").read_text()) == json.loads((ours / "config.json").read_text())
    assert load_checkpoint(back).config == load_checkpoint(ours).config == config
    original, returned = (
        load_file(str(ours / "model.safetensors")),
        load_file(str(back / "model.safetensors")),
    )
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype and torch.equal(returned[name], tensor), name
    # The z-lab folder holds the same tensors under the same names (no `model.` prefix, no head).
    exported = load_file(str(zlab / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[n], t) for n, t in original.items())


def test_zlab_config_has_their_keys_and_shifted_layer_ids(tmp_path):
    config = drafter_config(
        layer_types=["sliding_attention"] * 2, sliding_window=64, sliding_window_non_causal=False
    )
    zlab = export_checkpoint(saved_drafter(tmp_path / "ours", config), tmp_path / "zlab", layout="zlab",
                             num_target_layers=4)  # fmt: skip
    data = json.loads((zlab / "config.json").read_text())
    assert data["architectures"] == ["DFlashDraftModel"]
    assert data["model_type"] == "qwen3"
    assert data["block_size"] == 8 and data["num_target_layers"] == 4
    assert data["dflash_config"] == {"mask_token_id": 399, "target_layer_ids": [0, 2, 3], "causal": True}
    assert (
        data["num_hidden_layers"] == 2
        and data["head_dim"] == 32
        and data["layer_types"] == config.layer_types
    )
    assert "speculators_config" not in data and "aux_hidden_state_layer_ids" not in data


def test_zlab_ids_name_the_planes_ours_name_as_zlab_reads_them(tmp_path):
    """z-lab feeds its drafter `output_hidden_states[id + 1]`: that plane must be our plane `id + 1`."""
    tiny = make_tiny_verifier(num_layers=4)
    ours = [1, 2, 3]  # id 4 (N) is pre-norm for us and post-norm in HF's list: not comparable, see the docs
    zlab_ids = to_zlab_layer_ids(ours)
    assert zlab_ids == [0, 1, 2]
    assert from_zlab_layer_ids(zlab_ids) == ours
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])
    with torch.no_grad():
        hf_planes = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    captured = capture_hidden_states(tiny.model, ids, layer_ids=ours)
    for k, zlab_id in enumerate(zlab_ids):
        torch.testing.assert_close(hf_planes[zlab_id + 1], captured[:, :, k], atol=0, rtol=0)
        assert not torch.equal(hf_planes[zlab_id], captured[:, :, k]), "an unshifted id reads another plane"


def test_export_refuses_what_the_zlab_layout_cannot_express(tmp_path):
    with_embedding = saved_drafter(tmp_path / "a", drafter_config(aux_hidden_state_layer_ids=[0, 2]))
    with pytest.raises(ExportError, match="embedding output"):
        export_checkpoint(with_embedding, tmp_path / "za", layout="zlab")
    reduced = drafter_config(draft_vocab_size=64)
    torch.manual_seed(0)
    drafter = DFlashDrafter(reduced)
    folder = save_checkpoint(tmp_path / "b", drafter_state=drafter.state_dict(), config=reduced)
    with pytest.raises(ExportError, match="reduced draft vocab"):
        export_checkpoint(folder, tmp_path / "zb", layout="zlab")
    assert not (tmp_path / "za").exists() and not (tmp_path / "zb").exists()


def test_import_of_a_zlab_checkpoint_that_names_no_verifier_needs_one(tmp_path):
    zlab = export_checkpoint(
        saved_drafter(tmp_path / "ours", drafter_config()), tmp_path / "zlab", layout="zlab"
    )
    data = json.loads((zlab / "config.json").read_text())
    del data["target_model_name_or_path"], data["target_architectures"]  # as z-lab's own configs
    (zlab / "config.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match="--verifier"):
        export_checkpoint(zlab, tmp_path / "back", layout="speculators")
    back = export_checkpoint(zlab, tmp_path / "back", layout="speculators", verifier_name_or_path="org/other")
    assert load_checkpoint(back).config.verifier_name_or_path == "org/other"
    assert load_checkpoint(back).config.aux_hidden_state_layer_ids == [1, 3, 4]


def test_export_cli_round_trip_and_copy(tmp_path, capsys):
    tiny = make_tiny_verifier(tmp_path / "verifier", num_layers=4)
    config = drafter_config(verifier_name_or_path=str(tiny.path), aux_hidden_state_layer_ids=[1, 2, 4])
    ours = saved_drafter(tmp_path / "ours", config)
    assert dflash(["export", str(ours), "--format", "zlab", "--output", str(tmp_path / "zlab")]) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads((tmp_path / "zlab" / "config.json").read_text())
    assert data["num_target_layers"] == 4  # read from the verifier the checkpoint names
    assert data["dflash_config"]["target_layer_ids"] == [0, 1, 3]
    assert (
        dflash(
            ["export", str(tmp_path / "zlab"), "--format", "speculators", "--output", str(tmp_path / "back")]
        )
        == 0
    )
    assert (tmp_path / "back" / "config.json").read_text() == (ours / "config.json").read_text()
    # Same layout: a plain copy of the serving files.
    assert dflash(["export", str(ours), "--format", "speculators", "--output", str(tmp_path / "copy")]) == 0
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["config.json", "model.safetensors"]
    # An existing output is refused, with the way out.
    assert dflash(["export", str(ours), "--format", "zlab", "--output", str(tmp_path / "zlab")]) == 2
    assert "--overwrite" in capsys.readouterr().out
