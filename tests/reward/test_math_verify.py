"""Final-answer extraction and checking of realhf.impl.reward.math_verify."""

import pytest

from realhf.impl.reward.math_verify import (
    DEFAULT_FORMAT_PATTERN,
    answers_equal,
    extract_answer,
    extract_boxed,
    format_reward,
    math_reward,
    normalize_answer,
    parse_reference,
)

# (completion, extracted raw answer, normalized value)
EXTRACTION_CASES = [
    ("The answer is \\boxed{6}.", "6", 6.0),
    ("First \\boxed{3}, then corrected: \\boxed{5}", "5", 5.0),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}", 0.75),
    ("so \\boxed{-\\dfrac{1}{2}} is it", "-\\dfrac{1}{2}", -0.5),
    ("nested \\boxed{{12}}", "{12}", 12.0),
    ("\\boxed{18 \\text{ years}}", "18 \\text{ years}", 18.0),
    ("\\boxed{x = 5}", "x = 5", 5.0),
    ("\\boxed{\\$1{,}200}", "\\$1{,}200", 1200.0),
    ("\\boxed{50\\%}", "50\\%", 50.0),
    ("\\boxed{A}", "A", "a"),
    ("\\boxed{2x+3}", "2x+3", "2x+3"),
    ("She has 5 apples.\n#### 72", "72", 72.0),
    ("#### $1,200 dollars", "1,200", 1200.0),
    ("#### -3", "-3", -3.0),
    ("3 + 4 = 7 so 7 apples #### 7\nThanks 99", "7", 7.0),
    ("I think it is 12 or maybe 13.", "13", 13.0),
    ("Total: 1,234 km", "1,234", 1234.0),
    ("1,234,567 grains", "1,234,567", 1234567.0),
    ("The temperature fell to -4 degrees", "-4", -4.0),
    ("pages 3-5", "5", 5.0),
    ("about 3.25 liters.", "3.25", 3.25),
    ("it is .5 of it", ".5", 0.5),
    ("he ate 3/4 of the pie", "3/4", 0.75),
    ("\\boxed{3/4}", "3/4", 0.75),
    ("a list 1,2,3", "3", 3.0),
]


@pytest.mark.parametrize("text,raw,value", EXTRACTION_CASES)
def test_extraction_and_normalization(text, raw, value):
    assert extract_answer(text) == raw
    got = normalize_answer(raw)
    if isinstance(value, float):
        assert isinstance(got, float) and got == pytest.approx(value)
    else:
        assert got == value


@pytest.mark.parametrize("text", ["no numbers here", "", "\\boxed{}", "\\boxed{"])
def test_no_answer(text):
    assert extract_answer(text) is None
    assert math_reward(text, "6") == 0.0


def test_unbalanced_last_box_falls_back_to_earlier_box():
    assert extract_boxed("\\boxed{4} and \\boxed{5") == "4"


@pytest.mark.parametrize("completion,reference,expected", [
    ("The answer is \\boxed{6}.", "6", 1.0),
    ("The answer is \\boxed{7}.", "6", 0.0),
    ("Rosa has 26 - 20 = 6 pencils left.", "6", 1.0),
    ("Rosa has 26 - 20 = 6 pencils left, not 5.", "6", 0.0),
    ("#### 1,200", "1200", 1.0),
    ("\\boxed{0.75}", "3/4", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.3333333", 1.0),
    ("\\boxed{0.333}", "1/3", 0.0),
    ("\\boxed{6.0000000001}", "6", 1.0),
    ("\\boxed{B}", "b", 1.0),
    ("\\boxed{B}", "C", 0.0),
    ("she gets 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("she gets 24", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 0.0),
    ("\\boxed{215}", "The answer is 215", 1.0),
    ("I don't know.", "6", 0.0),
])
def test_math_reward(completion, reference, expected):
    assert math_reward(completion, reference) == expected


def test_math_reward_tolerance_is_configurable():
    assert math_reward("\\boxed{3.14}", "3.14159") == 0.0
    assert math_reward("\\boxed{3.14}", "3.14159", tol=1e-3) == 1.0


@pytest.mark.parametrize("reference", [None, "", "   "])
def test_math_reward_without_reference_raises(reference):
    with pytest.raises(ValueError, match="no reference answer"):
        math_reward("\\boxed{6}", reference)


def test_parse_reference_and_equality():
    assert parse_reference("-12") == -12.0
    assert parse_reference("\\boxed{5}") == 5.0
    assert answers_equal(100000.0, 100000.05, tol=1e-6)
    assert not answers_equal(100.0, 100.05, tol=1e-6)
    assert not answers_equal(None, 1.0)
    assert not answers_equal(float("nan"), float("nan"))


@pytest.mark.parametrize("completion,expected", [
    ("so \\boxed{6}", 1.0),
    ("reasoning...\n#### 72", 1.0),
    ("#### $5", 1.0),
    ("\\boxed{}", 0.0),
    ("#### ", 0.0),
    ("the answer is 6", 0.0),
])
def test_format_reward_default_pattern(completion, expected):
    assert format_reward(completion) == expected
    assert format_reward(completion, DEFAULT_FORMAT_PATTERN) == expected


def test_format_reward_custom_pattern_spans_lines():
    pattern = r"^<think>.*</think>\s*\S"
    assert format_reward("<think>a\nb</think> 6", pattern) == 1.0
    assert format_reward("6 <think></think>", pattern) == 0.0
