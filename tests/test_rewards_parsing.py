"""The answer parser: every form, LENS's regexes as an independent reference, and that any string
(fuzzed, truncated, huge numbers, 10 MB of junk, inputs built to make regexes backtrack) parses to an
answer or to "no valid answer" without raising, in bounded time."""
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_fast.rewards.parsing import (
    MAX_TEXT_CHARS,
    NO_ANSWER,
    AnswerObject,
    ParsedAnswer,
    answer_region,
    parse_answer,
    think_answer_format,
)

# LENS's three patterns (integers/decimals, LENS's own spacing rules): the reference for plain forms.
_N = r"(-?\d+(?:\.\d+)?)"
LENS_PATTERNS = [
    rf"\[\s*{_N},\s*{_N},\s*{_N},\s*{_N}\s*\]",
    rf"\(\s*{_N},\s*{_N},\s*{_N},\s*{_N}\s*\)",
    rf"\(\s*{_N},\s*{_N}\),\s*\(\s*{_N},\s*{_N}\)",
]
THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


def lens_box(text):
    for pattern in LENS_PATTERNS:
        match = re.search(pattern, text)
        if match:
            return tuple(float(g) for g in match.groups())
    return None


def one_box(box, form):
    return ParsedAnswer((AnswerObject(tuple(float(v) for v in box)),), form)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|><|im_end|>",
         one_box((10, 20, 30, 40), "box_tag")),
        ("the dog(10,20),(30,40)", one_box((10, 20, 30, 40), "paren_pairs")),  # tags stripped by decode
        ("(1, 2) , (3,4)", one_box((1, 2, 3, 4), "paren_pairs")),
        ("(1,2)(3,4)", one_box((1, 2, 3, 4), "paren_pairs")),
        ("box (1, 2, 3, 4) and [5,6,7,8]", one_box((5, 6, 7, 8), "brackets")),  # [] is tried first
        ("(1,2),(3,4) then (5, 6, 7, 8)", one_box((5, 6, 7, 8), "parens")),
        ("[ -1.5e2 , .5, 3., +4 ]", one_box((-150, 0.5, 3, 4), "brackets")),
        ("[5, 6, 1, 2]", one_box((5, 6, 1, 2), "brackets")),  # not reordered
        ("[1,2,3,4] <|box_start|>(5,6),(7,8)<|box_end|>", one_box((5, 6, 7, 8), "box_tag")),
        ("<|box_start|>(5,6),(7,8)", one_box((5, 6, 7, 8), "box_tag")),  # unclosed tag
        ("[1e999, 2, 3, 4] (1,2),(3,4)", NO_ANSWER),  # the first form decides; inf is no box
        ("[1e6, 2, 3, 4]", one_box((1e6, 2, 3, 4), "brackets")),
        ("[1000001, 2, 3, 4]", NO_ANSWER),
        ("[NaN, 1, 2, 3]", NO_ANSWER),
        ("[1, 2, 3]", NO_ANSWER),
        ("", NO_ANSWER),
        ("no box here", NO_ANSWER),
    ],
)
def test_plain_forms(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    "text, objects",
    [
        ('{"bbox": [5, 6, 7.5, 8], "points_1": [6, 7], "points_2": [7, 7]}',
         [((5, 6, 7.5, 8), ((6, 7), (7, 7)))]),
        ('<think>maybe [1,2,3,4]</think>\n<answer>{"bbox_2d": [5,6,7,8], "point_2d": [6,7]}</answer>',
         [((5, 6, 7, 8), ((6, 7),))]),
        ('<answer>```json\n[{"bbox_2d": [1,2,3,4], "point_2d": [2,3]}, {"bbox_2d": [1,2,3], "point_2d": [2,3]}]\n```'
         "</answer>", [((1, 2, 3, 4), ((2, 3),)), (None, ((2, 3),))]),
        ('Here: {"bbox": [1, 2, 3, 4]} done', [((1, 2, 3, 4), ())]),
        ('{"bbox": [NaN, 1, 2, 3], "points_1": [1e400, 1], "points_2": [true, 1]}', [(None, ())]),
        ('{"bbox": ["1", 2, 3, 4], "point_2d": [1, 2, 3]}', [(None, ())]),
        ('{"bbox": [' + "9" * 5000 + ", 1, 2, 3]}", None),  # int too long for Python: not JSON
        ('[{"bbox_2d": [1, 2, 3, 4]}, 7, "x", [1, 2]]', [((1, 2, 3, 4), ()), (None, ()), (None, ()), (None, ())]),
        ("<answer>[]</answer>", []),
        ("<answer>{}</answer>", [(None, ())]),
        ('{not json} {"bbox": [1,2,3,4]}', [((1, 2, 3, 4), ())]),
    ],
)
def test_json_forms(text, objects):
    parsed = parse_answer(text)
    if objects is None:
        assert parsed.form != "json"
        return
    assert parsed.form == "json"
    expected = tuple(
        AnswerObject(None if box is None else tuple(map(float, box)), tuple(tuple(map(float, p)) for p in points))
        for box, points in objects
    )
    assert parsed.objects == expected
    assert parsed.found
    assert parsed.box == (expected[0].box if expected else None)


def test_bare_number_list_is_a_plain_box_not_json():
    assert parse_answer("[1, 2, 3, 4]") == one_box((1, 2, 3, 4), "brackets")


def test_answer_region_wins_over_thinking():
    text = "<think>first guess [1,2,3,4]</think><answer>(10,20),(30,40)</answer>"
    assert parse_answer(text).box == (10.0, 20.0, 30.0, 40.0)
    assert answer_region("a<answer> b </answer>c<answer>d</answer>") == " b "
    assert answer_region("a<answer>b") == "b"
    assert answer_region("plain") == "plain"


@pytest.mark.parametrize(
    "text",
    ['<answer>{"bbox": [1, 2', "<answer>[1, 2, 3, 4", "<answer>(1,2),(3,", "<think>[1,2,3"],
)
def test_truncated_answers(text):
    assert parse_answer(text) == NO_ANSWER


def test_truncated_json_falls_back_to_its_complete_box():
    assert parse_answer('<answer>{"bbox": [1,2,3,4], "points_1": [2,') == one_box((1, 2, 3, 4), "brackets")


def test_non_strings_and_length_cap():
    for value in (None, 3, b"[1,2,3,4]", ["[1,2,3,4]"]):
        assert parse_answer(value) == NO_ANSWER
        assert not think_answer_format(value)
    long = "[1,2,3,4]" + " " * MAX_TEXT_CHARS
    assert parse_answer(long) == NO_ANSWER
    assert parse_answer(long, max_chars=None).box == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think> <answer>b</answer>", "<think>a</think><answer>b</answer> x", "<think></think><answer></answer>",
        "<think></answer>", "<think></think><answer></think><answer></answer>", "<think>a</think>\n<answer>b",
        " <think>a</think><answer>b</answer>", "<think>a</think>\n\n<answer>b</answer></answer>",
        "<think><answer></think><answer>", "<think></think>x<answer></answer>",
    ],
)
def test_think_format_cases(text):
    assert think_answer_format(text) == bool(re.fullmatch(THINK_ANSWER, text, re.DOTALL))
    assert think_answer_format(text, strict=False) == bool(re.match(THINK_ANSWER, text, re.DOTALL))


_FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "a", ".", "<", ">", "/"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=12).map("".join))
def test_think_format_matches_the_regexes(text):
    assert think_answer_format(text) == bool(re.fullmatch(THINK_ANSWER, text, re.DOTALL))
    assert think_answer_format(text, strict=False) == bool(re.match(THINK_ANSWER, text, re.DOTALL))


_NUMBER = st.one_of(st.integers(-5000, 5000).map(str), st.decimals(-5000, 5000, places=2).map(str))
_BOX_TEXT = st.tuples(_NUMBER, _NUMBER, _NUMBER, _NUMBER, st.sampled_from(["[{},{},{},{}]", "[ {}, {},{}, {} ]",
                      "({}, {}, {}, {})", "({},{}),({},{})", "({}, {}), ( {},{})"]))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="xyz ,.:()[]", max_size=20), _BOX_TEXT, st.text(alphabet="xyz ,.:()[]", max_size=20))
def test_plain_boxes_agree_with_lens(prefix, box, suffix):
    *numbers, template = box
    text = prefix + template.format(*numbers) + suffix
    expected = lens_box(text)
    parsed = parse_answer(text)
    if expected is not None and parsed.form != "json":
        assert parsed.box == expected


_JUNK_ALPHABET = st.sampled_from(list('[](){},.:-+eE0123456789 "\n') + ["<answer>", "</answer>", "<think>", "</think>",
                                  "<|box_start|>", "<|box_end|>", '"bbox"', '"point_2d"', "NaN", "Infinity", "1e999"])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(_JUNK_ALPHABET, max_size=80).map("".join)))
def test_fuzz_never_raises(text):
    parsed = parse_answer(text)
    assert isinstance(parsed, ParsedAnswer)
    for obj in parsed.objects:
        for value in (obj.box or ()) + tuple(v for p in obj.points for v in p):
            assert isinstance(value, float) and abs(value) <= 1e6
    assert parsed.found or parsed == NO_ANSWER
    think_answer_format(text)
    think_answer_format(text, strict=False)


def _bounded(text, seconds=30.0):
    """Parse ``text`` uncapped and check the format, in time far below any backtracking blow-up."""
    start = time.perf_counter()
    parsed = parse_answer(text, max_chars=None)
    think_answer_format(text)
    think_answer_format(text, strict=False)
    assert time.perf_counter() - start < seconds
    return parsed


def test_ten_megabytes_of_junk(rng):
    junk = rng.integers(32, 127, size=10 * 2**20, dtype=np.uint8).tobytes().decode("ascii")
    assert parse_answer(junk) == NO_ANSWER  # over the default cap: rejected at once
    parsed = _bounded(junk)
    assert isinstance(parsed, ParsedAnswer)


@pytest.mark.parametrize(
    "text",
    [
        "[" + "1" * 2_000_000,
        "(1,1)" + " " * 2_000_000,
        "<think>" + "</think><answer>" * 100_000,
        "<think>" + "</think>" + " " * 2_000_000,
        "<answer>" + " " * 2_000_000,
        "[" * 1_000_000,
        "{" * 1_000_000,
        "(1," * 500_000,
        "[1,2,3," * 300_000,
        "[" + "1," * 1_000_000,
        '{"bbox": [' * 200_000,
        "1" * 2_000_000 + "e",
    ],
)
def test_adversarial_inputs_are_linear(text):
    assert _bounded(text) == NO_ANSWER
