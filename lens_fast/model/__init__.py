"""The LENS model: a Qwen2.5-VL policy, context queries + connector, and SAM (one component per file).

``build_tiny_lens()`` builds a tiny random model offline; ``LensModel.from_pretrained(dir)`` loads our
checkpoints; ``LensModel.from_components(qwen_dir, sam_checkpoint, sam_type)`` loads released weights.
``model.segment(images, expressions)`` runs inference.
"""
from lens_fast.model.answer_segmenter import AnswerSegmenter
from lens_fast.model.build import (
    SAM_TYPES,
    architecture,
    build_lens,
    build_tiny_lens,
    from_components,
    from_pretrained,
    real_config,
    save_pretrained,
    tiny_config,
)
from lens_fast.model.config import MODES, LensConfig, SamConfig
from lens_fast.model.lens import ImageBatch, ImageCache, LensModel, Segmentation
from lens_fast.model.policy import Completions, PromptBatch
from lens_fast.model.tokenizer import build_tiny_tokenizer

__all__ = [
    "AnswerSegmenter",
    "MODES",
    "SAM_TYPES",
    "Completions",
    "ImageBatch",
    "ImageCache",
    "LensConfig",
    "LensModel",
    "PromptBatch",
    "SamConfig",
    "Segmentation",
    "architecture",
    "build_lens",
    "build_tiny_lens",
    "build_tiny_tokenizer",
    "from_components",
    "from_pretrained",
    "real_config",
    "save_pretrained",
    "tiny_config",
]
