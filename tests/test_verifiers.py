"""Built-in rewards that read a dataset's columns (relay/verifiers.py, `reward.type: rules`), on hand-made cases."""

from __future__ import annotations

import re

import pytest

from relay.config import RewardRule, RewardSection
from relay.rewards import RuleReward, build_reward_source
from relay.verifiers import as_number, exact_match, final_answer, math_answer, regex_match

GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize("response, expected", [
    ("She sold 72 clips in all. #### 72", 1.0),                 # GSM8K's own form
    ("so the answer is \\boxed{72}.", 1.0),                    # boxed
    ("48 + 24 = 72", 1.0),                                     # the last number
    ("The total is 72.0", 1.0),                                # numerically equal
    ("#### 72.", 1.0),                                         # a trailing period
    ("\\boxed{\\frac{144}{2}}", 1.0),                           # a LaTeX fraction that equals 72
    ("she sold 71 clips", 0.0),                                # wrong
    ("72 clips, no wait, 73", 0.0),                            # the last number is what counts
    ("I don't know", 0.0),                                     # no answer at all
    ("\\boxed{71", 0.0),                                      # an unclosed box: the last number, 71, is wrong
    ("\\boxed{72", 1.0),                                      # an unclosed box: the last number, 72, is right
])
def test_math_answer_against_a_gsm8k_reference(response, expected):
    assert math_answer(response, GSM8K_ANSWER) == expected


@pytest.mark.parametrize("text, number", [
    ("1,234", 1234.0), ("$5", 5.0), ("50%", 50.0), ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("-2.50.", -2.5),
    ("x+1", None), ("1/0", None),
])
def test_as_number(text, number):
    assert as_number(text) == number


def test_final_answer_prefers_box_then_hashes_then_last_number():
    assert final_answer("1 then \\boxed{2} then #### 3 then 4") == "2"
    assert final_answer("1 then #### 3\nthen 4") == "3"
    assert final_answer("1 then 4") == "4"
    assert final_answer("nothing") is None
    assert final_answer("\\boxed{a{b}c}") == "a{b}c"


def test_math_answer_compares_text_when_not_numbers():
    assert math_answer("\\boxed{x + 1}", "x  +  1") == 1.0
    assert math_answer("\\boxed{x + 2}", "x + 1") == 0.0
    assert math_answer("the answer is 12", 12) == 1.0  # a numeric column


def test_exact_match_and_regex():
    assert exact_match(" 51413\n", "51413") == 1.0
    assert exact_match("5141", "51413") == 0.0
    assert exact_match("42", 42) == 1.0
    pattern = re.compile(r"\d+")
    assert regex_match(" 123 ", pattern) == 1.0
    assert regex_match("123 apples", pattern) == 0.0  # the whole response must match: a format check


def test_rules_reward_is_the_weighted_sum_and_reads_each_rows_columns():
    reward = RuleReward([RewardRule(check="math_answer", column="answer", weight=1.0),
                         RewardRule(check="regex", pattern=r".*#### \d+", weight=0.25)])
    scores = reward.score(["q1", "q2", "q3"], ["so #### 72", "72", "so #### 5"],
                          [{"answer": "#### 72"}, {"answer": "72"}, {"answer": "#### 72"}])
    # 1 + 0.25 (right, in format); 1 + 0 (right, no ####); 0 + 0.25 (wrong, in format)
    assert scores == [1.25, 1.0, 0.25]
    assert reward.name == "rules 1×math_answer(answer) + 0.25×regex(.*#### \\d+)"
    with pytest.raises(ValueError, match=r"math_answer\(answer\): the row has no column 'answer' \(it has solution\)"):
        reward.score(["q"], ["72"], [{"solution": "72"}])


def test_build_reward_source_for_rules():
    section = RewardSection(type="rules", rules=[RewardRule(check="exact_match", column="answer")])
    assert build_reward_source(section, None).score(["p"], ["a"], [{"answer": "a"}]) == [1.0]
