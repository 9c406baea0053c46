"""``LensModel``: the Qwen2.5-VL policy, context queries + connector, and SAM, with the calls a trainer
needs (encode once, generate, score completions, masks) and ``segment()`` for inference.

Frames: ``original_sizes`` are each image's own (H, W); ``policy_sizes`` the (h, w) the policy saw
after Qwen's smart resize, in which its answers' boxes are written. Every box this class returns is
xyxy in original pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from lens_fast.model import prompts as prompt_text
from lens_fast.model.config import LensConfig
from lens_fast.model.connector import Connector, ContextQueries
from lens_fast.model.image_processing import ImageLike, QwenPatchConfig, load_image, qwen_patches
from lens_fast.model.policy import Completions, Policy, PromptBatch
from lens_fast.model.segmenter import Segmenter, frame_scales, scaled_box
from lens_fast.model.tokenizer import SPECIAL_TOKENS
from lens_fast.rewards import parse_answer

log = logging.getLogger("lens_fast.model")

PARTS = ("vision", "llm", "queries", "connector", "sam_encoder", "sam_decoder")
"""Names of :meth:`LensModel.parts`, the groups a trainer freezes or trains."""


@dataclass
class Segmentation:
    """One expression's result: ``mask`` bool [H, W] at the image's own size; ``box`` xyxy original
    pixels (the policy's answer) or None; ``text`` the policy's answer; ``score`` SAM's predicted IoU."""

    mask: np.ndarray
    box: Optional[tuple[float, float, float, float]]
    text: str
    score: float


@dataclass
class ImageBatch:
    """B images ready for both models: RGB uint8 arrays, their (H, W) ``original_sizes`` and the
    policy's (h, w) ``policy_sizes`` (int64 [B, 2]), Qwen patches (concatenated) and grids [B, 3]."""

    images: list[np.ndarray]
    original_sizes: torch.Tensor
    policy_sizes: torch.Tensor
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def select(self, indices: Sequence[int]) -> "ImageBatch":
        """The images at ``indices`` (in that order), patches included; ``self`` when that is all of them."""
        if list(indices) == list(range(len(self))):
            return self
        counts = self.grid_thw.prod(-1).tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        patches = [self.pixel_values[starts[i] : starts[i] + counts[i]] for i in indices]
        return ImageBatch(
            images=[self.images[i] for i in indices],
            original_sizes=self.original_sizes[list(indices)],
            policy_sizes=self.policy_sizes[list(indices)],
            pixel_values=torch.cat(patches) if patches else self.pixel_values[:0],
            grid_thw=self.grid_thw[list(indices)],
        )


@dataclass
class ImageCache:
    """One encoding per image, shared by every completion of its group and every pass over them:
    ``vision``: the policy's image tokens, one [n_i, hidden] per image; ``sam``: SAM's image
    embeddings [B, C, e, e], or an empty tensor when not computed (``encode(..., sam=False)``)."""

    vision: list[torch.Tensor]
    sam: torch.Tensor

    def select(self, indices: Sequence[int]) -> "ImageCache":
        """The encodings of the images at ``indices``; ``self`` when that is all of them."""
        if list(indices) == list(range(len(self.vision))):
            return self
        return ImageCache([self.vision[i] for i in indices], self.sam[list(indices)] if self.sam.numel() else self.sam)

    def detach(self) -> "ImageCache":
        return ImageCache([v.detach() for v in self.vision], self.sam.detach())


def check_expressions(expressions: object, count: int) -> list[str]:
    if isinstance(expressions, str) or not isinstance(expressions, Sequence):
        raise TypeError(f"expressions must be a list of strings, got {type(expressions).__name__}")
    if len(expressions) != count:
        raise ValueError(f"got {count} images but {len(expressions)} expressions: give one expression per image")
    for i, expression in enumerate(expressions):
        if not isinstance(expression, str):
            raise TypeError(f"expressions[{i}] must be a string, got {type(expression).__name__}")
        if not expression.strip():
            raise ValueError(f"expressions[{i}] is empty")
        special = [t for t in SPECIAL_TOKENS if t in expression]
        if special:
            raise ValueError(f"expressions[{i}] contains the special token(s) {special}: they are not text")
    return list(expressions)


class LensModel(nn.Module):
    """A LENS model. Build it with :func:`lens_fast.model.build_tiny_lens`,
    :meth:`from_pretrained` or :meth:`from_components`."""

    def __init__(self, config: LensConfig, policy: Policy, segmenter: Segmenter) -> None:
        super().__init__()
        self.config = config
        self.policy = policy
        self.segmenter = segmenter
        if config.mode == "queries":
            hidden = policy.hidden_size
            sam = config.sam_config
            self.queries = ContextQueries(config.num_queries, hidden, config.query_init_std)
            self.connector = Connector(
                config.num_queries, hidden, sam.prompt_embed_dim, config.connector_depth,
                config.connector_heads, config.connector_mlp_ratio,
                linear_init_std=policy.model.config.get_text_config().initializer_range,  # as LENS's post_init
            )
        vision = policy.model.config.vision_config
        self.patching = QwenPatchConfig(
            vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size, config.min_pixels, config.max_pixels
        )

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "LensModel":
        """Load our checkpoint (see :func:`lens_fast.model.build.from_pretrained`)."""
        from lens_fast.model.build import from_pretrained

        return from_pretrained(directory, **kwargs)

    @classmethod
    def from_components(cls, qwen_dir, sam_checkpoint, sam_type="vit_l", **kwargs) -> "LensModel":
        """Released Qwen2.5-VL + SAM weights; ``sam_type`` "vit_b"/"vit_l"/"vit_h", a SamConfig or a dict
        (see :func:`lens_fast.model.build.from_components`)."""
        from lens_fast.model.build import from_components

        return from_components(qwen_dir, sam_checkpoint, sam_type, **kwargs)

    def save_pretrained(self, directory) -> None:
        """Write config, weights and tokenizer (see :func:`lens_fast.model.build.save_pretrained`)."""
        from lens_fast.model.build import save_pretrained

        save_pretrained(self, directory)

    def parts(self) -> dict[str, list[nn.Module]]:
        """The model's trainable groups by name (:data:`PARTS`): the policy's vision tower, its language
        model + LM head, the context queries, the connector, SAM's image encoder, SAM's prompt encoder +
        mask decoder (queries and connector: empty in ``prompts`` mode)."""
        extra = {name: [getattr(self, name)] if hasattr(self, name) else [] for name in ("queries", "connector")}
        return {
            "vision": [self.policy.visual],
            "llm": [self.policy.language_model, self.policy.lm_head],
            **extra,
            "sam_encoder": [self.segmenter.image_encoder],
            "sam_decoder": [self.segmenter.prompt_encoder, self.segmenter.mask_decoder],
        }

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    @property
    def device(self) -> torch.device:
        return self.policy.lm_head.weight.device

    # ---- inputs -------------------------------------------------------------------------------------
    def prepare_images(self, images: Sequence[ImageLike]) -> ImageBatch:
        """Images (PIL of any mode, uint8 arrays [H, W(, 3|4)], or paths) -> :class:`ImageBatch`."""
        if isinstance(images, (str, np.ndarray)) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a list of images, got {type(images).__name__}")
        rgb = [load_image(image, f"images[{i}]") for i, image in enumerate(images)]
        patches, grids, sizes = zip(*(qwen_patches(image, self.patching) for image in rgb)) if rgb else ((), (), ())
        return ImageBatch(
            images=rgb,
            original_sizes=torch.tensor([image.shape[:2] for image in rgb], dtype=torch.int64).view(-1, 2),
            policy_sizes=torch.tensor(sizes, dtype=torch.int64).view(-1, 2),
            pixel_values=torch.cat(patches) if patches else torch.empty(0),
            grid_thw=torch.tensor(grids, dtype=torch.int64).view(-1, 3),
        )

    def prompt_texts(self, expressions: Sequence[str]) -> list[str]:
        """Chat-formatted prompts (system, user with the image and question, the assistant's turn opened)."""
        style = self.config.prompt_style
        return [
            self.tokenizer.apply_chat_template(prompt_text.messages(e, style), tokenize=False, add_generation_prompt=True)
            for e in expressions
        ]

    def tokenize_prompts(self, images: ImageBatch, expressions: Sequence[str]) -> PromptBatch:
        expressions = check_expressions(expressions, len(images))
        return self.policy.tokenize_prompts(self.prompt_texts(expressions), images.grid_thw)

    def encode(self, images: ImageBatch, *, sam: bool = True) -> ImageCache:
        """The policy's vision encoding and (with ``sam``) SAM's image embedding, once per image."""
        vision = self.policy.encode_images(images.pixel_values.to(self.device), images.grid_thw.to(self.device))
        embeddings = self.segmenter.embed_images(images.images) if sam else torch.empty(0)
        return ImageCache(vision, embeddings)

    def answer_ids(self, expressions: Sequence[str], boxes: torch.Tensor, policy_sizes: torch.Tensor,
                   original_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing targets: the answer for each original-pixel xyxy box [B, 4] (written in the
        policy's frame) + end-of-turn, right-padded: (ids int64 [B, L], mask bool [B, L])."""
        frame_boxes = boxes.float() * (policy_sizes / original_sizes).flip(-1).repeat(1, 2).float()
        end = self.tokenizer.convert_ids_to_tokens(self.policy.end_ids[0])
        rows = [
            self.tokenizer(prompt_text.answer(e, box.tolist(), self.config.prompt_style) + end, add_special_tokens=False)["input_ids"]
            for e, box in zip(expressions, frame_boxes)
        ]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.policy.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids.to(self.device), mask.to(self.device)

    # ---- the calls a trainer makes -----------------------------------------------------------------
    def generate(self, prompts: PromptBatch, cache: ImageCache, **sampling) -> Completions:
        """Completions with the KV cache; see :meth:`Policy.generate` for ``sampling``."""
        sampling.setdefault("max_new_tokens", self.config.max_new_tokens)
        return self.policy.generate(prompts, cache.vision, **sampling)

    def forward_completions(
        self, prompts: PromptBatch, cache: ImageCache, completions: Completions
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One pass: (hidden states predicting each completion token [N, L, hidden], context-query
        states [N, Q, hidden] in ``queries`` mode, else None)."""
        queries = self.queries(completions.ids.shape[0]) if self.config.mode == "queries" else None
        return self.policy.forward_completions(prompts, cache.vision, completions.ids, completions.mask, queries)

    def forward(
        self, images: ImageBatch, prompts: PromptBatch, completions: Completions, temperature: float = 1.0,
        cache: Optional[ImageCache] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pass over N = B * G completions (row b * G + g answers prompt b): both image
        encodings once per image (or those of ``cache``; an empty ``cache.sam`` is computed here), then
        (per-token log-probs of the completions under softmax(logits / temperature), float32 [N, L];
        each completion's mask, low-res logits [N, 4e, 4e]: from the context queries, or in ``prompts``
        mode from SAM prompted by the answer)."""
        group = completions.ids.shape[0] // len(images)
        if cache is None:
            cache = self.encode(images)
        elif not cache.sam.numel():
            cache = ImageCache(cache.vision, self.segmenter.embed_images(images.images))
        hidden, states = self.forward_completions(prompts, cache, completions)
        logp = self.policy.token_logprobs(hidden, completions.ids, temperature)
        sam_rows = cache.sam.repeat_interleave(group, 0)
        if self.config.mode == "queries":
            low_res, _ = self.masks_from_queries(states, sam_rows)
        else:
            low_res, _, _ = self.masks_from_answers(
                self.decode_text(completions), sam_rows, images.policy_sizes.repeat_interleave(group, 0),
                images.original_sizes.repeat_interleave(group, 0),
            )
        return logp, low_res

    def masks_from_queries(self, query_states: torch.Tensor, sam_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LENS: connector token -> SAM. ``query_states`` [N, Q, hidden], ``sam_embeddings`` [N, C, e, e]
        (row i's image) -> (low-res logits [N, 4e, 4e], predicted IoU [N])."""
        token = self.connector(query_states)
        return self.segmenter.decode(sam_embeddings, tokens=token.to(sam_embeddings.dtype))

    def masks_from_answers(
        self, texts: Sequence[str], sam_embeddings: torch.Tensor, policy_sizes: torch.Tensor, original_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[Optional[tuple]]]:
        """Seg-Zero: SAM prompted with each answer's parsed box and points. ``texts`` [N],
        ``sam_embeddings`` [N, C, e, e], sizes int64 [N, 2] -> (low-res logits [N, 4e, 4e] (an answer
        without a box gets an empty mask), predicted IoU [N] (0 there), boxes in original pixels)."""
        scales = frame_scales(policy_sizes, original_sizes)
        return self.segmenter.decode_answers(sam_embeddings, [parse_answer(t) for t in texts], scales, original_sizes)

    def policy_boxes(self, texts: Sequence[str], policy_sizes: torch.Tensor, original_sizes: torch.Tensor) -> list[Optional[tuple]]:
        """Each answer's first box, from the policy's frame to original pixels (None when it gave none)."""
        scales = frame_scales(policy_sizes, original_sizes)
        return [scaled_box(parse_answer(text), scale) for text, scale in zip(texts, scales)]

    def decode_text(self, completions: Completions) -> list[str]:
        """Completion texts, special tokens kept (the grounding answer is written with them), the
        end-of-turn token and padding dropped."""
        out = []
        for ids, mask in zip(completions.ids.tolist(), completions.mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m and t not in self.policy.end_ids]
            out.append(self.tokenizer.decode(kept, skip_special_tokens=False))
        return out

    # ---- inference -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def segment(
        self, images: Sequence[ImageLike], expressions: Sequence[str], *, batch_size: int = 8,
        max_new_tokens: Optional[int] = None,
    ) -> list[Segmentation]:
        """Greedy answer + mask for each (image, expression) pair, ``batch_size`` pairs at a time."""
        if isinstance(images, (str, np.ndarray)) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a list of images, got {type(images).__name__}")
        expressions = check_expressions(expressions, len(images))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        results: list[Segmentation] = []
        for start in range(0, len(images), batch_size):
            batch = self.prepare_images(images[start : start + batch_size])
            results += self._segment_batch(batch, expressions[start : start + batch_size], max_new_tokens)
        return results

    def predict(
        self, images: ImageBatch, expressions: Sequence[str], max_new_tokens: Optional[int] = None
    ) -> tuple[list[str], torch.Tensor, torch.Tensor, list[Optional[tuple]]]:
        """Greedy answers and their masks: (texts, low-res logits [B, 4e, 4e] in SAM v1's padded frame
        (``segmenter.masks`` brings them to each image's size), SAM's predicted IoU [B], boxes in original
        pixels or None)."""
        prompts = self.tokenize_prompts(images, expressions)
        cache = self.encode(images)
        completions = self.generate(prompts, cache, max_new_tokens=max_new_tokens or self.config.max_new_tokens, temperature=0.0)
        texts = self.decode_text(completions)
        if self.config.mode == "queries":
            _, states = self.forward_completions(prompts, cache, completions)
            low_res, score = self.masks_from_queries(states, cache.sam)
            return texts, low_res, score, self.policy_boxes(texts, images.policy_sizes, images.original_sizes)
        low_res, score, boxes = self.masks_from_answers(texts, cache.sam, images.policy_sizes, images.original_sizes)
        return texts, low_res, score, boxes

    def _segment_batch(self, images: ImageBatch, expressions: Sequence[str], max_new_tokens: Optional[int]) -> list[Segmentation]:
        texts, low_res, score, boxes = self.predict(images, expressions, max_new_tokens)
        out = []
        for i, (height, width) in enumerate(images.original_sizes.tolist()):
            mask = self.segmenter.masks(low_res[i], (height, width))
            out.append(Segmentation(mask.cpu().numpy(), boxes[i], texts[i], float(score[i])))
        return out
