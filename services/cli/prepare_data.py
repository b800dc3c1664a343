"""`dflash prepare-data`: tokenize conversations with the verifier's chat template.

    dflash prepare-data --model Qwen/Qwen3-8B --data sharegpt --output ./output/data \
        --max-samples 5000 --seq-length 8192

Writes a Hugging Face `datasets` folder (arrow), `token_freq.pt` (target-token counts, used for the
draft vocabulary) and `dflash_data.json` (which tokenizer and template made it; `dflash train`
refuses data made with another tokenizer).

With `--regenerate-with HOST:PORT [...]` every assistant turn is first rewritten with the
verifier's own reply, through the hidden-state service's Generate (`dflash serve-hidden-states`
running the same model as --model); the metadata records the service, parameters and counts.
"""

from __future__ import annotations

import argparse
import contextlib

from dflash_core.config import PrepareDataConfig
from services.cli.args import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PrepareDataConfig)


def run(args: argparse.Namespace) -> int:
    from dflash_core.data.prepare import DataError, prepare_data
    from dflash_core.verifier import load_tokenizer, tokenizer_fingerprint
    from services.hidden_states.generate_client import GenerateClient, GenerateError, regenerator_for

    config = config_from_args(PrepareDataConfig, args)
    tokenizer = load_tokenizer(config.model)
    fingerprint = tokenizer_fingerprint(tokenizer)
    regenerate = None
    try:
        with contextlib.ExitStack() as stack:
            if config.regenerate_with:
                client = stack.enter_context(GenerateClient(config.regenerate_with))
                regenerate = regenerator_for(
                    client, config, tokenizer=tokenizer, tokenizer_fingerprint=fingerprint
                )
            report = prepare_data(
                config, tokenizer=tokenizer, tokenizer_fingerprint=fingerprint, regenerate=regenerate
            )
    except (DataError, GenerateError) as exc:
        print(f"error: {exc}")
        return 2
    print(report.summary())
    if regenerate is not None:
        print(regenerate.summary())
    return 0
