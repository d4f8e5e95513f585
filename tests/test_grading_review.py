"""Defects found by an independent review of interp/grading.py: hedges inside unfinished thinking graded as
answers, the answer-marker / box / "####" priority of a final part, GSM8K number spellings, the SIGALRM timer
and power towers no timer can stop; and the real-data self-checks (all GSM8K / MATH-500 golds)."""

import re
import signal
import time
from fractions import Fraction

import pytest
from grading_cases import R, embedded_rows

import interp.grading as grading
from interp.errors import UserError
from interp.grading import extract_answer, grade_answer, has_final_answer

# ------------------------------------------------------------------- without </think>: only how a text ends


@pytest.mark.parametrize(
    "text, gold, dataset",
    [
        (
            "Hmm, I wonder what the answer is. ... $5 \\times 2 = 10$. Then we need to check whether",
            "10",
            "math",
        ),
        ("So the answer is 18? Wait, let me recheck 16-3-4", "18", "gsm8k"),
        ("Maybe \\boxed{18}. Hmm, wait, that's wrong, let me redo", "18", "gsm8k"),
        ("Let me plan.\n#### 1. Count eggs\n16 - 3 - 4 = 9 and", "1", "gsm8k"),
        ("The answer: $x = 7$", "7", "math"),  # a marker without </think> is no answer
        ("So the answer is 18.", "18", "gsm8k"),
        ("so \\boxed{18}? Let me", "18", "gsm8k"),
        ("so \\boxed{18}?", "18", "gsm8k"),  # "?" is a hedge, not an ending
        ("so \\boxed{18}, and", "18", "math"),
        ("#### 18\nWait", "18", "gsm8k"),
    ],
)
def test_unfinished_thinking_with_a_hedge_is_truncated(text, gold, dataset):
    assert extract_answer(text, dataset) is None
    assert has_final_answer(text, dataset) is False
    assert grade_answer(text, gold, dataset) is False


@pytest.mark.parametrize(
    "text, dataset, expected",
    [
        ("so it is \\boxed{18}", "gsm8k", "18"),
        ("so it is $\\boxed{18}$.\n\n", "gsm8k", "18"),
        ("**Final Answer**\n\\[\n\\boxed{18}\n\\]\n", "gsm8k", "18"),
        ("The answer is \\(\\boxed{18}\\)!", "gsm8k", "18"),
        ("**\\boxed{18}**", "gsm8k", "18"),
        ("16 - 3 - 4 = 9\n#### 18", "gsm8k", "18"),
        ("16 - 3 - 4 = 9\n#### 18 dollars.\n", "gsm8k", "18"),
        ("Hence $\\boxed{\\frac{1}{2}}$.", "math", "\\frac{1}{2}"),
        ("first \\boxed{3}, then $\\mathbf{\\boxed{5}}$", "math", "5"),  # closing braces may follow
        ("so \\boxed{two thirds}", "gsm8k", None),  # the box a text ends with is its answer: no number
    ],
)
def test_unfinished_text_ending_with_an_answer(text, dataset, expected):
    assert extract_answer(text, dataset) == expected


# ------------------------------------------------------------------------------- after </think>: priority


@pytest.mark.parametrize(
    "final, expected",
    [
        (
            "**Step-by-Step Explanation and Answer:**\n\n1. Eggs left: 16 - 3 - 4 = 9.\n"
            "2. Earnings: 9 x $2 = $18.\n\n\\boxed{18}",
            "18",
        ),
        (
            "#### 1. Eggs left\n16 \u2212 3 \u2212 4 = 9\n\n#### 2. Revenue\n9 \u00d7 \\$2 = \\$18\n\n"
            "**Final Answer**\n\\boxed{18}",
            "18",
        ),
        (
            "#### 1. Eggs left\n16 - 3 - 4 = 9\n\n#### 2. Revenue\n9 x 2 = 18 dollars",
            "18",
        ),  # headings, no box
        ("Answer: $\\boxed{18}$\n\nCheck answer: 9 \u00d7 2 = 18 \u2713", "18"),
        ("The answer is 20.\n\nWait, correction: \\boxed{18}", "18"),  # the last box beats a marker
        ("The answer is 5 + 13 = 18.", "18"),  # the last number of the marked sentence
        ("the answer is 3-5 = -2", "-2"),
        ("answer: 7 ... no wait, the answer is 9", "9"),  # the last marker with a number
        ("The answer is 18. Then 2 more steps: 20", "18"),  # its sentence ends at the period
        ("The answer is 2.5 hours. Then 3 more", "2.5"),  # a decimal point does not end it
        ("**Answer:**\n\nShe earns 9 x 2 = 18 dollars a day, not 20", "20"),  # marker's sentence: no number
        ("#### 18\nShe keeps 9 eggs.", "18"),  # a "####" answer line beats the last number
        ("\\boxed{2:30}\nso 2 hours 30 minutes, 150", "150"),  # a box that is no number falls through
    ],
)
def test_gsm8k_final_part_priority(final, expected):
    assert extract_answer(R + final, "gsm8k") == expected


def test_math_final_part_reads_the_last_box_first():
    final = "The answer is $\\frac{1}{3}$. Wait, no: \\boxed{\\frac{1}{2}}"
    assert extract_answer(R + final, "math") == "\\frac{1}{2}"
    assert grade_answer(R + final, "0.5", "math") and not grade_answer(R + final, "\\frac13", "math")


# --------------------------------------------------------------------------------------- GSM8K numbers


@pytest.mark.parametrize(
    "boxed, expected",
    [
        ("1\\ 000", "1000"),
        ("1 000", "1000"),
        ("1\u2009000", "1000"),
        ("1\\,000\\,000", "1000000"),
        ("1\\!000", "1000"),
        ("1,\\!000", "1000"),
        ("18\\text{,}000", "18000"),
        ("18{,}000", "18000"),
        ("- 5", "-5"),
        ("-\\$5", "-5"),
        ("7\\frac{1}{2}", "15/2"),
        ("7 \\frac{1}{2}", "15/2"),
        ("-2\\frac{1}{4}", "-9/4"),
        ("\\frac{3}{4}", "3/4"),
        ("x = -18", "-18"),
        ("\\text{18 dollars}", "18"),
        ("25\\%", "25"),
        ("18.", "18"),
    ],
)
def test_gsm8k_number_spellings_in_a_box(boxed, expected):
    assert extract_answer(f"{R}\\boxed{{{boxed}}}", "gsm8k") == expected


@pytest.mark.parametrize("boxed, unread", [("1 0000", "10000"), ("12,34", "1234"), ("1\\ 00", "100")])
def test_only_groups_of_three_digits_join(boxed, unread):
    """Not one number: the box falls through to the final part's last number (module docstring)."""
    assert extract_answer(f"{R}\\boxed{{{boxed}}}", "gsm8k") not in (unread, None)


def test_gsm8k_number_spellings_grade_by_value():
    assert grade_answer(R + "\\boxed{7\\frac{1}{2}}", "7.5", "gsm8k")
    assert not grade_answer(R + "\\boxed{7\\frac{1}{2}}", "71/2", "gsm8k")
    assert grade_answer(R + "\\boxed{1\\ 000}", "1,000", "gsm8k") and not grade_answer(
        R + "\\boxed{1 000}", "1", "gsm8k"
    )
    assert grade_answer(R + "\\boxed{- 5}", "-5", "gsm8k") and not grade_answer(
        R + "\\boxed{- 5}", "5", "gsm8k"
    )
    assert not grade_answer(R + "So 3 100-meter races.", "3100", "gsm8k")  # plain spaces join only in a box


# ------------------------------------------------------------------------------------------- time limits


def test_a_tiny_timeout_returns_no_answer_and_restores_the_callers_handler_and_timer():
    """The timer starts inside the protected region: it may fire at once, and never escapes as _Timeout."""
    fired = []

    def callers_handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, callers_handler)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        for timeout_s in (1e-7, 1e-6, 1e-5) * 100:
            assert grade_answer(R + "\\boxed{18}", "18", "gsm8k", timeout_s=timeout_s) in (True, False)
            assert extract_answer(R + "\\boxed{18}", "gsm8k", timeout_s=timeout_s) in ("18", None)
            assert signal.getsignal(signal.SIGALRM) is callers_handler
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20 < remaining <= 30 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("nan"), float("inf"), True, "5", None])
def test_timeout_must_be_a_finite_positive_number(timeout_s):
    with pytest.raises(UserError, match="timeout_s"):
        grade_answer(R + "\\boxed{18}", "18", "gsm8k", timeout_s=timeout_s)


@pytest.mark.parametrize("tower", ["9^{9^{9^{9}}}", "10^{10^{10}}", "2^{2^{30}}", "2^{2^{2^{2^{2^{2}}}}}"])
def test_power_towers_are_compared_as_strings_without_math_verify(tower, monkeypatch):
    """sympy spends unbounded C-level time on these, beyond any timer: they never reach math-verify."""

    def no_math_verify(*args, **kwargs):
        raise AssertionError("math-verify called on a power tower")

    monkeypatch.setattr(grading, "verify", no_math_verify)
    start = time.monotonic()
    assert grade_answer(f"{R}\\boxed{{{tower}}}", tower, "math", timeout_s=30) is True
    assert grade_answer(f"{R}\\boxed{{ {tower.replace('{', '{ ')} }}", f"${tower}$", "math", timeout_s=30)
    assert grade_answer(f"{R}\\boxed{{{tower}}}", "1", "math", timeout_s=30) is False
    assert grade_answer(f"{R}\\boxed{{5}}", tower, "math", timeout_s=30) is False
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    "latex, huge",
    [
        ("9^{9^{9^{9}}}", True),  # an exponent holding "^"
        ("2^3^4", True),  # a second "^" right after a one-token exponent
        ("10^{1000}", True),  # four digits in a row in an exponent
        ("2^1000", True),
        ("e^{\\pi i}", False),
        ("x^{2} + 2^{10}", False),
        ("(x+1)^{200}", False),
        ("1000^2", False),  # digits in the base do not count
        ("\\{1,2\\}", False),
    ],
)
def test_huge_power_definition(latex, huge):
    assert grading._huge_power(latex) is huge


def test_small_powers_still_use_math_verify():
    assert grade_answer(R + "\\boxed{2^{10}}", "1024", "math")
    assert not grade_answer(R + "\\boxed{2^{10}}", "1025", "math")


# ------------------------------------------------------------------ real data: every gold grades itself


def test_every_gsm8k_gold_grades_its_own_forms_and_not_its_neighbour():
    rows = embedded_rows("gsm8k_test.jsonl")
    assert len(rows) == 1319
    for row in rows:
        solution, gold = row["answer"], row["answer"].rsplit("####", 1)[1].strip()
        plain, wrong = gold.replace(",", ""), str(Fraction(gold.replace(",", "")) + 1)
        for form in (
            f"\\boxed{{{plain}}}",
            f"The answer is {gold}.",
            f"#### {plain}",
            f"**Answer:** \\${gold}",
        ):
            assert grade_answer(R + form, solution, "gsm8k"), (form, gold)
            assert grade_answer(R + form, gold, "gsm8k"), (form, gold)
        for form in (f"\\boxed{{{wrong}}}", f"The answer is {wrong}.", f"#### {wrong}"):
            assert not grade_answer(R + form, solution, "gsm8k"), (form, gold)
        assert grade_answer(solution, gold, "gsm8k")  # the solution itself ends with "#### <gold>"


def _first_digit_changed(answer):
    digit = re.search(r"\d", answer)
    if digit is None:
        return None
    d = int(digit[0])
    return answer[: digit.start()] + str(d + 1 if d < 9 else 7) + answer[digit.end() :]


def test_every_math500_gold_grades_its_own_unboxed_form():
    """The final part "The answer is $<gold>$." (math-verify's extraction) for all 500 golds; the boxed form
    and other rows' answers are checked in tests/test_grading.py. Changing the first digit breaks it."""
    rows = embedded_rows("math500.jsonl")
    assert len(rows) == 500
    assert all(grade_answer(f"{R}The answer is ${row['answer']}$.", row["answer"], "math") for row in rows)
    changed = [(row["answer"], _first_digit_changed(row["answer"])) for row in rows[::4]]
    changed = [(gold, wrong) for gold, wrong in changed if wrong is not None]
    assert len(changed) > 100
    assert not any(grade_answer(f"{R}The answer is ${wrong}$.", gold, "math") for gold, wrong in changed)
