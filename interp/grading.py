"""Grading generated answers (GSM8K, MATH).

`extract_answer` finds a model's final answer in its text, `grade_answer` compares it with the gold answer
(numbers for GSM8K, LaTeX equivalence through math-verify for MATH). Degeneration measures of generated text
(`ngram_repetition`, `compression_ratio`) are in `interp.text_metrics`.

Only a FINAL answer counts. Reasoning models write "<think> ... </think> answer"; the project generates
from a prompt that already ends in "<think>\\n" (the chat template), so a finished generation holds "</think>"
followed by a short written answer. The answer is looked for in one place (`_extract`, shared by
`extract_answer`, `has_final_answer` and `grade_answer`), with one set of rules:
- text with "</think>": only the text after the LAST "</think>" (the final part) is read. What the model wrote
  while thinking never counts, also when nothing follows "</think>". In the final part, in this order:
  gsm8k: (1) the last \\boxed{} / \\fbox{} when its content is one number (see "Numbers"; a last box
  that is not, e.g. "\\boxed{2:30}", is passed over); (2) the LAST "answer is" / "answer:" (any case) whose sentence holds a number: the last number of that
  sentence ("The answer is 5 + 13 = 18." -> 18); the sentence runs from the marker to the next line break,
  "!", "?" or sentence-ending "." (a period not followed by a digit); (3) the last line "#### <number>" whose
  rest is one number ("#### 18 dollars"; a markdown heading "#### 1. Eggs left" is not); (4) the last number
  of the final part.
  math: (1) the content of the last \\boxed{} / \\fbox{}; (2) math-verify's own extraction of the final part.
- text without "</think>" (cut off while thinking, or a model that does not think): only an answer the text
  ENDS with counts: the last \\boxed{} / \\fbox{} (gsm8k: if its content is one number), or for gsm8k a last
  "#### <number>" line as in (3), followed by nothing but an ending: `_ENDING`, i.e. any run of whitespace,
  ".", "!", "*", "$", "}", "\\]" and "\\)" (no words, digits, "?" or ","). "The answer is 18" without
  "</think>" is no answer: mid-thought hedges ("So the answer is 18? Wait, ...") look the same.
No answer -> `extract_answer` returns None, `has_final_answer` False and `grade_answer` False (incorrect).
`has_final_answer(text) is False` is the definition of a truncated (unfinished) generation.

Numbers (gsm8k): dashes used as a minus sign (U+2212 minus, U+2013 en dash, U+2012 figure dash, U+2010 /
U+2011 hyphens, U+FE63 small and U+FF0D full-width hyphen-minus) are read as "-" first, in predictions and gold
answers; the em dash (U+2014) is prose punctuation and left alone. Thousands separators between digit groups
of exactly three are removed: ",", "{,}", "\\text{,}", "\\ ", "\\,", "\\!", "\\;", "\\:", thin spaces (U+2009,
U+202F), and, where the whole content must be one number (a box, a "####" line), also a normal or no-break
space ("1 000"). Such a content is ONE NUMBER when it reads (`_WHOLE`) as: an optional "<name> =", an
optional "-" (spaces may follow it: "- 5" -> -5), the number, optional lowercase unit words or "%", at most
one "." or "!", with spaces around any of them. Mixed numbers "a\\frac{b}{c}" / "a \\frac{b}{c}" read as a + b/c, other \\frac{a}{b} / \\frac12 as a/b;
"$", "\\$", "%" and \\text{} / \\mbox{} wrappers are dropped (a percent is NOT divided by 100, as GSM8K writes
percentages as bare numbers). Not supported: scientific notation ("1.5 \\times 10^6", "1.5e6": read as
separate numbers), number words ("eighteen") and multiplier words ("2.4 million" reads 2.4); an aside
after a marked answer counts ("The answer is 18 (not 20)." reads 20: the sentence's last number).

Known limitations (math, math-verify's own leniency, kept as is): a base subscript is ignored ("52_9" ==
"52_8"), so are unit exponents ("15\\mbox{ cm}^3" == "15\\mbox{ cm}^2"); "10\\%" == "10"; decimals match
fractions and each other within math-verify's relative tolerance ("0.333333" == "\\frac{1}{3}", ".0000673" ==
".0000672"); "x=5" == "5".

Grading never raises on malformed model output (it returns False); mistakes in what the caller asked for
(unknown dataset, gold answer without an answer in it, bad timeout) raise `UserError`.

Time limits: math-verify bounds its own work with signal.alarm, which only works in the main thread. We pass
it no timeout and bound the whole call ourselves instead, the same way in every thread
(`interp.timeouts.run_with_timeout`: a SIGALRM timer in the main thread, an abandoned daemon thread elsewhere).
A timeout counts as "no answer" / "not graded correct". Both mechanisms interrupt Python
code only, and sympy can spend unbounded C-level time on a power tower (10^{10^{10}}, 2^{2^{30}}). So a MATH
answer or gold with a huge power (`_huge_power`: a "^" whose exponent, the brace group or the token after it,
contains another "^" or a run of four or more digits, or a second "^" right after a one-token exponent as
in "2^3^4") is never given to math-verify: it is compared as a normalised string (`_latex_key`: no spaces,
"$", \\left, \\right, \\, \\! \\; "\\ "; \\dfrac / \\tfrac -> \\frac; single-character groups "{9}" -> "9").
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction

from math_verify import parse, verify

from interp.errors import UserError
from interp.timeouts import check_timeout, run_with_timeout

DATASETS = ("gsm8k", "math", "toy_arithmetic")
# How each dataset's answers are read and compared: toy_arithmetic problems are GSM8K-style (a number).
ANSWER_FORMAT = {"gsm8k": "gsm8k", "math": "math", "toy_arithmetic": "gsm8k"}
THINK_END = "</think>"
RELATIVE_TOLERANCE = 1e-6  # GSM8K, when a side is a fraction: |a - b| <= 1e-6 * max(|a|, |b|)


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that with no timeout "you must provide the logic" yourself: we do
    (`run_with_timeout`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# ----------------------------------------------------------------------------------------------------------
# Boxes, and where a text ends


# Dashes read as the ASCII minus / hyphen (see the module docstring): str.translate table.
_DASHES = str.maketrans({char: "-" for char in "\u2010\u2011\u2012\u2013\u2212\ufe63\uff0d"})

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed\s+([^\s${}]+)")  # "\boxed 5", a form MATH solutions sometimes use
_BRACE = re.compile(r"(?<!\\)[{}]")  # grouping braces; LaTeX's literal \{ \} (sets) do not nest
# What may follow an answer that an unfinished text ends with (module docstring): no words, digits, "?", ",".
_ENDING = re.compile(r"(?:\s|[.!*$}]|\\[\])])*")


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, stripped content) of every closed \\boxed{...} / \\fbox{...} / "\\boxed 5" in `text`."""
    box_at = {match.end() - 1: match.start() for match in _BOX_START.finditer(text)}  # its "{" -> its start
    found = [(match.start(), match.end(), match.group(1)) for match in _BOX_BARE.finditer(text)]
    open_braces: list[int] = []
    for brace in _BRACE.finditer(text):  # one pass, matching each "}" with the latest open "{"
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            opened = open_braces.pop()
            if opened in box_at:
                found.append((box_at[opened], brace.end(), text[opened + 1 : brace.start()].strip()))
    return found


def last_boxed(text: str) -> str | None:
    """Content of the last brace-balanced \\boxed{...} / \\fbox{...} (or "\\boxed 5") in `text`, stripped.

    "Last" is by where the box starts, so "\\boxed{\\boxed{5}}" gives "5". A box that is never closed (cut
    off output) is skipped in favour of the last closed one before it; None when there is none.
    """
    boxes = _boxes(text)
    return max(boxes)[2] if boxes else None


def _box_at_end(text: str) -> str | None:
    """Content of the last box when `text` ends with it (only an `_ENDING` after it), else None."""
    boxes = _boxes(text)
    if not boxes:
        return None
    _, end, content = max(boxes)
    return content if _ENDING.fullmatch(text, end) else None


# ----------------------------------------------------------------------------------------------------------
# GSM8K numbers


# Numbers as GSM8K answers write them: "-3", "1,234", "18.00", ".5", "3/4". A comma only counts as a thousands
# separator in groups of three; a trailing period ("18.") is not part of the number; a "-" right after a
# word character or ")" ("3-5") is a hyphen, not a sign.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_UNSIGNED = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(rf"(?<![\w.])(?:(?<![\w)])-)?{_UNSIGNED}(?:/{_UNSIGNED})?")
_SEPARATOR = r",?\\[ ,!;:]|\{,\}|\\(?:text|mbox)\{,\}|,|[\u2009\u202f]"
_GROUPED = re.compile(rf"(?<![\d.])\d{{1,3}}(?:(?:{_SEPARATOR})\d{{3}})+(?!\d)")
_GROUPED_WHOLE = re.compile(rf"(?<![\d.])\d{{1,3}}(?:(?:{_SEPARATOR}|[ \u00a0])\d{{3}})+(?!\d)")
_FRAC_ARG = r"\s*(?:\{\s*(\d+)\s*\}|(\d))"
_MIXED = re.compile(rf"(?<![\d.])(\d+)[ \t]*\\[dt]?frac{_FRAC_ARG}{_FRAC_ARG}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_SPACING = re.compile(r"\\[ ,!;:]")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{([^{}]*)\}")
# One number and nothing else: "x = - 5", "18 dollars", "25%", "18." (after _plain_numbers(whole=True)).
_WHOLE = re.compile(
    rf"\s*(?:[a-zA-Z]\w*\s*=\s*)?(-?)\s*({_UNSIGNED}(?:/{_UNSIGNED})?)\s*(?:%|[a-z][a-z ]*)?\s*[.!]?\s*"
)


def _mixed(match: re.Match) -> str:
    whole, numerator, denominator = int(match[1]), int(match[2] or match[3]), int(match[4] or match[5])
    return match[0] if denominator == 0 else f"{whole * denominator + numerator}/{denominator}"


def _plain_numbers(text: str, whole: bool = False) -> str:
    """Undo LaTeX number spellings (module docstring, "Numbers"): mixed numbers and \\frac, thousands
    separators (also plain spaces when `whole`, the content must be one number), spacing commands, \\text{}
    wrappers, "$", "\\$" and "\\%"."""
    text = _MIXED.sub(_mixed, text)
    text = _LATEX_FRAC.sub(lambda m: f"{m[1] or m[2]}/{m[3] or m[4]}", text)
    text = (_GROUPED_WHOLE if whole else _GROUPED).sub(lambda m: re.sub(r"\D", "", m[0]), text)
    text = _TEXT_WRAPPER.sub(r"\1", _SPACING.sub(" ", text))
    return text.replace("\\%", "%").replace("\\$", "").replace("$", "")


def _canonical(number: str) -> str:
    return number.replace(",", "")


def _whole_number(content: str) -> str | None:
    """The number that `content` (a box's content, the rest of a "####" line) consists of, canonical; or None."""
    found = _WHOLE.fullmatch(_plain_numbers(content, whole=True))
    return _canonical(found[1] + found[2]) if found else None


_MARKER = re.compile(r"\banswer\s+is\b|\banswer\s*:", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[\n!?]|\.(?!\d)")
_HASH_LINE = re.compile(r"^[ \t]*####([^\n]*)$", re.MULTILINE)


def _extract_gsm8k(region: str, finished: bool) -> str | None:
    hash_lines = list(_HASH_LINE.finditer(region))
    if not finished:  # only an answer the text ends with
        boxed = _box_at_end(region)
        if boxed is not None:
            return _whole_number(boxed)
        if hash_lines and _ENDING.fullmatch(region, hash_lines[-1].end()):
            return _whole_number(hash_lines[-1][1])
        return None
    boxed = last_boxed(region)
    if boxed is not None and _whole_number(boxed) is not None:
        return _whole_number(boxed)
    text = _plain_numbers(region)
    searched_from = len(text)  # a later marker's sentence had no number from there on: linear time
    for marker in reversed(list(_MARKER.finditer(text))):
        end = _SENTENCE_END.search(text, marker.end(), searched_from)
        numbers = _NUMBER.findall(text, marker.end(), end.start() if end else searched_from)
        if numbers:
            return _canonical(numbers[-1])
        searched_from = marker.end()
    for line in reversed(hash_lines):
        if _whole_number(line[1]) is not None:
            return _whole_number(line[1])
    numbers = _NUMBER.findall(text)
    return _canonical(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------------------------------------
# MATH answers


def _math_verify_extraction(text: str) -> str | None:
    """math-verify's own extraction: [parsed..., matched string] with its default fallback_mode="first_match"."""
    found = [item for item in parse(text, parsing_timeout=None) if isinstance(item, str)]
    return found[-1].strip() if found and found[-1].strip() else None


def _extract_math(region: str, finished: bool) -> str | None:
    if not finished:
        return _box_at_end(region) or None
    return last_boxed(region) or _math_verify_extraction(region)


_CARET, _NEXT_CARET = re.compile(r"\^\s*"), re.compile(r"\s*\^")
_TOKEN = re.compile(r"\d+|\\[a-zA-Z]+|.?", re.DOTALL)  # an exponent without braces, read generously ("^1000")


def _exponents(latex: str):
    """(exponent, where it ends) for every "^": the brace group after it, else the one token after it."""
    for caret in _CARET.finditer(latex):
        start = caret.end()
        if latex.startswith("{", start):
            depth, end = 0, start
            for end in range(start, len(latex)):
                depth += {"{": 1, "}": -1}.get(latex[end], 0) if latex[end - 1] != "\\" else 0
                if depth == 0:
                    break
            yield latex[start + 1 : end], end + 1
        else:
            token = _TOKEN.match(latex, start)[0]
            yield token, start + len(token)


def _huge_power(latex: str) -> bool:
    """A power sympy may need unbounded C-level time for (module docstring, "Time limits")."""
    return any(
        "^" in exponent or re.search(r"\d{4}", exponent) or _NEXT_CARET.match(latex, end)
        for exponent, end in _exponents(latex)
    )


def _latex_key(latex: str) -> str:
    """A LaTeX answer normalised for string comparison (module docstring, "Time limits")."""
    key = re.sub(r"\s+|\$|\\left\b|\\right\b|\\[,!; ]", "", latex).replace("\\dfrac", "\\frac")
    key = key.replace("\\tfrac", "\\frac")
    while re.search(r"\{(\w)\}", key):
        key = re.sub(r"\{(\w)\}", r"\1", key)
    return key


# ----------------------------------------------------------------------------------------------------------
# Extraction (public)


def _extract(text: str, dataset: str) -> str | None:
    """The one extraction path (see the module docstring): the final answer of a model's output, or None."""
    text = text.translate(_DASHES)
    finished = THINK_END in text
    region = text.rsplit(THINK_END, 1)[1] if finished else text
    return (_extract_gsm8k if dataset == "gsm8k" else _extract_math)(region, finished)


def _check_dataset(dataset: str) -> str:
    """The answer format ("gsm8k" | "math") of a dataset name; UserError for an unknown one."""
    name = str(dataset).lower()
    if name not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r} for grading: expected one of {', '.join(DATASETS)}")
    return ANSWER_FORMAT[name]


def extract_answer(text: str, dataset: str, timeout_s: float = 5.0) -> str | None:
    """The final answer in a model's output, or None when it has none (or on timeout).

    Where and in which order it is looked for: the module docstring. gsm8k returns the number canonical:
    thousands separators removed, no "$" / "\\$" / units / "%" / trailing period ("$1,234." -> "1234",
    "10%" -> "10"); negative numbers, decimals and fractions are kept as written ("3/4"; \\frac{3}{4} ->
    "3/4"; the mixed number 7\\frac{1}{2} -> "15/2"). math returns the content of the box, or the string
    math-verify matched. `timeout_s` (finite, > 0) bounds the whole call.
    """
    name = _check_dataset(dataset)
    timeout_s = check_timeout(timeout_s)
    if not isinstance(text, str):
        return None
    return run_with_timeout(lambda: _extract(text, name), timeout_s, None, thread_name="grade_answer")


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
    if dataset == "gsm8k":  # a gold field is a final answer; a GSM8K solution's answer follows its "####"
        answer = _extract_gsm8k(text.rsplit("####", 1)[-1], finished=True) if text else None
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
    if _huge_power(answer) or _huge_power(gold):  # sympy could hang where no timer can stop it
        return _latex_key(answer) == _latex_key(gold)
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
    thinking) grades False. The gold field is read as a final answer: the text after its last "####" for
    gsm8k, its last \\boxed{} (else all of it) for math.
    dataset "gsm8k": the numbers found in both are equal: exactly for integers and decimals
        ("18.0" == "18", "1,000" == "1000", "-3" != "3"), within 1e-6 relative when either side is a fraction
        ("3/4" == "0.75", "1/3" == "0.3333333"). `gold` may be the bare answer or a full GSM8K solution
        ending in "#### <answer>".
    dataset "math": math-verify `verify(gold, prediction)` on the prediction's answer against `gold` (bare
        LaTeX, or a solution whose last \\boxed{} holds it). LaTeX equivalence: \\frac12 == 0.5, \\dfrac,
        intervals, sets, \\text{} units (see "Known limitations"). With a huge power on either side: equal
        normalised strings instead (module docstring, "Time limits").
    The whole call is bounded by `timeout_s` seconds in any thread; a timeout returns False.
    Raises UserError for an unknown dataset, a gold answer without an answer in it, or a timeout_s that is
    not a finite number > 0.
    """
    name = _check_dataset(dataset)
    timeout_s = check_timeout(timeout_s)
    reference = _gold_answer(gold, name)
    if not isinstance(prediction, str):
        return False
    grade = _grade_gsm8k if name == "gsm8k" else _grade_math
    return run_with_timeout(lambda: grade(prediction, reference), timeout_s, False, thread_name="grade_answer")
