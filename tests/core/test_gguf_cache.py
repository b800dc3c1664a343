"""GGUF verifiers are converted once to a transformers folder; later loads read it (gguf_cache)."""

from __future__ import annotations

import errno
import logging
import os

import pytest
import torch
from safetensors import safe_open

from dflash_core.config import EMBEDDED_VERIFIER
from dflash_core.gguf_cache import MARKER, converted_folder
from dflash_core.verifier import load_verifier, tokenizer_fingerprint


class Converter:
    """A stand-in for the GGUF conversion: writes one file and counts its calls."""

    def __init__(self, fail: OSError | None = None) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, dest) -> None:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        (dest / "model.safetensors").write_text(f"conversion {self.calls}")


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_a_conversion_is_made_once_and_reused(gguf):
    convert = Converter()
    first = converted_folder(gguf, convert=convert)
    again = converted_folder(gguf, convert=convert)
    assert first == again and convert.calls == 1
    assert (first / "model.safetensors").read_text() == "conversion 1" and (first / MARKER).is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no scratch folder left behind


def test_a_changed_gguf_is_converted_again(gguf):
    convert = Converter()
    first = converted_folder(gguf, convert=convert)
    gguf.write_bytes(b"GGUF, another version")
    second = converted_folder(gguf, convert=convert)
    assert convert.calls == 2 and second != first
    assert (second / "model.safetensors").read_text() == "conversion 2"


def test_a_half_written_folder_is_replaced_never_read(gguf):
    convert = Converter()
    folder = converted_folder(gguf, convert=convert)
    (folder / MARKER).unlink()  # as if a process died before writing the marker
    (folder / "model.safetensors").write_text("truncated")
    assert converted_folder(gguf, convert=convert) == folder
    assert convert.calls == 2 and (folder / "model.safetensors").read_text() == "conversion 2"


def test_a_full_disk_or_an_unusable_cache_falls_back_with_a_warning(gguf, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="dflash_core.gguf_cache")
    full = Converter(fail=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert converted_folder(gguf, convert=full) is None
    assert "No space left on device" in caplog.text and f"loading {gguf} directly" in caplog.text
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # the scratch folder was removed

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(blocker))  # its gguf/ cannot be made
    caplog.clear()
    assert converted_folder(gguf, convert=Converter()) is None
    assert "cannot cache the converted GGUF" in caplog.text


def test_the_cache_can_be_turned_off(gguf, monkeypatch):
    monkeypatch.setenv("DFLASH_CACHE_DIR", "off")
    convert = Converter()
    assert converted_folder(gguf, convert=convert) is None and convert.calls == 0


def test_no_home_directory_means_no_cache_not_a_failure(gguf, monkeypatch):
    monkeypatch.delenv("DFLASH_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> None:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr("pathlib.Path.home", staticmethod(no_home))
    convert = Converter()
    assert converted_folder(gguf, convert=convert) is None and convert.calls == 0


@pytest.mark.slow
def test_the_converted_smollm2_loads_what_the_gguf_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_CACHE_DIR", "off")
    direct, direct_tokenizer = load_verifier(EMBEDDED_VERIFIER)
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(tmp_path))
    for _ in range(2):  # the first load converts, the second reads the folder
        model, tokenizer = load_verifier(EMBEDDED_VERIFIER)
    (folder,) = (tmp_path / "gguf").iterdir()
    assert (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(direct_tokenizer)
    assert tokenizer.chat_template == direct_tokenizer.chat_template
    assert model.config.architectures == direct.config.architectures == ["LlamaForCausalLM"]
    assert getattr(model.config, "quantization_config", None) is None
    expected = direct.state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    ids = tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    # The tied embedding is written once, under the input embedding's name as Hugging Face writes
    # it: vLLM skips `lm_head.*` of a tied model, and an embedding kept only as lm_head.weight
    # left vLLM's embedding unloaded (garbage replies, no error).
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert model.config.tie_word_embeddings
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
