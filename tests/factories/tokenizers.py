"""Tiny chat tokenizers built on the fly (no hub, no files): byte-level BPE with ChatML tokens.

`make_chat_tokenizer()` returns a `transformers.PreTrainedTokenizerFast` that tokenizes any text
(byte-level: every byte is in the alphabet), knows `<|endoftext|>`, `<|im_start|>` and `<|im_end|>`
as special tokens (ids 0, 1, 2, like SmolLM2) and carries SmolLM2's ChatML chat template. Training
the merges takes a few milliseconds; the result is cached as JSON and rebuilt for every call, so
callers may mutate what they get.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2-135M-Instruct's template (as in its GGUF), with the default system prompt as a parameter.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n__SYSTEM__<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A few sentences so the merges cover common English; anything else falls back to bytes.
_CORPUS = (
    "Hello! How are you doing today? I am doing well, thank you for asking.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "You are a helpful AI assistant. Please answer the question below as well as you can.",
    "Speculative decoding drafts several tokens and the verifier accepts a prefix of them.",
    "system user assistant: tell me a joke about numbers 0 1 2 3 4 5 6 7 8 9 and code.",
    "def main():\n    return 42\n\nThe end of the turn is marked by a special token.",
)


@functools.lru_cache(maxsize=8)
def _trained_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer.to_str()


def make_chat_tokenizer(
    *,
    vocab_size: int = 384,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    chat_template: str | None = None,
    bos_token: str | None = None,
) -> PreTrainedTokenizerFast:
    """A fresh ChatML tokenizer: eos `<|im_end|>`, pad `<|endoftext|>`, `len(tok) <= vocab_size`.

    `chat_template` replaces the ChatML template (`None` keeps it; `""` leaves the tokenizer without
    one). `bos_token` (one of the special tokens) makes the tokenizer prepend it whenever special
    tokens are added AND the template start with it, like Llama-style tokenizers: a pipeline that
    adds special tokens to a rendered chat then shows a doubled BOS.
    """
    backend = Tokenizer.from_str(_trained_json(vocab_size))
    template = chat_template
    if template is None:
        template = CHATML_TEMPLATE.replace("__SYSTEM__", system_prompt)
    if bos_token is not None:
        bos_id = backend.token_to_id(bos_token)
        if bos_id is None:
            raise ValueError(f"bos_token must be one of {SPECIAL_TOKENS}, got {bos_token!r}")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, bos_id)]
        )
        template = "{{ bos_token }}" + template if template else template
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=bos_token,
        chat_template=template or None,
    )
    tokenizer.name_or_path = "tests/factories/chat-tokenizer"
    return tokenizer
