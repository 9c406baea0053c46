"""SAM as the segmenter: segment_anything's image encoder, prompt encoder and (fused) mask decoder.

Geometry: the segmenter is always segment_anything's ``Sam`` (SAM v1: the released ViT-B/L/H weights,
or a random one such as the tiny default's, trained from scratch), so it always feeds images as SAM v1
was trained: an image of (H, W) is resized so its longest side is ``image_size``, aspect kept, to (h, w)
= :meth:`Segmenter.input_size` (``ops.resize_longest_side``, the one place the model computes it), and
zero-padded bottom/right to the ``image_size`` square. Boxes and points given here are xyxy / xy pixels
of the original image, mapped into that frame by ``x * w / W``, ``y * h / H``
(``ResizeLongestSide.apply_coords``). Masks come back as SAM's low-res logits [N, 4e, 4e] (e = the
embedding grid side; 256 x 256 for the real models), brought to each image's own size by
:meth:`Segmenter.masks` / :meth:`Segmenter.mask_stats` / :meth:`Segmenter.mask_loss`: bilinear to the
square, cropped to (h, w), bilinear to (H, W) (``Sam.postprocess_masks``). Same image, box and weights:
the same masks as ``SamPredictor``. (LENS's released code uses SAM2, which squashes each image to the
square instead.)
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from lens_fast import ops
from lens_fast.model.config import SamConfig
from lens_fast.model.image_processing import SAM_PIXEL_MEAN, SAM_PIXEL_STD, sam_input
from lens_fast.nn import fuse_mask_decoder
from lens_fast.rewards import ParsedAnswer

NO_MASK_LOGIT = -100.0
"""Low-res logit of every pixel of a prompt-mode mask whose completion gave no box (an empty mask)."""


def frame_scales(from_sizes: torch.Tensor, to_sizes: torch.Tensor) -> torch.Tensor:
    """float64 (sx, sy) [N, 2] taking pixel coordinates of images of (H, W) ``from_sizes`` [N, 2] to the
    same images at ``to_sizes`` [N, 2] (e.g. from the policy's frame to the original image)."""
    return (to_sizes / from_sizes).flip(-1).double()


def scaled_box(answer: ParsedAnswer, scale: torch.Tensor) -> Optional[tuple[float, float, float, float]]:
    """The answer's first xyxy box times ``scale`` (sx, sy), or None when it gave no box."""
    if answer.box is None:
        return None
    return tuple((torch.tensor(answer.box, dtype=torch.float64) * scale.double().cpu().repeat(2)).tolist())


def build_sam(config: SamConfig) -> Sam:
    """A randomly initialised ``Sam`` with ``config``'s sizes (segment_anything's ``_build_sam`` layout)."""
    grid = config.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.patch_size,
            qkv_bias=True,
            use_rel_pos=config.use_rel_pos,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.window_size,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam


class Segmenter(nn.Module):
    """SAM with its mask decoder fused (:func:`lens_fast.nn.fuse_mask_decoder`), fed in SAM v1's geometry
    (see the module docstring)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        fuse_mask_decoder(sam.mask_decoder)
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` and friends, except that the prompt encoder stays float32: segment_anything
        multiplies float32 coordinates by its positional-encoding buffer (a dtype error in bf16), and it
        is a few thousand parameters."""
        super()._apply(fn, recurse)
        if self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.is_floating_point():
            self.prompt_encoder.float()
        return self

    @property
    def image_size(self) -> int:
        return int(self.image_encoder.img_size)

    @property
    def low_res_size(self) -> int:
        return 4 * self.prompt_encoder.image_embedding_size[0]

    def input_size(self, original_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) of an image of ``original_size`` (H, W) inside SAM's square input: SAM v1's
        ``ResizeLongestSide`` (``ops.resize_longest_side``). The one place the model computes it
        (preprocessing, prompts, masks, mask loss, mask statistics and rewards)."""
        return ops.resize_longest_side(tuple(original_size), self.image_size)

    def masks(self, low_res: torch.Tensor, original_size: Sequence[int], threshold: Optional[float] = 0.0) -> torch.Tensor:
        """Low-res logits [..., 4e, 4e] of one image -> masks [..., H, W] at its ``original_size`` (bool
        ``logit > threshold``, or float32 logits with ``threshold=None``): ``Sam.postprocess_masks``."""
        original_size = tuple(original_size)
        return ops.postprocess_masks(low_res.float(), self.input_size(original_size), original_size,
                                     threshold=threshold, image_size=self.image_size)

    def mask_stats(self, low_res: torch.Tensor, gt: torch.Tensor) -> ops.MaskStats:
        """:class:`~lens_fast.ops.MaskStats` of low-res logits [..., G, 4e, 4e] (foreground: logit > 0 after
        ``Sam.postprocess_masks`` to the ground truth's size) against ``gt`` bool/uint8 [..., H, W] of one
        image (H, W), never writing the full-resolution masks."""
        original_size = tuple(gt.shape[-2:])
        return ops.postprocess_mask_stats(low_res.float(), gt, self.input_size(original_size), original_size,
                                          image_size=self.image_size)

    def mask_loss(self, low_res: torch.Tensor, gt_masks: Sequence[torch.Tensor]) -> ops.MaskLoss:
        """LENS's BCE + Dice (means over masks) of low-res logits [B, G, 4e, 4e] against B bool masks
        [H_b, W_b] at each image's own size (each shared by its G masks), the logits brought there by
        ``Sam.postprocess_masks`` without writing them (:func:`lens_fast.ops.mask_loss`)."""
        sizes = [tuple(g.shape) for g in gt_masks]
        return ops.mask_loss(low_res, list(gt_masks), [self.input_size(size) for size in sizes], sizes,
                             image_size=self.image_size, return_parts=True)

    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 [H_i, W_i, 3] images -> image embeddings [B, C, e, e] (one encoder pass each), each
        image preprocessed as ``SamPredictor.set_image`` does, at its :meth:`input_size`
        (:func:`~lens_fast.model.image_processing.sam_input`)."""
        weight = self.image_encoder.patch_embed.proj.weight
        sizes = [self.input_size(image.shape[:2]) for image in images]
        x = sam_input(images, sizes, self.image_size).to(device=weight.device, dtype=weight.dtype)
        return self.image_encoder(x)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        tokens: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt: (low-res logits [N, 4e, 4e], SAM's predicted IoU [N]).

        ``image_embeddings`` [N, C, e, e] (row i is prompt i's image); ``tokens`` [N, k, C] extra sparse
        prompt tokens (LENS's connector output); ``boxes`` [N, 4] xyxy and ``points`` [N, P, 2] xy
        (foreground clicks) in SAM's input frame (:meth:`to_input_frame`). Single-mask output (SAM's first
        mask token, ``multimask_output=False``).
        """
        pe = self.prompt_encoder
        prompt_points = None
        if points is not None:
            prompt_points = (points, torch.ones(points.shape[:2], dtype=torch.int64, device=points.device))
        sparse, dense = pe(points=prompt_points, boxes=boxes, masks=None)
        count = image_embeddings.shape[0]
        if sparse.shape[0] != count:  # no point or box: the prompt encoder made one empty row
            sparse = sparse.expand(count, -1, -1)
            dense = dense.expand(count, -1, -1, -1)
        if tokens is not None:
            sparse = torch.cat([sparse.to(tokens.dtype), tokens], dim=1)
        masks, iou = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=pe.get_dense_pe().to(image_embeddings.dtype),
            sparse_prompt_embeddings=sparse.to(image_embeddings.dtype),
            dense_prompt_embeddings=dense.to(image_embeddings.dtype),
            multimask_output=False,
        )
        return masks[:, 0], iou[:, 0]

    def decode_answers(
        self, image_embeddings: torch.Tensor, answers: Sequence[ParsedAnswer], scales: torch.Tensor, original_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[Optional[tuple]]]:
        """Seg-Zero's prompting: one mask per parsed answer, SAM prompted with its box and points.

        ``image_embeddings`` [N, C, e, e] (row i is answer i's image); ``scales`` [N, 2] (sx, sy) from the
        answers' frame to original pixels; ``original_sizes`` int64 [N, 2] (H, W). Returns (low-res
        logits [N, 4e, 4e]: :data:`NO_MASK_LOGIT` everywhere for an answer without a box, SAM's predicted
        IoU [N] (0 there), each answer's box in original pixels or None). Answers with the same number of
        points are decoded together.
        """
        count, device = len(answers), image_embeddings.device
        low_res = torch.full((count, self.low_res_size, self.low_res_size), NO_MASK_LOGIT, device=device,
                             dtype=image_embeddings.dtype)
        score = torch.zeros(count, device=device)
        scales = scales.double().cpu()
        boxes = [scaled_box(answer, scale) for answer, scale in zip(answers, scales)]
        by_points: dict[int, list[int]] = {}
        for i, answer in enumerate(answers):
            if answer.box is not None:
                by_points.setdefault(len(answer.objects[0].points), []).append(i)
        for points_per_answer, rows in by_points.items():
            index = torch.tensor(rows, device=device)
            sizes = original_sizes[rows].to(device)
            box = torch.tensor([boxes[i] for i in rows], dtype=torch.float64, device=device).view(-1, 2, 2)
            points = None
            if points_per_answer:  # float64 until SAM's frame, then float32 (as SamPredictor)
                xy = torch.tensor([answers[i].objects[0].points for i in rows], dtype=torch.float64) * scales[rows][:, None]
                points = self.to_input_frame(xy.to(device), sizes).float()
            box = self.to_input_frame(box, sizes).view(-1, 4).float()
            masks, iou = self.decode(image_embeddings[index], boxes=box, points=points)
            low_res[index] = masks.to(low_res.dtype)
            score[index] = iou.float()
        return low_res, score, boxes

    def to_input_frame(self, xy: torch.Tensor, original_sizes: torch.Tensor) -> torch.Tensor:
        """Pixel points [N, ..., 2] (x, y) of images with (H, W) ``original_sizes`` [N, 2] -> SAM's input
        frame, in ``xy``'s dtype (boxes: view them as [N, 2, 2]): x * w / W, y * h / H with (h, w) =
        :meth:`input_size`, computed in float64 as ``ResizeLongestSide.apply_coords``/``apply_boxes``."""
        if xy.dim() < 2 or xy.shape[-1] != 2 or xy.shape[0] != original_sizes.shape[0]:
            raise ValueError(f"xy must be [N, ..., 2] with N = {original_sizes.shape[0]} (original_sizes rows), "
                             f"got shape {tuple(xy.shape)}")
        scale = []
        for height, width in original_sizes.tolist():
            height_in, width_in = self.input_size((height, width))
            scale.append((width_in / width, height_in / height))
        scale = torch.tensor(scale, dtype=torch.float64, device=xy.device).view(len(scale), *([1] * (xy.dim() - 2)), 2)
        return (xy.double() * scale).to(xy.dtype)
