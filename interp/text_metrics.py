"""Degeneration measures of generated text: the "Wait, hold on" loops that late-layer steering can produce."""

from __future__ import annotations

import zlib

from interp.errors import UserError


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
