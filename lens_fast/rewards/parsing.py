"""Parse a policy's text answer into boxes and points: never raises, linear time, bounded work.

Forms understood, in the order tried (the first form found decides):
1. JSON in the answer: an object ``{"bbox": [x1, y1, x2, y2], "points_1": [x, y], "points_2": [x, y]}``
   (``bbox_2d`` / ``point_2d`` spellings too) or a list of such objects (VisionReasoner);
   ``[]`` is a valid answer with zero objects.
2. Qwen's grounding tags ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (any box form inside them).
3. LENS's plain forms: the first ``[a, b, c, d]``, else ``(a, b, c, d)``, else ``(a, b), (c, d)``;
   out-of-range numbers there (1e999) give no answer.

The answer region is the text between the first ``<answer>`` and the next ``</answer>`` (to the end when
unclosed); without an ``<answer>`` tag it is the whole text. LENS searched the whole completion; we
search the answer so that coordinates mentioned while thinking are not taken for the answer.
Coordinates are pixels of the frame the policy saw, xyxy, not reordered (x2 < x1 is kept: such a box
has zero area). A coordinate that is not a finite number within ``MAX_COORD`` (bools, strings, NaN,
inf, 1e400, 10**5000) makes its box or point invalid.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Optional

Box = tuple[float, float, float, float]
Point = tuple[float, float]

MAX_COORD = 1e6
"""Largest accepted |coordinate| in pixels; larger values are malformed (and would overflow float32 areas)."""
MAX_TEXT_CHARS = 200_000
"""Default cap on the text length parsed; a longer completion is no valid answer (bounded work)."""
_MAX_JSON_STARTS = 8  # '{' / '[' positions tried with json.raw_decode: bounded work on junk

# Regexes without nested or adjacent ambiguous quantifiers, so that matching is linear in the text.
_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
NUMBER = re.compile(_NUM)
"""A decimal number as written in answers (sign, fraction, exponent); group 1 is its text."""
_SEP = r"\s*,\s*"
_BRACKETS = re.compile(rf"\[\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\]")
_PARENS = re.compile(rf"\(\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\)")
_PAIRS = re.compile(rf"\(\s*{_NUM}{_SEP}{_NUM}\s*\)\s*(?:,\s*)?\(\s*{_NUM}{_SEP}{_NUM}\s*\)")
_THINK_THEN_ANSWER = re.compile(r"</think>\s*<answer>")
_BOX_FORMS = (("brackets", _BRACKETS), ("parens", _PARENS), ("paren_pairs", _PAIRS))

_BOX_KEYS = ("bbox_2d", "bbox")
_POINT_KEYS = ("points_1", "points_2", "point_2d")


@dataclass(frozen=True)
class AnswerObject:
    """One object of an answer. ``box``: xyxy or None when absent/malformed; ``points``: the valid points
    among ``points_1``, ``points_2``, ``point_2d``, in that order."""

    box: Optional[Box]
    points: tuple[Point, ...] = ()


@dataclass(frozen=True)
class ParsedAnswer:
    """What a completion answered.

    ``objects``: every object found (JSON list items in order; one object for the other forms);
    ``form``: "json", "box_tag", "brackets", "parens", "paren_pairs" or "none" (no answer found).
    """

    objects: tuple[AnswerObject, ...] = ()
    form: str = "none"

    @property
    def box(self) -> Optional[Box]:
        """The first object's box (the single-object rewards use it), or None."""
        return self.objects[0].box if self.objects else None

    @property
    def found(self) -> bool:
        """True when some answer form was found (``[]`` counts: a valid answer naming no object)."""
        return self.form != "none"


NO_ANSWER = ParsedAnswer()


def coordinate(value: object) -> Optional[float]:
    """``value`` as a float if it is a real number (not bool) with |value| <= MAX_COORD, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) and abs(x) <= MAX_COORD else None


def as_box(value: object) -> Optional[Box]:
    """A list/tuple of 4 valid coordinates as a Box, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    xs = [coordinate(v) for v in value]
    return None if None in xs else (xs[0], xs[1], xs[2], xs[3])


def as_point(value: object) -> Optional[Point]:
    """A list/tuple of 2 valid coordinates as a Point, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    xs = [coordinate(v) for v in value]
    return None if None in xs else (xs[0], xs[1])


def object_from_json(item: object) -> AnswerObject:
    """One JSON answer item (a dict with bbox/bbox_2d and point keys) as an AnswerObject; other items
    (numbers, strings, lists) give an object with neither box nor points."""
    if not isinstance(item, dict):
        return AnswerObject(None)
    box = next((as_box(item[k]) for k in _BOX_KEYS if k in item), None)
    points = tuple(p for p in (as_point(item[k]) for k in _POINT_KEYS if k in item) if p is not None)
    return AnswerObject(box, points)


def objects_from_json(value: object) -> Optional[tuple[AnswerObject, ...]]:
    """The objects of a decoded JSON answer: a dict is one object, a list (empty, or holding at least
    one dict) its items; None for anything else (e.g. a bare list of numbers)."""
    if isinstance(value, dict):
        return (object_from_json(value),)
    if isinstance(value, list) and (not value or any(isinstance(v, dict) for v in value)):
        return tuple(object_from_json(v) for v in value)
    return None


def answer_region(text: str) -> str:
    """Text between the first ``<answer>`` and the next ``</answer>`` (to the end if unclosed), else ``text``."""
    start = text.find("<answer>")
    if start < 0:
        return text
    start += len("<answer>")
    end = text.find("</answer>", start)
    return text[start:] if end < 0 else text[start:end]


def think_answer_format(text: str, *, strict: bool = True) -> bool:
    """Whether ``text`` is laid out as ``<think>…</think>`` then ``<answer>…</answer>``.

    ``strict=True``: the whole text must be that (Seg-Zero / VisionReasoner: ``re.fullmatch`` of
    ``<think>.*?</think>\\s*<answer>.*?</answer>``, DOTALL); ``strict=False``: it must start so (LENS:
    ``re.match``). Same answers as those regexes, in linear time.
    """
    if not isinstance(text, str) or not text.startswith("<think>"):
        return False
    match = _THINK_THEN_ANSWER.search(text, len("<think>"))
    if match is None:
        return False
    if strict:
        return text.endswith("</answer>") and len(text) - len("</answer>") >= match.end()
    return text.find("</answer>", match.end()) >= 0


def _json_objects(region: str) -> Optional[tuple[AnswerObject, ...]]:
    """Objects of the first JSON value that is an answer, decoded from one of the first few '{' / '['
    (so fenced ```json blocks and surrounding prose are fine)."""
    decoder = json.JSONDecoder()
    position, tries = 0, 0
    while tries < _MAX_JSON_STARTS:
        starts = [i for i in (region.find("{", position), region.find("[", position)) if i >= 0]
        if not starts:
            return None
        start = min(starts)
        tries += 1
        try:
            value, _ = decoder.raw_decode(region, start)
            found = objects_from_json(value)
            if found is not None:
                return found
        except (ValueError, RecursionError):
            pass
        position = start + 1
    return None


def _plain_box(region: str) -> Optional[tuple[str, Optional[Box]]]:
    """LENS's order: first ``[a,b,c,d]``, else ``(a,b,c,d)``, else ``(a,b),(c,d)``: (form, box or None)."""
    for form, pattern in _BOX_FORMS:
        match = pattern.search(region)
        if match is not None:
            return form, as_box([float(g) for g in match.groups()])
    return None


def _box_answer(form: str, box: Optional[Box]) -> ParsedAnswer:
    return NO_ANSWER if box is None else ParsedAnswer((AnswerObject(box),), form)


def parse_answer(text: object, *, max_chars: Optional[int] = MAX_TEXT_CHARS) -> ParsedAnswer:
    """Parse one completion (see the module docstring). Never raises: anything unusable (not a str,
    longer than ``max_chars`` when that is not None, no answer form) gives ``NO_ANSWER``."""
    if not isinstance(text, str) or (max_chars is not None and len(text) > max_chars):
        return NO_ANSWER
    region = answer_region(text)
    objects = _json_objects(region)
    if objects is not None:
        return ParsedAnswer(objects, "json")
    tag_start = region.find("<|box_start|>")
    if tag_start >= 0:
        tag_end = region.find("<|box_end|>", tag_start)
        tagged = _plain_box(region[tag_start + len("<|box_start|>") : tag_end if tag_end >= 0 else None])
        if tagged is not None:
            return _box_answer("box_tag", tagged[1])
    plain = _plain_box(region)
    return NO_ANSWER if plain is None else _box_answer(*plain)
