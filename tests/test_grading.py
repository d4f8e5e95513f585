"""Answer grading against real GSM8K / MATH-500 gold answers, LaTeX equivalences, the <think> format, time
limits in the main and worker threads, and closed forms of the degeneration measures."""

import json
import signal
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import math_verify
import pytest

import interp.grading as grading
from interp.errors import UserError
from interp.grading import extract_answer, grade_answer, last_boxed
from interp.text_metrics import compression_ratio, ngram_repetition

EMBEDDED = Path(__file__).resolve().parents[1] / "datamodules" / "embedded"
R = "ok\n</think>\n\n"  # a finished generation: its final part follows


def _rows(name):
    with open(EMBEDDED / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def gsm8k():
    rows = _rows("gsm8k_test.jsonl")
    assert len(rows) == 1319
    return [(row["answer"], row["answer"].split("####")[1].strip()) for row in rows]  # (rationale, answer)


@pytest.fixture(scope="module")
def math500():
    rows = _rows("math500.jsonl")
    assert len(rows) == 500
    return rows


# ----------------------------------------------------------------------------------------------------------
# GSM8K


def test_every_gsm8k_rationale_grades_true_against_its_own_answer(gsm8k):
    assert sum(grade_answer(rationale, answer, "gsm8k") for rationale, answer in gsm8k) == 1319
    # gold given as the whole rationale too ("... #### 18"); "The answer is" counts after "</think>" only
    assert all(grade_answer(f"{R}The answer is {answer}", rationale, "gsm8k") for rationale, answer in gsm8k)


def test_gsm8k_wrong_number_grades_false(gsm8k):
    def shifted(answer, delta):
        return str(int(answer.replace(",", "")) + delta)

    # +1 on answers up to 2,880,000: a relative tolerance would pass 1450001 for 1450000 (7e-7).
    assert not any(grade_answer(rationale, shifted(answer, 1), "gsm8k") for rationale, answer in gsm8k)
    assert not any(grade_answer(rationale, shifted(answer, -1), "gsm8k") for rationale, answer in gsm8k)


def test_gsm8k_last_number_fallback_on_real_rationales(gsm8k):
    """After "</think>" and without the '#### x' line the last number of the rationale is read: right for
    1282 of 1319 (the rest end on a number that is not the answer: "... 8 years old 4 years from now.")."""
    stripped = [("</think>\n" + rationale.rsplit("####", 1)[0], answer) for rationale, answer in gsm8k]
    assert sum(grade_answer(text, answer, "gsm8k") for text, answer in stripped) >= 1282


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 18", "18"),
        ("So he made 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000", "70000"),
        ("The answer is $1,234.", "1234"),
        ("The final answer is: $\\boxed{18}$", "18"),
        ("**Answer:** -5", "-5"),
        ("answer: .5", ".5"),
        ("The answer is that 3 apples and 4 pears make 7", "7"),  # no number right after the marker
        ("we get 3-5 = -2", "-2"),
        ("read pages 10-12", "12"),  # "10-12": a hyphen, not -12
        ("so (3+4)-5", "5"),  # nor after a closing parenthesis
        ("She saves 10%.", "10"),  # percent sign dropped, value not divided by 100
        ("It costs 18 dollars.", "18"),
        ("x = \\frac{3}{4}", "3/4"),
        ("so \\boxed{\\$1{,}000 \\text{ dollars}}", "1000"),
        ("He pays $-5 in the end", "-5"),
        ("answer: 7 ... no wait, the answer is 9", "9"),  # the last marker wins
        ("I give up", None),
        ("", None),
    ],
)
def test_gsm8k_extraction(text, expected):
    """Read as a final answer (after "</think>"), where the unmarked last-number rule applies too."""
    assert extract_answer("</think>\n" + text, "gsm8k") == expected


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("The answer is 18.0", "18", True),
        ("The answer is 18.", "18", True),
        ("The answer is $1,000,000", "1000000", True),
        ("#### 1000000", "1,000,000", True),
        ("The answer is -3", "-3", True),
        ("The answer is 3", "-3", False),
        ("The answer is 3/4", "0.75", True),
        ("The answer is 0.75", "3/4", True),
        ("\\boxed{\\frac{3}{4}}", "0.75", True),
        ("The answer is 1/3", "0.3333333", True),  # 1e-7 relative
        ("The answer is 1/3", "0.333333", False),  # 1.000001e-6 relative: just outside
        ("The answer is 0.3333", "1/3", False),  # 1e-4 relative
        ("The answer is 1/3", "0.34", False),
        ("The answer is 0.1", "0.10", True),
        ("The answer is 18", "180", False),
        ("The answer is 10%", "10", True),
        ("The answer is 5/0", "5", False),
        ("The answer is 0", "0", True),
        ("no number here", "0", False),
    ],
)
def test_gsm8k_grading_table(prediction, gold, expected):
    assert grade_answer(R + prediction, gold, "gsm8k") is expected


# ----------------------------------------------------------------------------------------------------------
# MATH


def test_math500_solutions_grade_true_against_their_own_answers(math500):
    """All 500 MATH-500 solutions (last \\boxed), read as final parts, are equivalent to their `answer` field
    for math-verify. Eight box the answer twice ("\\boxed{15\\frac{39}{40}}, or \\boxed{\\frac{639}{40}}")."""
    graded = [grade_answer(R + row["solution"], row["answer"], "math") for row in math500]
    assert sum(graded) >= 500, [row["answer"] for row, ok in zip(math500, graded) if not ok]


def test_math500_other_rows_answers_grade_false(math500):
    """Each solution against the NEXT row's answer: true only for the three coincidences (equal answers
    "7" and "3", and "5" vs "x=5", which math-verify accepts)."""
    wrong = [
        (math500[i]["answer"], math500[(i + 1) % 500]["answer"])
        for i in range(500)
        if grade_answer(R + math500[i]["solution"], math500[(i + 1) % 500]["answer"], "math")
    ]
    assert sorted(wrong) == [("3", "3"), ("5", "x=5"), ("7", "7")]


@pytest.mark.parametrize(
    "boxed, gold, expected",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac12", "0.5", True),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
        ("\\tfrac{3}{4}", "0.75", True),
        ("\\frac{1}{3}", "0.5", False),
        ("10\\%", "10\\%", True),
        ("10\\%", "10", True),  # math-verify's percent handling accepts both readings
        ("[1,2)", "[1,2)", True),
        ("[1,2)", "(1,2)", False),
        ("\\{1,2\\}", "\\{2,1\\}", True),
        ("5\\text{ cm}", "5", True),
        ("90^\\circ", "90", True),
        ("\\text{(C)}", "C", True),
        ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
        ("1,-2", "-2,1", True),
        ("3", "4", False),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{3} \\right)", False),
    ],
)
def test_math_equivalences(boxed, gold, expected):
    assert grade_answer(f"So the answer is $\\boxed{{{boxed}}}$.", gold, "math") is expected


def test_math_gold_may_be_a_boxed_solution():
    assert grade_answer("\\boxed{0.5}", "Hence $x = \\boxed{\\frac{1}{2}}$.", "math")
    assert not grade_answer("\\boxed{0.5}", "Hence $x = \\boxed{\\frac{1}{3}}$.", "math")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("first \\boxed{1}, then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not grouping braces
        ("\\boxed{\\left\\{ 1 \\right.}", "\\left\\{ 1 \\right."),
        ("so $\\boxed 5$.", "5"),
        ("\\boxed{1} then cut off \\boxed{\\frac{1}{2", "1"),  # the unclosed box is skipped
        ("The final answer is $x=5$", "x=5"),  # no box: math-verify's own extraction
        ("nothing to see", None),
    ],
)
def test_math_extraction(text, expected):
    assert extract_answer(R + text, "math") == expected


def test_last_boxed_nested_braces():
    assert last_boxed("x \\boxed{\\frac{a^{2}}{b_{1}}} y") == "\\frac{a^{2}}{b_{1}}"
    assert last_boxed("\\boxed{a}}} \\boxed {b}") == "b"
    assert last_boxed("no box") is None


def test_math_falls_back_to_math_verify_extraction_when_nothing_is_boxed():
    assert grade_answer(R + "The final answer is $\\frac{1}{2}$", "0.5", "math")
    assert not grade_answer(R + "The final answer is $\\frac{1}{3}$", "0.5", "math")


# ----------------------------------------------------------------------------------------------------------
# The <think> ... </think> format


def test_thinking_text_after_the_last_think_end_is_preferred():
    text = "<think>\nThe answer is 7? Wait, hold on. answer: 9\n</think>\nThe answer is 12."
    assert extract_answer(text, "gsm8k") == "12"
    assert grade_answer(text, "12", "gsm8k") and not grade_answer(text, "9", "gsm8k")
    text = "<think> maybe \\boxed{3} </think> So the answer is $\\boxed{\\frac{1}{2}}$."
    assert extract_answer(text, "math") == "\\frac{1}{2}"
    assert grade_answer(text, "0.5", "math") and not grade_answer(text, "3", "math")
    # the final part is read with every strategy before the thinking is looked at
    text = "<think> The answer is 7. </think> So she has 12 apples."
    assert extract_answer(text, "gsm8k") == "12"
    text = "<think> is it \\boxed{3}? </think> The final answer is $\\frac{1}{2}$"
    assert extract_answer(text, "math") == "\\frac{1}{2}"
    # the LAST </think> counts
    text = "<think>a</think> The answer is 1 <think>b</think> so 2"
    assert extract_answer(text, "gsm8k") == "2"


def test_nothing_after_the_last_think_end_is_no_answer():
    """What the model wrote while thinking never counts, also when nothing follows </think>."""
    assert extract_answer("<think> so it is \\boxed{4}</think>", "math") is None
    assert extract_answer("<think> so the answer is 4</think>\n", "gsm8k") is None
    assert not grade_answer("<think> so the answer is 4</think>\n", "4", "gsm8k")
    assert extract_answer("<think> 3 apples, then 5 (cut off", "gsm8k") is None  # no </think>, no marker


# ----------------------------------------------------------------------------------------------------------
# Malformed output, user errors


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        "   ",
        "I don't know",
        "\\boxed{",
        "\\boxed{\\frac{1}{}",
        "$$((((",
        "}}}{{{",
        "#### ",
        None,
        42,
        "Wait, hold on. " * 2000,
        "\\boxed{" * 3000,
        "\\boxed{\\frac{1}{0}}",
        "\x00\ufffd",
    ],
)
@pytest.mark.parametrize("dataset", ["gsm8k", "math"])
def test_malformed_output_grades_false_without_raising(prediction, dataset):
    assert grade_answer(prediction, "5", dataset) is False


def test_user_errors():
    with pytest.raises(UserError, match="unknown dataset"):
        grade_answer("5", "5", "aime")
    with pytest.raises(UserError, match="unknown dataset"):
        extract_answer("5", "svamp")
    with pytest.raises(UserError, match="no number"):
        grade_answer("5", "five", "gsm8k")
    with pytest.raises(UserError, match="empty"):
        grade_answer("5", "  ", "math")
    with pytest.raises(UserError, match="timeout_s"):
        grade_answer("5", "5", "math", timeout_s=0)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "5", None):
        with pytest.raises(UserError, match="timeout_s"):
            extract_answer(R + "\\boxed{5}", "gsm8k", timeout_s=bad)
    assert grade_answer(R + "The answer is 5", 5, "GSM8K")  # int gold, dataset name in any case


# ----------------------------------------------------------------------------------------------------------
# Threads and time limits


EQUIVALENCES = [
    ("\\boxed{\\frac12}", "0.5", True),
    ("\\boxed{[1,2)}", "(1,2)", False),
    ("#### 1,000", "1000", True),
]


def test_math_verify_defaults_fail_in_a_worker_thread():
    """Why grading must not pass math-verify its own (signal.alarm) timeouts off the main thread."""
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="thread"):
        pool.submit(math_verify.parse, "$\\frac12$").result()


def test_grading_from_worker_threads():
    def grade(case):
        prediction, gold, _ = case
        dataset = "gsm8k" if prediction.startswith("####") else "math"
        return grade_answer(prediction, gold, dataset), extract_answer(prediction, dataset)

    with ThreadPoolExecutor(3) as pool:
        in_threads = list(pool.map(grade, EQUIVALENCES * 2))
    assert [graded for graded, _ in in_threads] == [expected for *_, expected in EQUIVALENCES] * 2
    assert [answer for _, answer in in_threads[:3]] == ["\\frac12", "[1,2)", "1000"]


def _slow_verify(gold, target, **kwargs):
    time.sleep(3)
    return True


def test_timeout_in_main_thread_restores_the_callers_timer(monkeypatch):
    monkeypatch.setattr(grading, "verify", _slow_verify)
    fired = []

    def callers_handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, callers_handler)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        start = time.monotonic()
        assert grade_answer("\\boxed{5}", "5", "math", timeout_s=0.2) is False
        assert time.monotonic() - start < 1.5
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < remaining <= 30
        assert signal.getsignal(signal.SIGALRM) is callers_handler and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_timeout_in_worker_thread(monkeypatch):
    monkeypatch.setattr(grading, "verify", _slow_verify)
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(grade_answer, "\\boxed{5}", "5", "math", 0.2).result() is False
    assert time.monotonic() - start < 1.5
    assert any(t.name == "grade_answer" and t.daemon for t in threading.enumerate())  # abandoned, not joined


def test_within_the_limit_the_slow_comparison_counts(monkeypatch):
    monkeypatch.setattr(grading, "verify", lambda gold, target, **kwargs: time.sleep(0.05) or True)
    assert grade_answer("\\boxed{5}", "6", "math", timeout_s=2.0) is True
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(grade_answer, "\\boxed{5}", "6", "math", 2.0).result() is True


# ----------------------------------------------------------------------------------------------------------
# Degeneration measures


def test_ngram_repetition_closed_forms():
    assert ngram_repetition("a b a b a b", n=2) == 1 - 2 / 5  # bigrams ab ba ab ba ab
    assert ngram_repetition("a a a b", n=1) == 1 - 2 / 4
    assert ngram_repetition("a\tb\n a  b", n=2) == 1 - 2 / 3  # any whitespace separates tokens
    assert ngram_repetition("A a A a", n=1) == 1 - 2 / 4  # case-sensitive
    assert ngram_repetition("one two three four five") == 0.0
    assert ngram_repetition("one two three") == 0.0  # fewer tokens than n
    assert ngram_repetition("") == 0.0
    assert ngram_repetition("a b c d", n=4) == 0.0  # exactly one 4-gram
    # a loop of 3 words, k times: 3k - 3 four-grams, 3 distinct
    for k in (2, 10, 50):
        assert ngram_repetition("Wait hold on " * k) == pytest.approx(1 - 3 / (3 * k - 3), abs=1e-15)
    with pytest.raises(UserError, match="positive"):
        ngram_repetition("a b", n=0)


def test_compression_ratio_closed_forms():
    assert compression_ratio("") == 0.0
    # one byte: 2-byte zlib header + 3-byte fixed-Huffman block (3 + 8 + 7 bits) + 4-byte Adler-32
    assert compression_ratio("a") == 1 / 9
    text = "é" * 50  # 100 UTF-8 bytes, not 50 characters
    stream = zlib.compressobj(9)
    assert compression_ratio(text) == 100 / len(stream.compress(text.encode("utf-8")) + stream.flush())


def test_degeneration_separates_loops_from_real_solutions(gsm8k):
    loop = "Wait, hold on. " * 100
    assert compression_ratio(loop) > 20 and ngram_repetition(loop) > 0.95
    # all 1319 real GSM8K solutions: compression ratio 0.94-2.73, 4-gram repetition at most 0.25
    prose = [rationale for rationale, _ in gsm8k]
    assert max(compression_ratio(text) for text in prose) < 3
    assert max(ngram_repetition(text) for text in prose) < 0.3
