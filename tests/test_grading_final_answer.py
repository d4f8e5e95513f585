"""Only a final answer is graded: output cut off inside <think> has none (so it is incorrect and counts as
truncated), and dashes used as minus signs are read as signs."""


import pytest
from grading_cases import R, embedded_rows

from interp.grading import extract_answer, grade_answer, has_final_answer

# ------------------------------------------------------------------------------------ truncated reasoning


@pytest.mark.parametrize(
    "text, dataset, gold",
    [
        ("Okay, 3 apples plus 4 apples is 7 apples. Let me double-check: 3 + 4 = 7", "gsm8k", "7"),
        ("First 48 clips in April, then 48 / 2 = 24 in May, so far 72", "gsm8k", "72"),
        ("So we need $x = 5$. Wait, let me verify by substituting $x = 5$", "math", "5"),
        ("The binomial is $\\dbinom{8}{4} = 70$. Hmm, let me recompute", "math", "70"),
    ],
)
def test_reasoning_cut_off_while_thinking_has_no_answer(text, dataset, gold):
    """Generated text continues a prompt ending in "<think>\\n": cut off, it has no "</think>" and no marker.
    Its last number / expression is the right answer, which the old whole-text fallback graded correct."""
    assert extract_answer(text, dataset) is None
    assert has_final_answer(text, dataset) is False
    assert grade_answer(text, gold, dataset) is False
    finished = f"{text}\n</think>\n\nThe answer is $\\boxed{{{gold}}}$."  # the same text, finished
    assert has_final_answer(finished, dataset) and grade_answer(finished, gold, dataset)


def test_real_gsm8k_rationales_without_their_answer_line_are_truncated():
    """All 1319 GSM8K rationales, cut before "#### <answer>" (their last number is the answer for 1282 of
    them): none is a final answer inside thinking; after "</think>" the last-number rule reads them again."""
    rows = embedded_rows("gsm8k_test.jsonl")
    cut = [(row["answer"].rsplit("####", 1)[0], row["answer"].split("####")[1].strip()) for row in rows]
    assert not any(has_final_answer(text, "gsm8k") for text, _ in cut)
    assert not any(grade_answer(text, answer, "gsm8k") for text, answer in cut)
    assert sum(grade_answer("</think>" + text, answer, "gsm8k") for text, answer in cut) >= 1282


def test_real_math500_solutions_cut_before_their_box_are_truncated():
    """MATH-500 solutions cut right before their first \\boxed: no box, no marker -> no answer in thinking;
    the full solutions (boxed) all have one as final parts, and inside thinking when they end with the box."""
    rows = embedded_rows("math500.jsonl")
    solutions = [row["solution"] for row in rows]
    cut = [text[: text.index("\\boxed")] for text in solutions if "\\boxed" in text]
    cut = [text for text in cut if "answer" not in text.lower() and "####" not in text]  # no marker either
    assert len(cut) >= 400
    assert not any(has_final_answer(text, "math") for text in cut)
    assert all(has_final_answer(R + text, "math") for text in solutions[:50])
    assert all(has_final_answer(_through_last_box(text), "math") for text in solutions[:50])


def _through_last_box(text):
    """`text` cut right after the closing brace of its last \\boxed{...}."""
    depth, start = 0, text.index("{", text.rindex("\\boxed"))
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0) if text[end - 1] != "\\" else 0
        if depth == 0:
            return text[: end + 1]
    raise AssertionError("unclosed box")


@pytest.mark.parametrize(
    "text, dataset, expected",
    [
        ("... so the answer is 7", "gsm8k", None),  # a marker is no final answer inside thinking
        ("... so the answer is 7. Wait, let me check once more: 3 + 4", "gsm8k", None),
        ("Answer: -3", "gsm8k", None),
        ("#### 1,000", "gsm8k", "1000"),  # a GSM8K answer line the text ends with
        ("3 + 4, hence \\boxed{7}", "gsm8k", "7"),
        ("3 + 4, hence \\boxed{7}, so", "gsm8k", None),  # the box is not where the text ends
        ("so it is \\fbox{\\frac{1}{2}}", "math", "\\frac{1}{2}"),
        ("The answer is $x = 5$ and then", "math", None),
        ("we get $x=5$ and $y=2$", "math", None),  # unmarked expressions inside thinking
    ],
)
def test_only_an_answer_the_text_ends_with_counts_without_think_end(text, dataset, expected):
    assert extract_answer(text, dataset) == expected
    assert has_final_answer(text, dataset) is (expected is not None)


def test_the_thinking_never_supplies_the_answer():
    """With "</think>", only the text after the last one is read: a boxed / marked answer inside thinking
    does not rescue a final part without one."""
    assert extract_answer("<think>the answer is 5</think>\nI am not sure.", "gsm8k") is None
    assert extract_answer("\\boxed{5}\n</think>\n\nI cannot decide.", "math") is None
    assert not grade_answer("The answer is 5.\n</think>\n", "5", "gsm8k")
    assert extract_answer("\\boxed{4}\n</think>\nSo 5 apples.", "gsm8k") == "5"  # unmarked after </think>


# ---------------------------------------------------------------------------------- dashes as minus signs


@pytest.mark.parametrize(
    "dash",
    ["\u2212", "\u2013", "\u2012", "\u2010", "\u2011", "\ufe63", "\uff0d"],
    ids=lambda d: f"U+{ord(d):04X}",
)
def test_unicode_minus_and_dashes_are_signs(dash):
    text = f"{R}The answer is {dash}5"
    assert extract_answer(text, "gsm8k") == "-5"
    assert grade_answer(text, "-5", "gsm8k") is True
    assert grade_answer(text, "5", "gsm8k") is False
    assert grade_answer(R + "The answer is -5", f"{dash}5", "gsm8k") is True  # gold written with the dash
    assert grade_answer(R + "The answer is 5", f"{dash}5", "gsm8k") is False
    assert grade_answer(f"</think> so x = {dash}5", "-5", "gsm8k") is True  # unmarked, after </think>
    assert grade_answer(f"\\boxed{{{dash}5}}", "-5", "math") is True
    assert grade_answer(f"\\boxed{{{dash}5}}", "5", "math") is False


def test_dashes_between_numbers_stay_hyphens_and_the_em_dash_is_punctuation():
    assert extract_answer("</think> read pages 10\u201312", "gsm8k") == "12"  # a range, not -12
    assert extract_answer(R + "The answer is \u20145", "gsm8k") == "5"  # em dash: prose punctuation
