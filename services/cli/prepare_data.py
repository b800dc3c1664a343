"""`dflash prepare-data`: tokenize conversations with the verifier's chat template.

    dflash prepare-data --model Qwen/Qwen3-8B --data sharegpt --output ./output/data \
        --max-samples 5000 --seq-length 8192

Writes a Hugging Face `datasets` folder (arrow), `token_freq.pt` (target-token counts, used for the
draft vocabulary) and `dflash_data.json` (which tokenizer and template made it; `dflash train`
refuses data made with another tokenizer).

With `--regenerate-with HOST:PORT [...]` every assistant turn is first rewritten with the
verifier's own reply, through the hidden-state service's Generate (`dflash serve-hidden-states`
running the same model as --model); the metadata records the service, parameters and counts.
`--regenerate-with in-process` runs the verifier in this process instead.

`--data self` (alone or mixed: `--data self chitchat`) has the verifier write conversations
itself, user turns and replies, through the same generator (in-process when none is given):

    dflash prepare-data --data self chitchat --self-samples 20000 --max-samples 40000 \
        --regenerate-with localhost:8000 --output ./output/data
"""

from __future__ import annotations

import argparse
import contextlib

from dflash_core.config import PrepareDataConfig
from dflash_core.config_args import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PrepareDataConfig)


def run(args: argparse.Namespace) -> int:
    from dflash_core.config import SELF_DATA
    from dflash_core.data.prepare import DataError, prepare_data
    from dflash_core.verifier import load_tokenizer, tokenizer_fingerprint
    from services.hidden_states.generate_client import GenerateError, regenerator_for
    from services.hidden_states.self_prompting import self_prompter_for

    config = config_from_args(PrepareDataConfig, args)
    tokenizer = load_tokenizer(config.model)
    fingerprint = tokenizer_fingerprint(tokenizer)
    regenerate = self_prompter = None
    try:
        with contextlib.ExitStack() as stack:
            generator = None
            if config.regenerate_with or SELF_DATA in config.data:
                generator = stack.enter_context(_open_generator(config))
            if config.regenerate_with:
                regenerate = regenerator_for(
                    generator, config, tokenizer=tokenizer, tokenizer_fingerprint=fingerprint
                )
            if SELF_DATA in config.data:
                self_prompter = self_prompter_for(
                    generator, config, tokenizer=tokenizer, tokenizer_fingerprint=fingerprint
                )
            report = prepare_data(
                config,
                tokenizer=tokenizer,
                tokenizer_fingerprint=fingerprint,
                regenerate=regenerate,
                self_prompter=self_prompter,
            )
    except (DataError, GenerateError) as exc:
        print(f"error: {exc}")
        return 2
    print(report.summary())
    for part in (self_prompter, regenerate):
        if part is not None:
            print(part.summary())
    return 0


def _open_generator(config: PrepareDataConfig) -> contextlib.AbstractContextManager:
    """The service's Generate at `--regenerate-with`, or the verifier in this process."""
    from dflash_core.config import IN_PROCESS
    from services.hidden_states.generate_client import GenerateClient
    from services.hidden_states.in_process_generator import InProcessGenerator

    endpoints = config.regenerate_with or [IN_PROCESS]
    if endpoints == [IN_PROCESS]:
        print(f"loading {config.model} in this process to generate with it")
        return InProcessGenerator.load(config.model)
    return GenerateClient(endpoints)
