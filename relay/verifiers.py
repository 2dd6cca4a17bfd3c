"""Built-in verifiable rewards that read a prompt dataset's columns: exact match, a math answer checker and a
regex/format check, combined as a weighted sum (`reward.type: rules`). Pure functions of text; no model.

The math checker takes the final answer of a response as the last `\\boxed{...}`, else what follows the last
`####` (GSM8K's form), else the last number in the text. The reference column is its last `\\boxed{...}`, else
what follows its last `####`, else all of it, so a GSM8K `answer` column ("... #### 72") works as it is. Two
answers are equal when they are the same number (commas, `$`, `%` and a trailing period ignored; fractions such
as `3/4` or `\\frac{3}{4}` evaluated; relative tolerance 1e-6), or, when either is not a number, the same text
after normalising whitespace.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
LATEX_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")


def boxed_content(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            if depth == 0:
                return text[begin:position]
            depth -= 1
    return None


def final_answer(text: str) -> str | None:
    """The answer a response commits to: last \\boxed{}, else after the last ####, else the last number."""
    boxed = boxed_content(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        return after.splitlines()[0].strip() if after else None
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(reference: Any) -> str:
    """The answer a reference column holds: its last \\boxed{} or what follows its last ####, else all of it."""
    text = str(reference)
    boxed = boxed_content(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


def as_number(answer: str) -> float | None:
    """`answer` as a number when it is one ("1,234", "$5", "50%", "3/4", "\\frac{3}{4}", "-2.50."), else None."""
    cleaned = answer.strip().rstrip(".").replace(",", "").replace("$", "").replace("%", "").replace(" ", "")
    fraction = LATEX_FRACTION.match(cleaned)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        cleaned = f"{sign}{numerator}/{denominator}"
    try:
        return float(Fraction(cleaned))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(produced: str, expected: str) -> bool:
    produced_number, expected_number = as_number(produced), as_number(expected)
    if produced_number is not None and expected_number is not None:
        return math.isclose(produced_number, expected_number, rel_tol=1e-6, abs_tol=1e-9)
    return " ".join(produced.split()) == " ".join(expected.split())


def math_answer(response: str, reference: Any) -> float:
    """1.0 when the response's final answer equals the reference's (see the module docstring), else 0.0."""
    produced, expected = final_answer(response), reference_answer(reference)
    if produced is None or not expected:
        return 0.0
    return float(answers_match(produced, expected))


def exact_match(response: str, reference: Any) -> float:
    """1.0 when the response, stripped, is the reference (stripped, as text), else 0.0."""
    return float(response.strip() == str(reference).strip())


def regex_match(response: str, pattern: re.Pattern[str]) -> float:
    """1.0 when the pattern matches the whole response (after stripping), else 0.0: a format check."""
    return float(pattern.fullmatch(response.strip()) is not None)
