"""Grading generated answers (GSM8K, MATH) and measuring degenerate, repetitive generations.

`extract_answer` finds a model's final answer in its text, `grade_answer` compares it with the gold answer
(numbers for GSM8K, LaTeX equivalence through math-verify for MATH), and `ngram_repetition` /
`compression_ratio` score the "Wait, hold on" loops that late-layer steering can produce.

Only a FINAL answer counts. Reasoning models write "<think> ... </think> answer"; the project generates
from a prompt that already ends in "<think>\n" (the chat template), so a generation usually holds "</think>"
but not "<think>". The answer is looked for in one place, with one set of rules:
- text with "</think>": only the text after the LAST "</think>" is read, with every rule (the explicit markers
  below, and the dataset's unmarked fallback: GSM8K's last number, MATH's math-verify extraction). What the
  model wrote while thinking never counts, also when nothing follows "</think>".
- text without "</think>" (cut off while thinking, or a model that does not think): only an explicit final
  answer counts: the last \\boxed{} / \\fbox{}, or the text after the last "The answer is" / "answer:" /
  "####". A bare number in unfinished reasoning is not an answer.
No answer -> `extract_answer` returns None, `has_final_answer` False and `grade_answer` False (incorrect).
`has_final_answer(text) is False` is the definition of a truncated (unfinished) generation.
Dashes used as a minus sign before a number (U+2212 minus, U+2013 en dash, U+2012 figure dash, U+2010 /
U+2011 hyphens, U+FE63 small and U+FF0D full-width hyphen-minus) are read as "-" first, in predictions and gold
answers: "The answer is <U+2212>5" reads as -5. The em dash (U+2014) is left alone: in prose it is punctuation.

Grading never raises on malformed model output (it returns False); mistakes in what the caller asked for
(unknown dataset, gold answer without an answer in it, bad timeout) raise `UserError`.

Time limits: math-verify bounds its own work with signal.alarm, which only works in the main thread. We pass
it no timeout and bound the whole call ourselves instead, the same way in every thread: in the main thread a
SIGALRM interval timer (any previous timer and handler are restored afterwards), elsewhere the work runs in a
daemon thread that is abandoned when it overruns. Either way a timeout counts as "not graded correct". Both
mechanisms interrupt Python code only: a single C-level computation (e.g. a gigantic integer power inside
sympy) can delay the return.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
import zlib
from collections.abc import Callable
from fractions import Fraction
from typing import TypeVar

from math_verify import parse, verify

from interp.errors import UserError

DATASETS = ("gsm8k", "math")
THINK_END = "</think>"
RELATIVE_TOLERANCE = 1e-6  # GSM8K, when a side is a fraction: |a - b| <= 1e-6 * max(|a|, |b|)

T = TypeVar("T")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that with no timeout "you must provide the logic" yourself: we do (_bounded)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# ----------------------------------------------------------------------------------------------------------
# Finding the answer in a text


# Dashes read as the ASCII minus / hyphen (see the module docstring): str.translate table.
_DASHES = str.maketrans({char: "-" for char in "\u2010\u2011\u2012\u2013\u2212\ufe63\uff0d"})


def _final_part(text: str) -> tuple[str, bool]:
    """(where the final answer must be, whether the dataset's unmarked fallback may be used there): the text
    after the last </think> with fallbacks when there is one, else the whole text, explicit markers only."""
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1], True
    return text, False


_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed\s+([^\s${}]+)")  # "\boxed 5", a form MATH solutions sometimes use
_BRACE = re.compile(r"(?<!\\)[{}]")  # grouping braces; LaTeX's literal \{ \} (sets) do not nest


def last_boxed(text: str) -> str | None:
    """Content of the last brace-balanced \\boxed{...} / \\fbox{...} (or "\\boxed 5") in `text`, stripped.

    "Last" is by where the box starts, so "\\boxed{\\boxed{5}}" gives "5". A box that is never closed (cut
    off output) is skipped in favour of the last closed one before it; None when there is none.
    """
    box_at = {match.end() - 1: match.start() for match in _BOX_START.finditer(text)}  # its "{" -> its start
    candidates = [(match.start(), match.group(1)) for match in _BOX_BARE.finditer(text)]
    open_braces: list[int] = []
    for brace in _BRACE.finditer(text):  # one pass, matching each "}" with the latest open "{"
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            opened = open_braces.pop()
            if opened in box_at:
                candidates.append((box_at[opened], text[opened + 1 : brace.start()].strip()))
    return max(candidates)[1] if candidates else None


# Numbers as GSM8K answers write them: "-3", "1,234", "18.00", ".5", "3/4". A comma only counts as a thousands
# separator in groups of three; a trailing period ("18.") is not part of the number; a "-" right after a
# word character ("3-5") is a hyphen, not a sign.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_UNSIGNED = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(rf"(?<![\w.])(?:(?<![\w)])-)?{_UNSIGNED}(?:/{_UNSIGNED})?")
# Answer markers; between a marker and its number only non-word characters and LaTeX commands may stand
# ("The answer is: $\boxed{18}$", "**Answer:** 18"), so "The answer is that 3 ..." has no marked number.
_MARKER = re.compile(r"####|\banswer\s+is\b|\banswer\s*:", re.IGNORECASE)
_MARKED_NUMBER = re.compile(rf"(?:\\[a-zA-Z]+|[^\w-])*?({_NUMBER.pattern})")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def _plain_numbers(text: str) -> str:
    """Undo LaTeX number spellings: \\frac{a}{b} -> a/b, "1{,}000" / "1,\\!000" / "1\\,000" -> "1,000" / "1000",
    and drop currency and math delimiters ("$", "\\$") so "$-5" reads as -5."""
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    return text.replace("\\$", "").replace("$", "")


def _canonical(number: str) -> str:
    return number.replace(",", "")


def _extract_gsm8k(region: str, fallback: bool) -> str | None:
    text = _plain_numbers(region)
    for marker in reversed(list(_MARKER.finditer(text))):
        found = _MARKED_NUMBER.match(text, marker.end())
        if found:
            return _canonical(found.group(1))
    boxed = last_boxed(region)
    if boxed is not None:
        found = _NUMBER.search(_plain_numbers(boxed))
        if found:
            return _canonical(found.group(0))
    numbers = _NUMBER.findall(text) if fallback else []
    return _canonical(numbers[-1]) if numbers else None


def _math_verify_extraction(text: str) -> str | None:
    """math-verify's own extraction: [parsed..., matched string] with its default fallback_mode="first_match"."""
    found = [item for item in parse(text, parsing_timeout=None) if isinstance(item, str)]
    return found[-1].strip() if found and found[-1].strip() else None


def _extract_math(region: str, fallback: bool) -> str | None:
    boxed = last_boxed(region)
    if boxed:
        return boxed
    if fallback:
        return _math_verify_extraction(region)
    markers = list(_MARKER.finditer(region))
    return _math_verify_extraction(region[markers[-1].end() :]) if markers else None


def _extract(text: str, dataset: str) -> str | None:
    """The one extraction path (see the module docstring): the final answer of a model's output, or None."""
    region, fallback = _final_part(text.translate(_DASHES))
    return (_extract_gsm8k if dataset == "gsm8k" else _extract_math)(region, fallback)


def _check_dataset(dataset: str) -> str:
    name = str(dataset).lower()
    if name not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r} for grading: expected one of {', '.join(DATASETS)}")
    return name


def _check_timeout(timeout_s: float) -> float:
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise UserError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def extract_answer(text: str, dataset: str, timeout_s: float = 5.0) -> str | None:
    """The final answer in a model's output, or None when it has none (or on timeout).

    gsm8k: the number after the last answer marker ("####", "The answer is", "answer:", any case) that is
        followed by one; else the first number inside the last \\boxed{...}; else (only after "</think>")
        the last number. Returned canonical: thousands commas removed, no "$" / "\\$" / units / "%" / trailing period
        ("$1,234." -> "1234", "10%" -> "10": a percent sign is dropped, the value is NOT divided by 100,
        as GSM8K writes percentages as bare numbers). Negative numbers, decimals and fractions ("3/4",
        \\frac{3}{4} -> "3/4") are kept as written.
    math: the content of the last brace-balanced \\boxed{...} / \\fbox{...}, else math-verify's own
        extraction (LaTeX / plain expression; without "</think>" only of the text after the last marker),
        returned as the matched string.
    Where: after the last "</think>" with all of the above; without "</think>" only the marked forms (a
        marker's number / a box for gsm8k; a box, or math-verify on the text after the last marker, for math).
        See the module docstring. `timeout_s` bounds the math-verify calls.
    """
    name = _check_dataset(dataset)
    timeout_s = _check_timeout(timeout_s)
    if not isinstance(text, str):
        return None
    return _bounded(lambda: _extract(text, name), timeout_s, None)


def has_final_answer(text: str, dataset: str, timeout_s: float = 5.0) -> bool:
    """True when `text` holds a final answer, i.e. `extract_answer(text, dataset, timeout_s) is not None`.

    A generation without one is "truncated" (unfinished: cut off while thinking, or ended without stating an
    answer); `grade_answer` marks it incorrect. A timeout counts as no answer.
    """
    return extract_answer(text, dataset, timeout_s) is not None


# ----------------------------------------------------------------------------------------------------------
# Grading


def _to_fraction(number: str) -> Fraction | None:
    """Exact value of a canonical number string ("-18.00", "3/4", ".5"); None when the denominator is 0."""
    numerator, _, denominator = number.partition("/")
    value = Fraction(numerator)
    if denominator:
        if Fraction(denominator) == 0:
            return None
        value = value / Fraction(denominator)
    return value


def _numbers_equal(a: str, b: str) -> bool:
    """Exact equality of the values; within RELATIVE_TOLERANCE when either is written as a fraction (its
    decimal form may be rounded: "1/3" == "0.3333333"). Integers and decimals compare exactly, so a large
    answer off by one ("1450001" vs "1450000", 7e-7 relative) is wrong."""
    x, y = _to_fraction(a), _to_fraction(b)
    if x is None or y is None:
        return False
    if x == y:
        return True
    return ("/" in a or "/" in b) and abs(x - y) <= RELATIVE_TOLERANCE * max(abs(x), abs(y))


def _gold_answer(gold: str | int | float, dataset: str) -> str:
    """The answer in a gold field: a bare answer, or a worked solution ("... #### 18", "... \\boxed{18}")."""
    text = str(gold).strip().translate(_DASHES) if isinstance(gold, (str, int, float)) else ""
    if dataset == "gsm8k":  # a gold field is a final answer: the unmarked last-number rule applies
        answer = _extract_gsm8k(text, fallback=True) if text else None
        if answer is None or _to_fraction(answer) is None:
            raise UserError(f"gold answer {str(gold)[:80]!r} has no number to grade against")
        return answer
    answer = last_boxed(text) or text
    if not answer:
        raise UserError("gold answer is empty")
    return answer


def _grade_math(prediction: str, gold: str) -> bool:
    answer = _extract(prediction, "math")
    if answer is None:
        return False
    # Re-boxing makes math-verify read the whole answer (boxed extraction has the highest priority).
    target = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    reference = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    return bool(target and reference and verify(reference, target, timeout_seconds=None))


def _grade_gsm8k(prediction: str, gold: str) -> bool:
    answer = _extract(prediction, "gsm8k")
    return answer is not None and _numbers_equal(answer, gold)


def grade_answer(prediction: str, gold: str, dataset: str, timeout_s: float = 5.0) -> bool:
    """True when `prediction` (a model's output) answers like `gold`; never raises on malformed output.

    The prediction's answer is `extract_answer(prediction, dataset)`: no final answer (e.g. cut off while
    thinking) grades False. The gold field is read as a final answer (its last number counts unmarked).
    dataset "gsm8k": the numbers found in both are equal: exactly for integers and decimals
        ("18.0" == "18", "1,000" == "1000", "-3" != "3"), within 1e-6 relative when either side is a fraction
        ("3/4" == "0.75", "1/3" == "0.3333333"). `gold` may be the bare answer or a full GSM8K solution
        ending in "#### <answer>".
    dataset "math": math-verify `verify(gold, prediction)` on the prediction's answer against `gold` (bare
        LaTeX, or a solution whose last \\boxed{} holds it). LaTeX equivalence: \\frac12 == 0.5, \\dfrac,
        intervals, sets, \\text{} units.
    The whole call is bounded by `timeout_s` seconds in any thread; a timeout returns False.
    Raises UserError for an unknown dataset, a gold answer without an answer in it, or timeout_s <= 0.
    """
    name = _check_dataset(dataset)
    timeout_s = _check_timeout(timeout_s)
    reference = _gold_answer(gold, name)
    if not isinstance(prediction, str):
        return False
    grade = _grade_gsm8k if name == "gsm8k" else _grade_math
    return _bounded(lambda: grade(prediction, reference), timeout_s, False)


# ----------------------------------------------------------------------------------------------------------
# Time limits


class _Timeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so math-verify's `except Exception` cannot swallow it."""


def _bounded(work: Callable[[], T], timeout_s: float, default: T) -> T:
    """work() if it finishes within timeout_s seconds and does not raise, else `default`."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _bounded_by_alarm(work, timeout_s, default)
    result: list = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException:  # noqa: BLE001 - malformed output must grade as False, never raise
            pass

    worker = threading.Thread(target=run, name="grade_answer", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result[0] if result else default


def _bounded_by_alarm(work: Callable[[], T], timeout_s: float, default: T) -> T:
    def on_alarm(signum, frame):
        raise _Timeout

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return work()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return default
    except Exception:
        return default
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:  # re-arm a caller's timer with what was left of it
            remaining = max(previous_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


# ----------------------------------------------------------------------------------------------------------
# Degeneration measures


def ngram_repetition(text: str, n: int = 4) -> float:
    """Share of repeated word n-grams: 1 - (#distinct n-grams / #n-grams), in [0, 1).

    Tokens are `text.split()` (runs of whitespace separate them, case and punctuation are kept); the
    n-grams are the len(tokens) - n + 1 overlapping windows. 0.0 when there are fewer than n tokens (no
    n-gram) and when no n-gram repeats; it approaches 1 for a loop of one phrase ("a b a b a b", n=2:
    5 bigrams, 2 distinct -> 1 - 2/5 = 0.6). Raises UserError for n < 1.
    """
    if not isinstance(n, int) or n < 1:
        raise UserError(f"n-gram size must be a positive integer, got {n!r}")
    tokens = text.split()
    if len(tokens) < n:
        return 0.0
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams)


def compression_ratio(text: str) -> float:
    """len(utf-8 bytes of text) / len(zlib.compress(those bytes, level 9)); higher = more repetitive.

    The empty string gives 0.0 (0 bytes over zlib's 8-byte empty stream). zlib adds 6 bytes of framing
    (header + Adler-32) to the deflate data, so short texts score below 1 ("a": 1/9). A GSM8K question with
    its worked solution scores about 1.4-2.2; a loop of one phrase grows with the number of repeats
    ("Wait, hold on. " x 5: ~2.9, x 20: ~10.7, x 100: ~42).
    """
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data, 9))
