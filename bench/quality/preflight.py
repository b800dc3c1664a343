"""The quality run's GPU path on a tiny verifier, in about a minute, before the budgeted run.

    python bench/quality/preflight.py          # exits non-zero, with the reason, if anything fails

The budgeted run spends minutes of a lent GPU before its first optimizer step; a fault in the
trainer's CUDA path (the in-process verifier's batched prefetch, packing on the GPU, live tau)
should cost seconds instead. This builds a tiny random Qwen3 verifier and its own greedy replies
(tests/factories/on_policy.py), trains a one-layer drafter on them on the GPU with live tau on,
evaluates it with `dflash eval`'s transformers engine, and checks the figures are sane: the loss
fell, live tau was logged, and the evaluation's greedy output equals the verifier's.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from dflash_core.eval_config import EvalConfig
    from dflash_core.evaluation import run_eval
    from tests.factories.on_policy import make_on_policy_workspace, train_on_policy_drafter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dflash_preflight_") as tmp:
        workspace = make_on_policy_workspace(Path(tmp))
        checkpoint = train_on_policy_drafter(
            workspace, device=device, compile=False, eval_every=10, eval_num_prompts=4,
            eval_max_new_tokens=16, report_to=["jsonl"], epochs=6,
        )  # fmt: skip
        rows = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        taus = [r["eval/tau"] for r in rows if "eval/tau" in r]
        fetch = [r["time/fetch_s"] for r in rows if "time/fetch_s" in r]
        report = run_eval(
            EvalConfig(
                checkpoint=checkpoint, verifier=str(workspace["verifier"]), prompts=str(workspace["data"]),
                num_prompts=6, max_new_tokens=24, device=device, baseline=True,
            )
        )  # fmt: skip
    problems = []
    if len(losses) < 2 or not losses[-1] < losses[0]:
        problems.append(f"the training loss did not fall: {losses}")
    if not taus:
        problems.append("no live tau was logged")
    if report.outputs_identical != report.num_prompts:
        differ = report.num_prompts - (report.outputs_identical or 0)
        problems.append(f"greedy output differs from the verifier's on {differ} prompts")
    print(
        f"preflight on {device}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, live tau first/last "
        f"{taus[:1] + taus[-1:]}, fetch "
        f"{1e3 * (sum(fetch) / max(1, len(fetch))):.1f} ms/step, dflash eval tau {report.tau:.3f} "
        f"(outputs identical {report.outputs_identical}/{report.num_prompts}), {time.time() - started:.0f} s"
    )
    for problem in problems:
        print(f"preflight: FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
