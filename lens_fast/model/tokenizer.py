"""Tokenizers: Qwen2.5-VL's special tokens and chat format, and a tiny one built offline.

The tiny tokenizer is a byte-level BPE (digits split one by one, as Qwen's) trained with ``tokenizers``
on a fixed corpus: the synthetic data's words, both prompt styles and their answers. Training is
deterministic, so :func:`build_tiny_tokenizer` gives the same vocabulary on every machine.
"""
from __future__ import annotations

import functools
import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lens_fast.model import prompts

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2.5-VL's special tokens (the same strings as the released tokenizer)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat format for system/user/assistant turns with images (used when a tokenizer has none)."""

TINY_VOCAB_SIZE = 512


def _corpus() -> list[str]:
    from lens_fast.data.synthetic import COLOURS, EXTREME_WORDS, RELATION_WORDS, SHAPES

    nouns = [f"{c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
    nouns += list(SHAPES) + [f"{c} object" for c in COLOURS] + ["object"]
    expressions = [f"the {n}" for n in nouns]
    expressions += [f"the {w} {n}" for w in ("biggest", "largest", "smallest", *EXTREME_WORDS.values()) for n in nouns]
    expressions += [f"the {n} {r} the {m}" for n in nouns[:8] for r in RELATION_WORDS.values() for m in nouns[-8:]]
    lines = [prompts.SYSTEM_PROMPT, "system", "user", "assistant"]
    for i, expression in enumerate(expressions):
        style = prompts.PROMPT_STYLES[i % 2]
        box = (i % 97, (3 * i) % 89, 100 + i % 301, 90 + (7 * i) % 211)
        lines += [expression, prompts.question(expression, style), prompts.answer(expression, box, style)]
    return lines + [str(n) for n in range(1000)]


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A small Qwen-style tokenizer built offline, with Qwen's special tokens and chat template.
    The BPE is trained once per process and vocabulary size; each call returns a fresh tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


@functools.lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int) -> str:
    """The trained ``tokenizers`` BPE as JSON (training is deterministic: cached per process)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer.to_str()


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the special tokens the model needs; ValueError naming any the tokenizer lacks."""
    ids = {}
    for token in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"the tokenizer has no {token} token: it is not a Qwen2.5-VL tokenizer")
        ids[token] = int(token_id)
    return ids
