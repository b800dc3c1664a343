"""Live acceptance (`--eval-every`): tau during training, counted exactly as `dflash eval` counts it.

A tiny verifier and a drafter trained on its own replies (tests/factories/on_policy.py: accepted
often and in runs, so every acceptance length occurs). Tolerance: none. In float32 the live
counters (drafts, accepted tokens, accepted per position, so tau) EQUAL those of `dflash eval`
(transformers engine, greedy) on the same prompts and checkpoint, with the continuation and
hidden states from the verifier in the process and from a real hidden-state service on
127.0.0.1. The replay of the rounds equals `speculative_generate` with a scripted drafter (EOS
inside a block included), gives tau = B for an oracle and 1 for an always-wrong drafter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from dflash_core.checkpoint import load_checkpoint
from dflash_core.config import TrainConfig
from dflash_core.data.prepare import load_prepared
from dflash_core.eval_config import EvalConfig
from dflash_core.evaluation import eos_token_ids, run_eval
from dflash_core.live_acceptance import EvalSequence, continuation_length, replay_greedy
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.spec_decode import Proposal, speculative_generate, verifier_generate
from dflash_core.verifier import fingerprint_of, load_verifier, load_verifier_heads_from_model
from services.cli.main import main as dflash
from services.trainer.batches import TokenRows
from services.trainer.data import plan_epoch, split_indices
from services.trainer.distributed import DistContext
from services.trainer.live_eval import build_live_acceptance
from services.trainer.main import run_training
from services.trainer.train_state import TrainState
from tests.factories.on_policy import make_on_policy_workspace, train_on_policy_drafter
from tests.factories.services import running_service
from tests.factories.training import run_train_command, train_config

BLOCK = 4
LAYERS = [1, 2, 4]  # as train_on_policy_drafter: id 4 = N, the last layer before the final norm
NUM_PROMPTS, MAX_NEW = 6, 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    workspace = make_on_policy_workspace(tmp_path_factory.mktemp("live"))
    checkpoint = train_on_policy_drafter(workspace, block_size=BLOCK)
    model, tokenizer = load_verifier(str(workspace["verifier"]))
    return {**workspace, "checkpoint": checkpoint, "model": model, "tokenizer": tokenizer}


def live_config(trained: dict, save: str, **overrides) -> TrainConfig:
    values: dict = dict(
        epochs=2, block_size=BLOCK, num_layers=1, max_anchors=24, total_seq_len=256, lr=3e-3,
        target_layer_ids=LAYERS, eval_every=1, eval_prompts=str(trained["data"]),
        eval_num_prompts=NUM_PROMPTS, eval_max_new_tokens=MAX_NEW,
    )  # fmt: skip
    values.update(overrides)
    return train_config(trained, save, **values)


def live_stats(trained: dict, *, endpoint: str | None = None, **overrides):
    """Live acceptance of the trained checkpoint, built as the trainer builds it (one rank, float32)."""
    model, tokenizer = trained["model"], trained["tokenizer"]
    config = live_config(
        trained, "unused", hidden_states_endpoint=[endpoint] if endpoint else None, **overrides
    )
    live = build_live_acceptance(
        config,
        rows=None,
        val_indices=[],
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(tokenizer, model.config, model.generation_config),
        model=None if endpoint else model,
        fingerprint=fingerprint_of(model.config, tokenizer, name_or_path=str(trained["verifier"])),
        target_layer_ids=LAYERS,
        dist=DistContext(),
    )
    assert live is not None
    loaded = load_checkpoint(trained["checkpoint"])
    drafter = DFlashDrafter(loaded.config)
    drafter.load_state_dict(loaded.state_dict)
    heads = load_verifier_heads_from_model(model)
    return live, live.evaluate(
        drafter, heads, attention="sdpa", autocast_dtype=None, device=torch.device("cpu"), dist=DistContext()
    )


@pytest.fixture(scope="module")
def eval_report(trained):
    return run_eval(
        EvalConfig(
            checkpoint=trained["checkpoint"], verifier=str(trained["verifier"]), prompts=str(trained["data"]),
            num_prompts=NUM_PROMPTS, max_new_tokens=MAX_NEW, device="cpu", dtype="float32", baseline=False,
        )
    )  # fmt: skip


def assert_same_counts(stats, report) -> None:
    assert stats.prompts == report.num_prompts
    assert (stats.drafts, stats.accepted_tokens) == (report.drafts, report.accepted_tokens)
    assert stats.accepted_per_position == report.accepted_per_position
    assert stats.new_tokens == report.new_tokens
    assert stats.tau == report.tau  # the tolerance: none (float32)


# --------------------------------------------------------------------------------------------
# Agreement with `dflash eval`
# --------------------------------------------------------------------------------------------


def test_live_tau_equals_dflash_eval_with_the_verifier_in_process(trained, eval_report):
    # max_anchors 24 < 23 anchors x 2 prompts per row, batch 2: anchors split over rows and forwards.
    live, stats = live_stats(trained, batch_size=2)
    assert live.forwards > 1 and len(live.rows) > len({tuple(r.sequences) for r in live.rows})
    assert_same_counts(stats, eval_report)
    assert 1.5 < stats.tau < BLOCK  # a trained drafter: accepted, not always


def test_live_tau_equals_dflash_eval_with_a_hidden_state_service(trained, eval_report):
    with running_service(trained["verifier"], target_layer_ids=LAYERS) as server:
        _, stats = live_stats(trained, endpoint=server.address)
    assert_same_counts(stats, eval_report)


# --------------------------------------------------------------------------------------------
# The replay of the rounds
# --------------------------------------------------------------------------------------------


class TableProposer:
    """Proposes drafts[j - 1] when j tokens are committed, as the replay reads them."""

    def __init__(self, drafts: list[list[int]], *, prompt_len: int) -> None:
        self.drafts, self.prompt_len = drafts, prompt_len
        self.block_size, self.aux_layer_ids = BLOCK, []

    def start(self, *, max_positions: int) -> None:
        pass

    def propose(self, *, anchor_token: int, position: int, temperature: float, generator) -> Proposal:
        return Proposal(tokens=self.drafts[position - self.prompt_len])


def scripted_drafts(continuation: list[int], *, right, vocab_size: int) -> list[list[int]]:
    """With j tokens committed: the first right(j) drafts are the continuation, the rest wrong."""
    drafts = []
    for j in range(1, MAX_NEW):
        truth = continuation[j : j + BLOCK - 1]
        k = right(j)
        drafts.append(truth[:k] + [(t + 1) % vocab_size for t in truth[k:]])
    return drafts


@pytest.mark.parametrize(
    ("name", "right"),
    [("oracle", lambda j: BLOCK - 1), ("always wrong", lambda j: 0), ("mixed", lambda j: (j * 5) % BLOCK)],
)
@pytest.mark.parametrize("with_eos", [False, True])
def test_the_replay_counts_what_speculative_decoding_counts(trained, name, right, with_eos):
    model, vocab = trained["model"], trained["model"].config.vocab_size
    length = continuation_length(max_new_tokens=MAX_NEW, block_size=BLOCK)
    for prompt in _prompts(trained):
        continuation, _ = verifier_generate(model, prompt, max_new_tokens=length)
        # A token the verifier really produces mid-way, taken as its EOS: it may land inside a block.
        eos = {_first_seen_last(continuation[:MAX_NEW])} if with_eos else set()
        drafts = scripted_drafts(continuation, right=right, vocab_size=vocab)
        sequence = EvalSequence(prompt_ids=prompt, continuation=continuation, max_new_tokens=MAX_NEW)
        replayed = replay_greedy(sequence, drafts, block_size=BLOCK, eos_token_ids=eos)
        decoded = speculative_generate(
            model,
            TableProposer(drafts, prompt_len=len(prompt)),
            prompt,
            max_new_tokens=MAX_NEW,
            eos_token_ids=eos,
        ).stats
        assert replayed.committed_per_draft == decoded.committed_per_draft
        assert replayed.accepted_per_position == decoded.accepted_per_position
        assert replayed.new_tokens == decoded.new_tokens
        if name == "oracle":
            assert replayed.tau == BLOCK
        elif name == "always wrong":
            assert replayed.tau == 1.0


def _first_seen_last(tokens: list[int]) -> int:
    """The token whose first occurrence comes latest (the tiny verifier repeats itself a lot)."""
    first = {}
    for i, token in enumerate(tokens):
        first.setdefault(token, i)
    token = max(first, key=first.get)
    assert first[token] > 1, "the continuation is one token repeated"
    return token


def _prompts(trained: dict) -> list[list[int]]:
    from dflash_core.eval_prompts import load_prompts

    return [p.token_ids for p in load_prompts(str(trained["data"]), tokenizer=trained["tokenizer"], limit=3)]


# --------------------------------------------------------------------------------------------
# In training: logged rows, checkpoint_best by tau, resume
# --------------------------------------------------------------------------------------------


def metric_rows(save_path: Path) -> list[dict]:
    return [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]


def test_training_against_a_service_logs_live_tau_and_keeps_the_best_by_tau_across_a_resume(trained, caplog):
    overrides = dict(
        eval_every=10, eval_prompts=None, eval_num_prompts=4, eval_max_new_tokens=12, best_metric="tau",
        checkpoint_freq=5,
    )  # fmt: skip
    with running_service(trained["verifier"], target_layer_ids=LAYERS) as server:
        config = live_config(trained, "ckpt-live", hidden_states_endpoint=[server.address], **overrides)
        first = run_training(config, stop_after_steps=steps_per_epoch(config) + 7)  # into the second epoch
        assert first.state.epoch == 1 and first.state.best_epoch == 0
        before = list(first.state.eval_history)
        caplog.set_level(logging.INFO, logger="services.trainer.live_eval_cache")
        result = run_training(config)
        # The resume read the continuations and hidden states the first run fetched.
        assert "4 sequences read from" in caplog.text
        best_by_tau = (config.save_path / "checkpoint_best").resolve()
        # The finished run "resumed" under the other metric: checkpoint_best moves to the lowest val loss.
        by_loss = run_training(config.model_copy(update={"best_metric": "val_loss"})).state
    state = result.state
    evals = [row for row in metric_rows(config.save_path) if "eval/tau" in row]
    eval_steps, ends = [row["step"] for row in evals], _epoch_end_steps(state)
    assert eval_steps[0] == 0  # the untrained drafter's baseline
    assert all(step % 10 == 0 or step in ends for step in eval_steps), eval_steps
    assert set(ends) <= set(eval_steps)
    assert len(eval_steps) == len(set(eval_steps)), "a step was evaluated twice (the resume repeated one)"
    for row in evals:
        assert 1.0 <= row["eval/tau"] <= BLOCK
        assert all(f"eval/accept_rate_pos{k}" in row for k in range(1, BLOCK))
    # The state carries every evaluation, those before the interruption included, and the best by tau.
    assert state.eval_history[: len(before)] == before
    ends = {e["end_of_epoch"]: e["eval/tau"] for e in state.eval_history if e["end_of_epoch"] is not None}
    assert sorted(ends) == [0, 1]
    assert state.best_tau == max(ends.values()) and state.best_epoch == max(ends, key=ends.get)
    assert best_by_tau == (config.save_path / str(state.best_epoch)).resolve()
    saved = json.loads((config.save_path / "latest" / "training_state.json").read_text())
    assert saved["best_metric"] == "tau" and saved["best_tau"] == state.best_tau
    assert saved["eval_history"] == state.eval_history
    losses = {row["epoch"]: row["val/loss"] for row in state.history if row["epoch"] >= 0}
    assert by_loss.best_epoch == min(losses, key=losses.get)
    assert (config.save_path / "checkpoint_best").resolve() == (
        config.save_path / str(by_loss.best_epoch)
    ).resolve()


def steps_per_epoch(config: TrainConfig) -> int:
    dataset, _ = load_prepared(config.data_path)
    rows = TokenRows(dataset, max_length=config.total_seq_len)
    train, _ = split_indices(len(rows), val_fraction=config.val_fraction, seed=config.seed)
    lengths = [rows.lengths[i] for i in train]
    plan = plan_epoch(
        train,
        lengths,
        epoch=0,
        seed=config.seed,
        total_seq_len=config.total_seq_len,
        batch_size=config.batch_size,
    )
    return len(plan)


def _epoch_end_steps(state: TrainState) -> list[int]:
    return [e["step"] for e in state.eval_history if e["end_of_epoch"] is not None]


# --------------------------------------------------------------------------------------------
# Refused combinations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"best_metric": "tau"}, "--best-metric tau needs live acceptance: pass --eval-every N"),
        ({"best_metric": "tau", "eval_every": 0}, "--best-metric tau needs live acceptance"),
        ({"eval_every": 5, "val_fraction": 0.0}, "pass --eval-prompts SOURCE"),
        ({"eval_every": 5, "eval_max_new_tokens": 1}, "eval_max_new_tokens"),
    ],
)
def test_invalid_combinations_are_refused_naming_the_flag(trained, overrides, message):
    with pytest.raises(ValidationError, match=message):
        train_config(trained, "refused", **overrides)


def test_the_cli_refuses_best_metric_tau_without_eval_every(trained, tmp_path):
    argv = [
        "train",
        "--data-path",
        str(trained["data"]),
        "--save-path",
        str(tmp_path / "x"),
        "--best-metric",
        "tau",
    ]
    with pytest.raises(SystemExit, match="--best-metric tau needs live acceptance: pass --eval-every N"):
        dflash(argv)


def test_prompts_too_long_for_a_training_row_are_a_clear_error(trained):
    with pytest.raises(ValueError, match="fits a training row"):
        live_stats(trained, total_seq_len=MAX_NEW)


# --------------------------------------------------------------------------------------------
# FSDP: two ranks measure what one rank measures
# --------------------------------------------------------------------------------------------


def test_two_ranks_measure_the_tau_one_rank_measures(trained):
    """5 prompts: rank 0 drafts for 3, rank 1 for 2 and runs a placeholder forward while rank 0 finishes."""
    run = dict(
        epochs=1, max_steps=12, eval_every=6, eval_prompts=None, eval_num_prompts=5, eval_max_new_tokens=12,
        max_anchors=11,
    )  # fmt: skip
    two = live_config(trained, "live-two-ranks", batch_size=1, **run)
    run_train_command(two, nproc=2)
    one = run_training(live_config(trained, "live-one-rank", batch_size=2, **run)).save_path
    taus = {
        name: {row["step"]: row["eval/tau"] for row in metric_rows(path) if "eval/tau" in row}
        for name, path in (("two", two.save_path), ("one", one))
    }
    assert sorted(taus["one"]) == sorted(taus["two"]) == [0, 6, 12]
    assert taus["two"][0] == taus["one"][0]  # the same initial weights: the same drafts, to the token
    for step in (6, 12):  # float32 weights equal to ~1e-5 (tests/services/trainer/test_distributed.py)
        assert taus["two"][step] == pytest.approx(taus["one"][step], abs=0.05)
