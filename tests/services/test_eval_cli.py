"""`dflash eval` on a tiny trained checkpoint: the table and JSON, prompt sources, refusals, the vLLM engine.

The vLLM tests run vLLM's CPU build from its own environment ($DFLASH_VLLM_PYTHON; `make test`
sets it) and must count exactly the drafts our engine counts: in float32 both decode the same
function, so drafts, accepted tokens and per-position acceptance agree to the token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dflash_core.checkpoint import load_checkpoint
from dflash_core.eval_prompts import load_prompts
from dflash_core.evaluation import eos_token_ids
from dflash_core.export_zlab import export_checkpoint
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.spec_decode import DFlashProposer, SpecDecodeStats, speculative_generate
from dflash_core.verifier import load_verifier, load_verifier_heads_from_model
from services.cli.main import main as dflash
from tests.factories.on_policy import make_on_policy_workspace, train_on_policy_drafter
from tests.factories.tokenizers import make_chat_tokenizer
from tests.factories.verifiers import make_tiny_verifier

BLOCK = 4
VLLM_PYTHON = os.environ.get("DFLASH_VLLM_PYTHON")
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON, reason="DFLASH_VLLM_PYTHON is not set (`make test` sets it to .venv-vllm's python)"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    workspace = make_on_policy_workspace(tmp_path_factory.mktemp("eval"))
    return {**workspace, "checkpoint": train_on_policy_drafter(workspace, block_size=BLOCK)}


def eval_json(trained: dict, tmp_path: Path, *extra: str, checkpoint: Path | None = None) -> dict:
    out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*.json')))}.json"
    argv = ["eval", str(checkpoint or trained["checkpoint"]), "--prompts", str(trained["data"]),
            "--num-prompts", "4", "--max-new-tokens", "24", "--output-json", str(out), *extra]  # fmt: skip
    assert dflash(argv) == 0
    return json.loads(out.read_text())


def test_eval_prints_the_table_and_writes_the_json(trained, tmp_path, capsys):
    report = eval_json(trained, tmp_path)
    table = capsys.readouterr().out
    for line in ("tau (mean acceptance length)", "tokens/s with drafter", "tokens/s without drafter",
                 "greedy output identical to the verifier", "draft position"):  # fmt: skip
        assert line in table
    assert "4/4" in table
    assert report["engine"] == "transformers" and report["num_prompts"] == 4 and report["block_size"] == BLOCK
    assert report["outputs_identical"] == 4
    assert report["tokens_per_s"] > 0 and report["baseline_tokens_per_s"] > 0 and report["speedup"] > 0
    assert report["drafts"] > 0 and report["tau"] > 1.5, "the drafter trained on these replies is accepted"
    assert report["tau"] == pytest.approx(1 + report["accepted_tokens"] / report["drafts"])
    assert report["acceptance_per_position"] == pytest.approx(
        [a / report["drafts"] for a in report["accepted_per_position"]]
    )
    assert len(report["acceptance_per_position"]) == BLOCK - 1
    assert f"{report['tau']:.3f}" in table
    # The same numbers as the library's loop on the same prompts: the CLI adds nothing of its own.
    model, tokenizer = load_verifier(str(trained["verifier"]))
    loaded = load_checkpoint(trained["checkpoint"])
    drafter = DFlashDrafter(loaded.config)
    drafter.load_state_dict(loaded.state_dict)
    proposer = DFlashProposer(drafter, load_verifier_heads_from_model(model))
    total = SpecDecodeStats(num_draft_tokens=BLOCK - 1)
    for prompt in load_prompts(str(trained["data"]), tokenizer=tokenizer, limit=4):
        total = total.merge(
            speculative_generate(
                model, proposer, prompt.token_ids, max_new_tokens=24,
                eos_token_ids=eos_token_ids(tokenizer, model.config, model.generation_config),
            ).stats
        )  # fmt: skip
    assert (report["drafts"], report["accepted_tokens"]) == (total.drafts, total.accepted_tokens)
    assert report["accepted_per_position"] == total.accepted_per_position


def test_eval_reads_prompt_files(trained, tmp_path, capsys):
    rows = [
        {"prompt": "one two three"},
        {
            "messages": [
                {"role": "user", "content": "the cat sat"},
                {"role": "assistant", "content": "on a mat"},
            ]
        },
        {"conversations": [{"from": "human", "value": "blue red"}, {"from": "gpt", "value": "green"}]},
        {"messages": [{"role": "assistant", "content": "no user turn first"}]},
        "not an object",
    ]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    _, tokenizer = load_verifier(str(trained["verifier"]))
    prompts = load_prompts(str(prompts_file), tokenizer=tokenizer, limit=10)
    assert [p.source.rsplit(":", 1)[1] for p in prompts] == ["1", "2", "3"]  # rows 4-6 skipped
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat sat"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(prompts[1].token_ids) == expected  # the reply's header included, the reply not
    argv = ["eval", str(trained["checkpoint"]), "--prompts", str(prompts_file), "--max-new-tokens", "8",
            "--no-baseline"]  # fmt: skip
    assert dflash(argv) == 0
    assert "prompts.jsonl (3)" in capsys.readouterr().out


def test_a_chat_ending_with_a_user_turn_is_prompted_whole(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    chat = [
        {"role": "user", "content": "Name a red fruit."},
        {"role": "assistant", "content": "A strawberry."},
        {"role": "user", "content": "And a yellow one?"},
    ]
    sharegpt = [
        {"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in chat
    ]
    rows = [
        {"messages": chat},
        {"messages": [*chat, {"role": "assistant", "content": "A banana."}]},
        # ShareGPT spelling, with a system turn first.
        {"conversations": [{"from": "system", "value": system["content"]}, *sharegpt]},
    ]
    prompts_file = tmp_path / "chats.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = make_chat_tokenizer()
    prompts = load_prompts(str(prompts_file), tokenizer=tokenizer, limit=10)

    def rendered(turns: list[dict]) -> str:
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)

    # Ends with a user turn: the whole chat, then the header of the reply to its last turn.
    assert tokenizer.decode(prompts[0].token_ids) == rendered(chat)
    assert tokenizer.decode(prompts[2].token_ids) == rendered([system, *chat])
    # Ends with a reply: as before, the turns before the first assistant turn.
    assert tokenizer.decode(prompts[1].token_ids) == rendered(chat[:1])


def test_prepared_rows_are_cut_before_their_first_supervised_token(trained):
    from dflash_core.data.prepare import load_prepared

    _, tokenizer = load_verifier(str(trained["verifier"]))
    dataset, _ = load_prepared(trained["data"])
    prompts = load_prompts(str(trained["data"]), tokenizer=tokenizer, limit=3)
    for index, prompt in enumerate(prompts):
        row = dataset[index]
        first = row["loss_mask"].index(1)
        assert prompt.token_ids == row["input_ids"][:first]
        assert tokenizer.decode(prompt.token_ids).endswith("<|im_start|>assistant\n")


def test_a_verifier_the_drafter_does_not_belong_to_is_refused(trained, tmp_path, capsys):
    wider = make_tiny_verifier(tmp_path / "wider", hidden_size=96)
    argv = [
        "eval",
        str(trained["checkpoint"]),
        "--verifier",
        str(wider.path),
        "--prompts",
        str(trained["data"]),
    ]
    assert dflash(argv) == 2
    out = capsys.readouterr().out
    assert "does not belong to this verifier" in out and "hidden size: 64" in out and "96" in out
    assert str(trained["verifier"]) in out and str(wider.path) in out  # both sides named
    # Same shapes, another chat template: only the tokenizer fingerprint tells them apart.
    other_template = make_tiny_verifier(
        tmp_path / "template", tokenizer=make_chat_tokenizer(system_prompt="You are someone else")
    )
    argv[3] = str(other_template.path)
    assert dflash(argv) == 2
    assert "tokenizer/chat template fingerprint" in capsys.readouterr().out


def test_eval_of_a_zlab_export_counts_what_eval_of_ours_counts(trained, tmp_path):
    zlab = export_checkpoint(trained["checkpoint"], tmp_path / "zlab", layout="zlab")
    ours = eval_json(trained, tmp_path, "--no-baseline")
    theirs = eval_json(
        trained, tmp_path, "--no-baseline", "--verifier", str(trained["verifier"]), checkpoint=zlab
    )
    for key in ("drafts", "accepted_tokens", "accepted_per_position", "new_tokens"):
        assert theirs[key] == ours[key], key


def test_vllm_engine_without_its_python_is_a_clear_error(trained, monkeypatch, capsys):
    monkeypatch.delenv("DFLASH_VLLM_PYTHON", raising=False)
    assert (
        dflash(["eval", str(trained["checkpoint"]), "--engine", "vllm", "--prompts", str(trained["data"])])
        == 2
    )
    out = capsys.readouterr().out
    assert "DFLASH_VLLM_PYTHON" in out and "make vllm-env" in out


@pytest.mark.slow
@needs_vllm
def test_vllm_engine_counts_what_our_engine_counts(trained, tmp_path, capsys):
    ours = eval_json(trained, tmp_path, "--dtype", "float32", "--no-baseline")
    theirs = eval_json(trained, tmp_path, "--engine", "vllm", "--dtype", "float32")
    print(f"vLLM: tau {theirs['tau']:.3f} over {theirs['drafts']} drafts; ours {ours['tau']:.3f}")
    assert theirs["engine"] == "vllm" and theirs["drafts"] > 0 and theirs["accepted_tokens"] > 0
    assert theirs["outputs_identical"] == 4, "vLLM's greedy output changed with the drafter"
    for key in ("drafts", "accepted_tokens", "accepted_per_position"):
        assert theirs[key] == ours[key], key
    assert theirs["tau"] == pytest.approx(ours["tau"])


@pytest.mark.slow
@needs_vllm
def test_vllm_engine_takes_paths_relative_to_the_callers_folder(trained, tmp_path, monkeypatch):
    """vLLM runs in a process started from the repository's folder: a checkpoint and a verifier
    given relative to the caller's folder must reach it as the same folders (hub ids stay as given)."""
    monkeypatch.chdir(tmp_path)
    checkpoint = Path(os.path.relpath(trained["checkpoint"], tmp_path))
    verifier = os.path.relpath(trained["verifier"], tmp_path)
    report = eval_json(trained, tmp_path, "--engine", "vllm", "--dtype", "float32", "--no-baseline",
                       "--verifier", verifier, checkpoint=checkpoint)  # fmt: skip
    assert report["engine"] == "vllm" and report["drafts"] > 0
    # Reported as the user wrote them.
    assert report["checkpoint"] == str(checkpoint) and report["verifier"] == verifier
    assert not any("overridden" in note for note in report["notes"])  # the same verifier, not another


@pytest.mark.slow
@needs_vllm
def test_vllm_serves_the_zlab_export_with_the_same_acceptance(trained, tmp_path):
    """vLLM reads z-lab configs natively (its aux layers = target_layer_ids + 1) and decodes as we do.

    Acceptance of a tiny random verifier's replies hardly depends on WHICH neighbouring plane the
    drafter reads (adjacent residual planes are nearly equal, and the replies are near-bigram), so
    equal counts alone would not pin the shift; the drafter's aux ids include N = 4, so ids left
    unshifted would ask vLLM for plane 5, which does not exist, and vLLM refuses. The direction of
    the shift is pinned against transformers' own planes in tests/core/test_export_zlab.py.
    """
    zlab = export_checkpoint(trained["checkpoint"], tmp_path / "zlab", layout="zlab")
    ours = eval_json(trained, tmp_path, "--dtype", "float32", "--no-baseline")
    theirs = eval_json(trained, tmp_path, "--engine", "vllm", "--dtype", "float32", "--no-baseline",
                       "--verifier", str(trained["verifier"]), checkpoint=zlab)  # fmt: skip
    for key in ("drafts", "accepted_tokens", "accepted_per_position"):
        assert theirs[key] == ours[key], key
