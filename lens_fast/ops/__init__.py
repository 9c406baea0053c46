"""Fused, validated mask, box and loss ops. The mask ops have Triton (CUDA), C++ (CPU) and PyTorch
backends (see ``lens_fast._backend`` for their ``backend`` argument); ``token_logprobs`` and
``mask_loss`` run chunked (Triton/cuBLAS on CUDA, torch on CPU); the box ops are plain PyTorch.
"""
from lens_fast.ops.box_convert import box_convert
from lens_fast.ops.box_iou import box_iou, box_iou_aligned
from lens_fast.ops.mask_loss import MaskLoss, mask_loss
from lens_fast.ops.mask_stats import MaskStats, mask_iou, mask_stats
from lens_fast.ops.postprocess_masks import postprocess_mask_stats, postprocess_masks, resize_longest_side
from lens_fast.ops.reward_iou import reward_iou
from lens_fast.ops.token_logprobs import token_logprobs

__all__ = [
    "MaskLoss",
    "MaskStats",
    "box_convert",
    "box_iou",
    "box_iou_aligned",
    "mask_iou",
    "mask_loss",
    "mask_stats",
    "postprocess_mask_stats",
    "postprocess_masks",
    "resize_longest_side",
    "reward_iou",
    "token_logprobs",
]
