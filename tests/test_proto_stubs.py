"""The committed stubs in dflash_core/wire/pb are what proto/generate.py makes from the .proto.

A stale stub is a silent wire break: the server and the trainer would both import the old
messages and agree with each other while disagreeing with the contract. So the check runs as CI
runs it (a subprocess), and two more tests show the check can fail at all: once for a hand-edited
stub and once for a .proto edited without regenerating.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATE = REPO_ROOT / "proto" / "generate.py"
STUBS = REPO_ROOT / "dflash_core" / "wire" / "pb"


@pytest.fixture
def generate_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """proto/generate.py imported as a module (proto/ is not a package), argv set for `--check`."""
    spec = importlib.util.spec_from_file_location("_proto_generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(GENERATE), "--check"])
    return module


def test_committed_stubs_are_fresh():
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        f"`python proto/generate.py --check` exited {result.returncode}:\n{result.stderr}"
        "\nRegenerate with `python proto/generate.py` and commit the result."
    )


def test_generated_files_are_the_committed_ones(generate_module):
    stubs = generate_module.generate()
    # The message, gRPC and typing stubs of the one proto; the import rewrite must have happened.
    assert set(stubs) == {"hidden_states_pb2.py", "hidden_states_pb2_grpc.py", "hidden_states_pb2.pyi"}
    assert "from dflash_core.wire.pb import hidden_states_pb2" in stubs["hidden_states_pb2_grpc.py"]
    for name, text in stubs.items():
        assert (STUBS / name).read_text() == text, f"{name} differs from what proto/generate.py writes"


def test_check_detects_a_hand_edited_stub(generate_module, monkeypatch, tmp_path):
    copy = tmp_path / "pb"
    shutil.copytree(STUBS, copy)
    monkeypatch.setattr(generate_module, "OUT", copy)
    assert generate_module.main() == 0  # the untouched copy passes: the check compares, not fails
    stub = copy / "hidden_states_pb2_grpc.py"
    stub.write_text(stub.read_text() + "\n# a hand edit\n")
    assert generate_module.main() == 1
    stub.unlink()
    shutil.copy(STUBS / "hidden_states_pb2_grpc.py", copy / "hidden_states_pb2_grpc.py")
    (copy / "hidden_states_pb2.pyi").unlink()  # a missing stub is stale too
    assert generate_module.main() == 1


def test_check_detects_a_proto_edited_without_regenerating(generate_module, monkeypatch, tmp_path):
    proto_root = tmp_path / "proto"
    shutil.copytree(REPO_ROOT / "proto" / "dflash", proto_root / "dflash")
    proto = proto_root / "dflash" / "v1" / "hidden_states.proto"
    text = proto.read_text()
    assert "message GetInfoRequest {}" in text
    edited = text.replace("message GetInfoRequest {}", "message GetInfoRequest { bool verbose = 1; }")
    proto.write_text(edited)
    monkeypatch.setattr(generate_module, "PROTO_ROOT", proto_root)
    assert generate_module.main() == 1
