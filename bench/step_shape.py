"""The drafter shape both training-step benchmarks take: Qwen3-8B's DFlash drafter by default.

One set of flags, so that our step (`trainer_step.py`) and the peer's (`speculators_step.py`) are
always measured on the same shape unless a flag says otherwise.
"""

from __future__ import annotations

import argparse


def add_step_shape_arguments(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_argument_group("drafter shape and batch (defaults: Qwen3-8B's drafter)")
    shape.add_argument("--block-size", type=int, default=16)
    shape.add_argument("--anchors", type=int, default=512)
    shape.add_argument("--rows", type=int, default=8192)
    shape.add_argument("--layers", type=int, default=5)
    shape.add_argument("--hidden", type=int, default=4096)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--kv-heads", type=int, default=8)
    shape.add_argument("--head-dim", type=int, default=128)
    shape.add_argument("--intermediate", type=int, default=12288)
    shape.add_argument("--vocab", type=int, default=151936)
