"""The policy's prompts and the answers it is taught to write.

Two styles (``LensConfig.prompt_style``):

- ``grounding`` (LENS's RefCOCO model): the user asks "Output the bounding box of the {expression} in
  the image."; the answer is Qwen's grounding form
  ``<|object_ref_start|>{expression}<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``.
- ``cot`` (LENS's ReasonSeg model, Seg-Zero): think first, then one JSON box:
  ``<think>...</think><answer>{"bbox_2d": [x1, y1, x2, y2]}</answer>``.

Boxes in prompts and answers are integer xyxy pixels of the image as the policy saw it (after Qwen's
smart resize); :func:`lens_fast.rewards.parse_answer` reads every answer form written here.
"""
from __future__ import annotations

from typing import Sequence

PROMPT_STYLES = ("grounding", "cot")
SYSTEM_PROMPT = "You are a helpful assistant."
GROUNDING_QUESTION = "Output the bounding box of the {expression} in the image."
COT_QUESTION = (
    "Please find '{expression}' with bbox. Output the thinking process in <think> </think> and the final "
    'answer in <answer> </answer> tags, as <answer>{{"bbox_2d": [x1, y1, x2, y2]}}</answer>.'
)


def check_style(style: object) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {style!r}")
    return str(style)


def _object_name(expression: str) -> str:
    """'the red circle' -> 'red circle': the question already says 'the'."""
    return expression[4:] if expression.lower().startswith("the ") else expression


def question(expression: str, style: str) -> str:
    """The user's text for one expression."""
    template = GROUNDING_QUESTION if check_style(style) == "grounding" else COT_QUESTION
    return template.format(expression=_object_name(expression))


def messages(expression: str, style: str) -> list[dict]:
    """Chat messages (system + user with one image) for the tokenizer's chat template."""
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(expression, style)}]},
    ]


def answer(expression: str, box: Sequence[float], style: str) -> str:
    """The target answer for ``box`` (xyxy in the policy's frame), rounded to integer pixels."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    if check_style(style) == "grounding":
        return (
            f"<|object_ref_start|>{_object_name(expression)}<|object_ref_end|>"
            f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
        )
    return (
        f"<think>The {_object_name(expression)} is at ({x1},{y1}),({x2},{y2}).</think>"
        f'<answer>{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}</answer>'
    )
