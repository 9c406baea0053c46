"""``LensConfig``: everything needed to build a LENS model, as plain JSON-able values.

``qwen`` is a ``Qwen2_5_VLConfig`` as a dict (``config.json`` of a Qwen2.5-VL checkpoint); ``sam`` is a
:class:`SamConfig` as a dict. The real architectures ship in ``configs/`` (see
:func:`lens_fast.model.build.real_config`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Tuple

from lens_fast.model.prompts import check_style

MODES = ("queries", "prompts")
"""``queries``: LENS (the connector's token prompts SAM; SAM's decoder trains). ``prompts``: Seg-Zero
(a frozen SAM prompted with the box and points parsed from the policy's answer)."""


@dataclass(frozen=True)
class SamConfig:
    """segment_anything's ``Sam`` sizes. Defaults: SAM ViT-B (``build_sam_vit_b``)."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    use_rel_pos: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"sam image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.prompt_embed_dim % 8:
            raise ValueError(f"sam prompt_embed_dim must be divisible by 8, got {self.prompt_embed_dim}")
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(self.encoder_global_attn_indexes))

    @property
    def embedding_size(self) -> int:
        """Side of SAM's image embedding grid (64 for the real models)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class LensConfig:
    """A LENS model: the policy (``qwen``), context queries + connector, and SAM (``sam``)."""

    qwen: dict
    sam: dict = field(default_factory=lambda: dataclasses.asdict(SamConfig()))
    mode: str = "queries"
    prompt_style: str = "grounding"
    num_queries: int = 64
    connector_depth: int = 4
    connector_heads: int = 16
    connector_mlp_ratio: float = 4.0
    query_init_std: float = 0.02
    min_pixels: int = 56 * 56
    max_pixels: int = 1280 * 28 * 28
    max_new_tokens: int = 768

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_style(self.prompt_style)
        for name in ("num_queries", "connector_depth", "connector_heads", "min_pixels", "max_pixels", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        # canonical form (validated; tuples, not JSON lists), so that a config equals itself reloaded
        sam = self.sam if isinstance(self.sam, SamConfig) else self.sam_config
        object.__setattr__(self, "sam", dataclasses.asdict(sam))
        hidden = self.text_hidden_size
        if hidden % self.connector_heads:
            raise ValueError(f"connector_heads {self.connector_heads} must divide the text hidden size {hidden}")

    @property
    def sam_config(self) -> SamConfig:
        if isinstance(self.sam, SamConfig):
            return self.sam
        known = {f.name for f in dataclasses.fields(SamConfig)}
        unknown = sorted(set(self.sam) - known)
        if unknown:
            raise ValueError(f"unknown sam config keys {unknown}; known: {sorted(known)}")
        return SamConfig(**self.sam)

    @property
    def text_hidden_size(self) -> int:
        text = self.qwen.get("text_config") or self.qwen
        return int(text["hidden_size"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LensConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LensConfig keys {unknown}; known: {sorted(known)}")
        return cls(**values)
