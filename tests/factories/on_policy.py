"""An on-policy training workspace: a tiny verifier's OWN greedy replies, and a drafter trained on them.

    workspace = make_on_policy_workspace(tmp_path)        # verifier/, data/ (prepare-data output)
    checkpoint = train_on_policy_drafter(workspace)       # .../ckpt/checkpoint_best

The replies are what the verifier generates, so decoding prompts from this data meets what the
drafter was trained on: it is accepted often and in runs (tau ~2.5 with block 4, where a drafter
trained on the chats of tests/factories/training.py reaches ~1.5 on the verifier's own text),
which exercises every acceptance length. Prompts are the data rows up to their first supervised
token, as `dflash eval --prompts DATA` takes them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dflash_core.config import PrepareDataConfig
from dflash_core.data.prepare import prepare_data
from dflash_core.verifier import tokenizer_fingerprint
from services.trainer.main import run_training
from tests.factories.chats import WORDS
from tests.factories.training import train_config
from tests.factories.verifiers import make_tiny_verifier


def make_on_policy_workspace(
    root: Path, *, conversations: int = 160, reply_tokens: int = 40, seed: int = 0
) -> dict[str, Path]:
    tiny = make_tiny_verifier(root / "verifier", arch="qwen3", num_layers=4)
    tokenizer, model = tiny.tokenizer, tiny.model
    rng = random.Random(seed)
    prompts = []
    for _ in range(conversations):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        prompts.append(list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered))
    # One left-padded batch; embedding rows past the tokenizer are suppressed (prepare-data
    # refuses ids no text has).
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=reply_tokens, do_sample=False,
            eos_token_id=[], pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)),
        )  # fmt: skip
    rows = []
    for row, prompt in enumerate(prompts):
        reply = output[row, width:].tolist()
        rows.append({"input_ids": prompt + reply, "loss_mask": [0] * len(prompt) + [1] * len(reply)})
    source = root / "replies.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = root / "data"
    prepare_data(
        PrepareDataConfig(model=str(tiny.path), data=[str(source)], output=data, seq_length=256),
        tokenizer=tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    return {"root": root, "verifier": tiny.path, "data": data}


def train_on_policy_drafter(workspace: dict[str, Path], *, block_size: int = 4, **overrides) -> Path:
    """Train a small drafter on the workspace (a few seconds on CPU); returns its checkpoint_best.

    Aux layers default to [1, 2, 4]: id 4 = N, the last layer's output before the final norm, so
    the last-layer tap is exercised too (and a reader that shifts ids up by one has no plane 5).
    """
    values: dict = dict(
        epochs=4, block_size=block_size, num_layers=1, max_anchors=24, total_seq_len=256, lr=3e-3,
        target_layer_ids=[1, 2, 4],
    )  # fmt: skip
    values.update(overrides)
    result = run_training(train_config(workspace, "ckpt", **values))
    return result.save_path / "checkpoint_best"
