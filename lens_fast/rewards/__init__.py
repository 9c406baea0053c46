"""Rewards for RL fine-tuning of referring segmentation: a robust answer parser and the LENS, Seg-Zero
and VisionReasoner reward recipes, whose numeric part runs through ``lens_fast.ops`` in one fused call
per batch; plus adapters for TRL (:class:`TRLReward`) and verl (:func:`compute_score`,
:func:`compute_score_batch`), from :mod:`lens_fast.rewards.adapters`."""
from lens_fast.rewards.adapters import TRLReward, compute_score, compute_score_batch
from lens_fast.rewards.batch import RewardOutput
from lens_fast.rewards.lens import lens_reward
from lens_fast.rewards.parsing import NO_ANSWER, AnswerObject, ParsedAnswer, parse_answer, think_answer_format
from lens_fast.rewards.seg_zero import seg_zero_reward
from lens_fast.rewards.vision_reasoner import vision_reasoner_reward

__all__ = [
    "NO_ANSWER",
    "AnswerObject",
    "ParsedAnswer",
    "RewardOutput",
    "TRLReward",
    "compute_score",
    "compute_score_batch",
    "lens_reward",
    "parse_answer",
    "seg_zero_reward",
    "think_answer_format",
    "vision_reasoner_reward",
]
