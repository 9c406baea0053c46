"""A frozen SAM prompted with a policy's parsed answer (Seg-Zero's ``prompts`` mode) as a mask function.

This is the ``segmenter`` that the TRL / verl reward adapters (:class:`lens_fast.rewards.adapters.TRLReward`,
:func:`~lens_fast.rewards.adapters.compute_score_batch`) call once per completion, so that each
completion of a group gets its own mask and the mask reward can tell them apart::

    segmenter = AnswerSegmenter.from_model(LensModel.from_pretrained(ckpt))   # or from_components(...)
    reward = TRLReward("lens", segmenter=segmenter, image_key="image")
    mask = segmenter(image, parse_answer(text))   # bool [H, W] at the image's own size

SAM's image embedding is computed once per image and kept in a small LRU cache keyed by the image's
path or pixel content, so the G completions of one prompt (TRL hands over G copies of its row) share
one encoder pass (SAM's image encoder is taken to be frozen, as in LENS and Seg-Zero). Coordinates: with ``policy_frame`` (a :class:`QwenPatchConfig`) the answer's box and
points are in the frame Qwen's smart resize made of the image (as our policy and TRL's Qwen2.5-VL
answer); with ``policy_frame=None`` they are pixels of the image itself.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from os import PathLike
from typing import Optional, Union

import numpy as np
import torch

from lens_fast.model.image_processing import ImageLike, QwenPatchConfig, load_image, smart_resize
from lens_fast.model.segmenter import Segmenter
from lens_fast.rewards import parse_answer
from lens_fast.rewards.parsing import ParsedAnswer


class AnswerSegmenter:
    """``(image, answer) -> bool mask [H, W]``: SAM prompted with the answer's first box and its points
    (foreground clicks); an answer without a box gives an empty mask. SAM runs under
    ``torch.inference_mode`` (frozen: no gradient, and the module itself is not modified)."""

    def __init__(self, segmenter: Segmenter, *, policy_frame: Optional[QwenPatchConfig] = None, cache_size: int = 16) -> None:
        if not isinstance(segmenter, Segmenter):
            raise TypeError(f"segmenter must be a lens_fast.model.segmenter.Segmenter, got {type(segmenter).__name__}")
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self.segmenter = segmenter  # used under inference_mode; its flags (train/eval, requires_grad) are left as they are
        self.policy_frame = policy_frame
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        self.encodes = 0  # SAM image-encoder passes so far (the cache's effect, for tests and logs)

    @classmethod
    def from_model(cls, model, **kwargs) -> "AnswerSegmenter":
        """The SAM of a :class:`~lens_fast.model.LensModel`, answers in its policy's (Qwen-resized) frame."""
        kwargs.setdefault("policy_frame", model.patching)
        return cls(model.segmenter, **kwargs)

    def _key(self, image: ImageLike) -> tuple:
        if isinstance(image, (str, PathLike)):
            return ("path", str(image))
        pixels = load_image(image, "image")
        digest = hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest()
        return ("pixels", pixels.shape, digest)

    @torch.inference_mode()
    def embedding(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int]]:
        """SAM's image embedding [1, C, e, e] and the image's (H, W), from the cache when seen recently."""
        key = self._key(image)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pixels = load_image(image, "image")
        value = (self.segmenter.embed_images([pixels]), (int(pixels.shape[0]), int(pixels.shape[1])))
        self.encodes += 1
        self._cache[key] = value
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def clear(self) -> None:
        self._cache.clear()

    @torch.inference_mode()
    def __call__(self, image: ImageLike, answer: Union[ParsedAnswer, str]) -> np.ndarray:
        if isinstance(answer, str):
            answer = parse_answer(answer)
        if not isinstance(answer, ParsedAnswer):
            raise TypeError(f"answer must be a ParsedAnswer or a str, got {type(answer).__name__}")
        embedding, (height, width) = self.embedding(image)
        if answer.box is None:
            return np.zeros((height, width), dtype=bool)
        scale = (1.0, 1.0)
        if self.policy_frame is not None:
            f = self.policy_frame
            h, w = smart_resize(height, width, f.patch_size * f.merge_size, f.min_pixels, f.max_pixels)
            scale = (width / w, height / h)
        low_res, _, _ = self.segmenter.decode_answers(
            embedding, [answer], torch.tensor([scale]), torch.tensor([[height, width]])
        )
        return self.segmenter.masks(low_res[0], (height, width)).cpu().numpy()
