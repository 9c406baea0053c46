"""The policy: ``transformers``' Qwen2.5-VL as released, driven with cached image encodings.

Prompts are left-padded, completions right-padded. One vision encoding per image serves the prompt's
prefill and every completion of its group; the multimodal rotary positions (M-RoPE) are computed here
from the token ids and image grids (the rule of ``Qwen2_5_VLModel.get_rope_index``), so generation,
teacher-forced scoring and the context queries all agree on positions.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration, StaticCache

from lens_fast import ops
from lens_fast.model.tokenizer import special_token_ids

log = logging.getLogger("lens_fast.model")


@dataclass
class PromptBatch:
    """B tokenized prompts, left-padded to P tokens, each with one image.

    input_ids / attention_mask: int64 [B, P]; positions: int64 [3, B, P] (M-RoPE; pads 0);
    next_position: int64 [B], the position of the first token after each prompt.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    next_position: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, indices: Sequence[int]) -> "PromptBatch":
        """The prompts at ``indices`` (same padded length P); ``self`` when that is all of them."""
        rows = list(indices)
        if rows == list(range(len(self))):
            return self
        return PromptBatch(self.input_ids[rows], self.attention_mask[rows], self.positions[:, rows], self.next_position[rows])


@dataclass
class Completions:
    """N = B * G sampled completions (row b * G + g answers prompt b), right-padded to L tokens.

    ids: int64 [N, L] (pad id after the end); mask: bool [N, L], True for tokens of the completion
    (up to and including its end-of-turn token); truncated: bool [N], True where no end-of-turn token
    came within ``max_new_tokens``.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)

    def select(self, rows: slice) -> "Completions":
        """Rows ``rows`` (same padded length L)."""
        return Completions(self.ids[rows], self.mask[rows], self.truncated[rows])


def mrope_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, grid_thw: torch.Tensor, image_token_id: int, merge_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's M-RoPE positions of left-padded prompts with one image each.

    Text tokens count up on all three axes; an image of (t, h, w) patches occupies (h/m) x (w/m) tokens
    whose (temporal, row, column) positions are offset by the text before it; text after it resumes at
    that offset + max(h/m, w/m). Returns (positions int64 [3, B, P], next position int64 [B]).
    """
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.int64, device=input_ids.device)
    next_position = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
    for b in range(batch):
        valid = attention_mask[b].bool()
        ids = input_ids[b, valid]
        is_image = ids == image_token_id
        _, gh, gw = (int(v) for v in grid_thw[b])
        h, w = gh // merge_size, gw // merge_size
        if int(is_image.sum()) != h * w:
            raise ValueError(f"prompt {b} has {int(is_image.sum())} image tokens, its image grid needs {h * w}")
        start = int(is_image.nonzero()[0]) if h * w else len(ids)
        row = torch.arange(len(ids), device=ids.device).expand(3, -1).clone()
        grid = torch.stack(
            [
                torch.zeros(h * w, dtype=torch.int64, device=ids.device),
                torch.arange(h, device=ids.device).repeat_interleave(w),
                torch.arange(w, device=ids.device).repeat(h),
            ]
        )
        row[:, start : start + h * w] = grid + start
        row[:, start + h * w :] += max(h, w) - h * w
        positions[:, b, valid] = row
        next_position[b] = int(row.max()) + 1
    return positions, next_position


Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: Generators = None, group: int = 1
) -> torch.Tensor:
    """One token per row of float logits [N, V]: greedy when ``temperature`` is 0, else sampled from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens (0 = all) and to the
    smallest set whose probability reaches ``top_p``. ``generator``: one for all rows, or one per group
    of ``group`` consecutive rows (a prompt's completions: then a prompt's samples do not depend on
    which other prompts share the batch, e.g. on how many processes split it)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep tokens until top_p is reached
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs.split(group), generator)]).squeeze(-1)


KV_CACHES = ("dynamic", "static")
"""``Policy.generate``'s KV caches: transformers' ``DynamicCache`` (grows by concatenation each step), or a
``StaticCache`` preallocated for the whole completion, whose fixed shapes let the decode step be
compiled with CUDA graphs on GPU (``torch.compile(mode="reduce-overhead")``; eager on CPU)."""


def check_sampling(num_generations: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                   kv_cache: str = "dynamic") -> None:
    """ValueError naming the first bad sampling argument."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    for name, value in (("num_generations", num_generations), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {top_k!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class Policy(nn.Module):
    """A ``Qwen2_5_VLForConditionalGeneration`` and its tokenizer."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, tokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        ids = special_token_ids(tokenizer)
        self.image_token_id = ids["<|image_pad|>"]
        self.end_ids = (ids["<|im_end|>"], ids["<|endoftext|>"])
        self.pad_id = ids["<|endoftext|>"]
        if model.config.image_token_id != self.image_token_id:
            raise ValueError(
                f"the model's image_token_id {model.config.image_token_id} is not the tokenizer's "
                f"<|image_pad|> id {self.image_token_id}"
            )
        params = inspect.signature(self.language_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed across transformers 5.x
        self._static: Optional[tuple[tuple, StaticCache]] = None  # (rows, length, dtype, device), its cache
        self._compiled_decode = None

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Patches of B images (concatenated) -> their merged vision tokens, one [n_i, hidden] each."""
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        sizes = (grid_thw.prod(-1) // self.merge_size**2).tolist()
        return list(torch.split(merged, sizes))

    def tokenize_prompts(self, texts: Sequence[str], grid_thw: torch.Tensor) -> PromptBatch:
        """Chat-formatted prompts, each with one ``<|image_pad|>``, expanded to its image's token count."""
        device = self.lm_head.weight.device
        rows = []
        for text, grid in zip(texts, grid_thw.tolist()):
            count = grid[0] * grid[1] * grid[2] // self.merge_size**2
            rows.append(self.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * count), add_special_tokens=False)["input_ids"])
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.int64)
        for b, row in enumerate(rows):
            input_ids[b, length - len(row):] = torch.tensor(row)
            attention_mask[b, length - len(row):] = 1
        positions, next_position = mrope_positions(input_ids, attention_mask, grid_thw, self.image_token_id, self.merge_size)
        return PromptBatch(input_ids.to(device), attention_mask.to(device), positions.to(device), next_position.to(device))

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def embed_prompts(self, prompts: PromptBatch, image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token embeddings [B, P, hidden] with each prompt's image tokens replaced by its image's encoding."""
        embeds = self.language_model.embed_tokens(prompts.input_ids)
        is_image = prompts.input_ids == self.image_token_id
        return embeds.masked_scatter(is_image.unsqueeze(-1), torch.cat(list(image_embeds)).to(embeds.dtype))

    def run(
        self, embeds: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, cache: Optional[DynamicCache] = None
    ) -> torch.Tensor:
        """The language model over [N, T, hidden] embeddings -> last hidden states [N, T, hidden]."""
        out = self.language_model(
            inputs_embeds=embeds, position_ids=positions, attention_mask=attention_mask,
            use_cache=cache is not None, **{self._cache_arg: cache},
        )
        return out.last_hidden_state

    @torch.no_grad()
    def generate(
        self,
        prompts: PromptBatch,
        image_embeds: Sequence[torch.Tensor],
        *,
        num_generations: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: Generators = None,
        kv_cache: str = "dynamic",
    ) -> Completions:
        """``num_generations`` completions per prompt with a KV cache: the prompts are prefilled once and
        their cache repeated for the group. ``temperature`` 0 is greedy. ``generator``: one torch
        generator, or one per prompt (see :func:`sample_next`). ``kv_cache``: see :data:`KV_CACHES`."""
        check_sampling(num_generations, max_new_tokens, temperature, top_p, top_k, kv_cache)
        if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != len(prompts):
            raise ValueError(f"generator must be one torch.Generator or one per prompt ({len(prompts)}), got {len(generator)}")
        group = num_generations
        cache = DynamicCache(config=self.model.config.text_config)
        hidden = self.run(self.embed_prompts(prompts, image_embeds), prompts.positions, prompts.attention_mask, cache)
        logits = self.lm_head(hidden[:, -1]).repeat_interleave(group, 0)
        attention_mask = prompts.attention_mask.repeat_interleave(group, 0)
        decode = self.decode_logits
        if kv_cache == "static":
            prompt_length = attention_mask.shape[1]
            cache = self.static_cache(cache, group, prompt_length + max_new_tokens)
            attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(len(attention_mask), max_new_tokens)], 1)
            if logits.device.type == "cuda":
                if self._compiled_decode is None:
                    self._compiled_decode = torch.compile(self.decode_logits, mode="reduce-overhead", dynamic=False)
                decode = lambda *inputs: self._compiled_decode(*inputs).clone()  # noqa: E731 (CUDA graphs reuse their output)
        elif group > 1:
            cache.batch_repeat_interleave(group)
        position = prompts.next_position.repeat_interleave(group, 0)
        count = logits.shape[0]
        device = logits.device
        ids = torch.full((count, max_new_tokens), self.pad_id, dtype=torch.int64, device=device)
        done = torch.zeros(count, dtype=torch.bool, device=device)
        ends = torch.tensor(self.end_ids, device=device)
        steps = 0
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator, group)
            token = torch.where(done, self.pad_id, token)
            ids[:, step] = token
            steps = step + 1
            done = done | torch.isin(token, ends)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            if kv_cache == "static":
                attention_mask[:, prompt_length + step] = 1
            else:
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
            pos = (position + step).view(1, count, 1).expand(3, -1, -1)
            logits = decode(token[:, None], pos, attention_mask, cache)
        ids = ids[:, :steps]
        ended = torch.isin(ids, ends)
        truncated = ~ended.any(1)
        length = torch.where(truncated, steps, ended.int().argmax(1) + 1)
        mask = torch.arange(steps, device=device)[None] < length[:, None]
        return Completions(ids.masked_fill(~mask, self.pad_id), mask, truncated)

    def decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
        """One decode step: the next-token logits [N, V] after ``tokens`` [N, 1] at M-RoPE ``positions``
        [3, N, 1] (the attention mask [N, T] covers the cache and these tokens)."""
        return self.lm_head(self.run(self.language_model.embed_tokens(tokens), positions, attention_mask, cache)[:, -1])

    def static_cache(self, prefill: DynamicCache, group: int, length: int) -> StaticCache:
        """A ``StaticCache`` of ``length`` positions holding ``prefill``'s B prompts, each repeated for its
        ``group`` rows. One is kept and reset between calls of the same shape, so that a compiled decode
        step (CUDA graphs record tensor addresses) is reused."""
        first = prefill.layers[0].keys
        key = (first.shape[0] * group, length, first.dtype, first.device)
        if self._static is None or self._static[0] != key:
            self._static = (key, StaticCache(config=self.model.config.text_config, max_cache_len=length))
        cache = self._static[1]
        cache.reset()
        positions = torch.arange(first.shape[2], device=first.device)
        for index, layer in enumerate(prefill.layers):
            cache.update(layer.keys.repeat_interleave(group, 0), layer.values.repeat_interleave(group, 0), index,
                         {"cache_position": positions})  # (read by transformers versions that index by position)
        return cache

    def forward_completions(
        self,
        prompts: PromptBatch,
        image_embeds: Sequence[torch.Tensor],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        queries: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Teacher-forced pass over prompt + completion (+ context queries) for N = B * G rows.

        ``completion_ids`` int64 [N, L], ``completion_mask`` bool [N, L] (right-padded); ``queries``
        [N, Q, hidden] or None. Layout per row: [left pad | prompt | completion | pad | queries]; the
        queries sit right after each completion in position (pads are masked out), and causal attention
        keeps them from changing any text state. Returns (hidden states that predict each completion
        token [N, L, hidden], query states [N, Q, hidden] or None).
        """
        count, length = completion_ids.shape
        group = count // len(prompts)
        if group * len(prompts) != count:
            raise ValueError(f"{count} completions are not a whole number of groups of {len(prompts)} prompts")
        prompt_embeds = self.embed_prompts(prompts, image_embeds).repeat_interleave(group, 0)
        mask = completion_mask.to(torch.int64)
        parts = [prompt_embeds, self.language_model.embed_tokens(completion_ids)]
        start = prompts.next_position.repeat_interleave(group, 0)
        steps = torch.arange(length, device=start.device)
        text_positions = [prompts.positions.repeat_interleave(group, 1), (start[:, None] + steps).expand(3, -1, -1)]
        masks = [prompts.attention_mask.repeat_interleave(group, 0), mask]
        if queries is not None:
            parts.append(queries.to(prompt_embeds.dtype))
            after = start + mask.sum(1)
            q = torch.arange(queries.shape[1], device=start.device)
            text_positions.append((after[:, None] + q).expand(3, -1, -1))
            masks.append(torch.ones(count, queries.shape[1], dtype=torch.int64, device=mask.device))
        hidden = self.run(torch.cat(parts, 1), torch.cat(text_positions, 2), torch.cat(masks, 1))
        prompt_length = prompts.input_ids.shape[1]
        token_hidden = hidden[:, prompt_length - 1 : prompt_length - 1 + length]
        query_states = hidden[:, prompt_length + length :] if queries is not None else None
        return token_hidden, query_states

    def token_logprobs(self, hidden: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log p(ids) under softmax(lm_head(hidden) / temperature): [N, L, hidden], int64 [N, L] -> float32
        [N, L], chunked over tokens (:func:`lens_fast.ops.token_logprobs`: no [N, L, vocab] logits)."""
        return ops.token_logprobs(hidden, self.lm_head.weight, ids, bias=self.lm_head.bias, temperature=temperature)
