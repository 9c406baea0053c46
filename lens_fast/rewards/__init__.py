"""Rewards for RL fine-tuning of referring segmentation: a robust answer parser and the LENS, Seg-Zero
and VisionReasoner reward recipes, whose numeric part runs through ``lens_fast.ops`` in one fused call
per batch; plus adapters for TRL and verl."""
from lens_fast.rewards.parsing import NO_ANSWER, AnswerObject, ParsedAnswer, parse_answer, think_answer_format

__all__ = ["NO_ANSWER", "AnswerObject", "ParsedAnswer", "parse_answer", "think_answer_format"]
