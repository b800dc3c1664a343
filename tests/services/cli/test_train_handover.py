"""`dflash train --nproc N` hands its resolved config to the ranks whole, and nothing rides along."""

from __future__ import annotations

import pytest

from dflash_core.config import TrainConfig
from dflash_core.config_handover import handover_args
from services.cli.main import main


def test_a_handed_over_config_takes_no_other_flag(tmp_path, capsys):
    config = TrainConfig(data_path=tmp_path / "data", save_path=tmp_path / "save")
    assert main(["train", *handover_args(config), "--epochs", "2"]) == 2
    assert "--resolved-config is the whole config" in capsys.readouterr().out
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("epochs: 2\n")
    assert main(["train", *handover_args(config), "--config", str(yaml_file)]) == 2
    assert not (tmp_path / "save").exists()  # refused before anything ran


def test_a_handed_over_config_is_validated_like_any_other(tmp_path):
    with pytest.raises(SystemExit, match="block_size"):
        main(["train", "--resolved-config", '{"data_path": "d", "save_path": "s", "block_size": 1}'])
