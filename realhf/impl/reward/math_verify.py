"""Rule-based answer checking for math prompts.

A generation is rewarded when its *final answer* equals the reference result
stored in the dataset's ``answer`` field. The final answer is, in order of
preference:

1. the content of the last ``\\boxed{...}`` (nested braces allowed),
2. the first number after the last ``#### `` marker (GSM8K style),
3. otherwise the last number in the text.

Numbers may be negative, decimal, use thousands separators (``1,234``) or be
simple fractions (``3/4``, ``\\frac{3}{4}``). Answers that are not numbers
(e.g. a multiple-choice letter) are compared as normalized strings.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Union

Answer = Union[float, str]

# A plain number: sign (not after a word character, so "3-5" is a range, not
# 3 and -5), digits with optional thousands groups, optional decimals.
_NUMBER = r"(?:(?<![\w.])[-+\u2212])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w.])[-+])?\.\d+"
_NUMBER_RE = re.compile(rf"(?:{_NUMBER})(?:\s*/\s*(?:\d+(?:\.\d+)?))?")
_STRICT_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}")
_LHS_RE = re.compile(r"^[a-zA-Z]\w*\s*=\s*")

#: ``format_reward``'s default: a non-empty ``\boxed{}`` or ``#### <number>``.
DEFAULT_FORMAT_PATTERN = r"\\boxed\{\s*[^\s}]|####[ \t]*[-+$]?[\d.]"


def _brace_content(text: str, open_pos: int) -> Optional[str]:
    """Text between ``text[open_pos] == '{'`` and its matching ``}`` (None if unbalanced)."""
    depth = 0
    for i in range(open_pos, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
    return None


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last balanced ``\\boxed{...}`` / ``\\fbox{...}``, or None."""
    starts = [m.end() - 1 for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for pos in reversed(starts):  # an unbalanced last box falls back to an earlier one
        content = _brace_content(text, pos)
        if content is not None:
            return content
    return None


def extract_hash_answer(text: str) -> Optional[str]:
    """The first number after the last ``####`` marker (GSM8K style), or None."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    line = text[idx + 4:].split("\n", 1)[0]
    m = _NUMBER_RE.search(line.replace("$", ""))
    return m.group(0) if m else None


def extract_last_number(text: str) -> Optional[str]:
    """The last number (integer, decimal, ``1,234``, ``3/4``) in ``text``, or None."""
    matches = _NUMBER_RE.findall(text)
    return matches[-1] if matches else None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a generation as a raw string (boxed > #### > last number)."""
    for extractor in (extract_boxed, extract_hash_answer, extract_last_number):
        found = extractor(text)
        if found is not None and found.strip():
            return found.strip()
    return None


def _to_float(s: str) -> Optional[float]:
    """Parse a bare number or ``a/b`` fraction; None if ``s`` is anything else."""
    s = s.replace("\u2212", "-").replace(" ", "")
    num, slash, den = s.partition("/")
    if not _STRICT_NUMBER_RE.fullmatch(num):
        return None
    value = float(num.replace(",", ""))
    if slash:
        if not re.fullmatch(r"\d+(?:\.\d+)?", den) or float(den) == 0.0:
            return None
        value /= float(den)
    return value


def normalize_answer(s: str) -> Optional[Answer]:
    """A float for numeric answers, else a lowercase space-free string (None if empty).

    LaTeX wrappers that do not change the value are removed first: ``$``,
    ``\\left``/``\\right``, ``\\text{units}``, ``{,}`` thousands separators,
    a trailing ``%`` or period, and a leading ``x =``.
    """
    t = s.strip()
    t = _TEXT_RE.sub("", t)
    t = _FRAC_RE.sub(r"(\1)/(\2)", t)
    for old, new in (("\\$", ""), ("$", ""), ("\\left", ""), ("\\right", ""), ("{,}", ","), ("\\,", ""),
                     ("\\!", ""), ("\\%", ""), ("%", ""), ("^\\circ", ""), ("\u2212", "-")):
        t = t.replace(old, new)
    t = _LHS_RE.sub("", t.strip()).strip().rstrip(".").strip()
    frac = re.fullmatch(r"([-+]?)\(([^()]*)\)/\(([^()]*)\)", t)
    if frac:  # a \frac whose parts are plain numbers
        t = f"{frac.group(1)}{frac.group(2).strip()}/{frac.group(3).strip()}"
    while len(t) > 2 and t[0] + t[-1] in ("{}", "()") and _brace_free(t[1:-1]):
        t = t[1:-1].strip()
    if not t:
        return None
    value = _to_float(t)
    if value is not None:
        return value
    return re.sub(r"\s+", "", t).lower()


def _brace_free(t: str) -> bool:
    return not any(c in t for c in "{}()")


def parse_reference(reference: str) -> Optional[Answer]:
    """Normalize a dataset answer; full GSM8K solutions (``... #### 72``) give 72."""
    text = str(reference)
    if "####" in text or "\\boxed" in text or "\\fbox" in text:
        found = extract_answer(text)
        return normalize_answer(found) if found is not None else None
    value = normalize_answer(text)
    if isinstance(value, str):
        # "The answer is 6": a sentence around a single number means that number.
        numbers = _NUMBER_RE.findall(text)
        if len(numbers) == 1:
            return normalize_answer(numbers[0])
    return value


def answers_equal(a: Optional[Answer], b: Optional[Answer], tol: float = 1e-6) -> bool:
    """Numeric answers match within ``tol`` relative to ``max(1, |b|)``; strings exactly."""
    if a is None or b is None:
        return False
    if isinstance(a, float) and isinstance(b, float):
        return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol * max(1.0, abs(b))
    return str(a) == str(b)


def math_reward(completion: str, reference: Optional[str], tol: float = 1e-6) -> float:
    """1.0 if the final answer of ``completion`` equals ``reference``, else 0.0.

    A missing reference is a data error (the item cannot be scored), so it
    raises instead of silently rewarding 0.
    """
    if reference is None or (isinstance(reference, str) and not reference.strip()):
        raise ValueError("no reference answer for this item (the dataset's answer field is missing or empty)")
    found = extract_answer(completion)
    if found is None:
        return 0.0
    return 1.0 if answers_equal(normalize_answer(found), parse_reference(reference), tol) else 0.0


def format_reward(completion: str, pattern: str = DEFAULT_FORMAT_PATTERN) -> float:
    """1.0 if ``re.search(pattern, completion)`` matches (``.`` matches newlines too), else 0.0."""
    return 1.0 if re.search(pattern, completion, flags=re.DOTALL) else 0.0
