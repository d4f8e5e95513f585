"""Tolerances derived from the rounding error of a float32 computation, not from what one CPU gave.

u = 2^-24 is the unit roundoff of float32. A float32 dot product of length d has error at most
gamma_d * sum_i |a_i b_i| with gamma_d = d u / (1 - d u) (Higham, Accuracy and Stability, 3.1), whatever the
kernel's summation order (AVX2, AVX-512, blocked or not); the bounds below are built from that and are
evaluated on float64 reference quantities, so they hold on any x86-64 CPU.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0**-24  # unit roundoff of float32


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float sum or dot product."""
    return n * u / (1 - n * u)


def float32_readout_error(normed: torch.Tensor, unembed: torch.Tensor) -> torch.Tensor:
    """Bound [batch] on max_v |logit error| of a float32 RMSNorm + unembedding, from float64 inputs.

    normed: [batch, d_model] float64 output of the norm; unembed: [vocab, d_model] float64 weight. The logit
    z_v = sum_i n_i W_vi (a d-term dot product) errs by at most gamma_d sum_i |n_i W_vi|; the norm's float32
    mean of d squares, rsqrt and weight product add at most gamma_d + 3u relative error to each n_i.
    """
    d = normed.shape[-1]
    magnitude = normed.abs() @ unembed.abs().T  # [batch, vocab] = sum_i |n_i W_vi|
    return (2 * gamma(d) + 3 * U32) * magnitude.max(-1).values


def float32_sum_error(n: int) -> float:
    """Relative error bound of a float32 sum of n terms as ATen's CPU reductions compute it: a cascade whose
    levels each add at most 16 partial sums in sequence, ceil(log16 n) levels (ATen SumKernel)."""
    return gamma(16 * max(1, math.ceil(math.log(n, 16))))


def float32_kl_error(log_p: torch.Tensor, log_q: torch.Tensor, logit_error: torch.Tensor) -> torch.Tensor:
    """Bound [batch] on |KL_float32(p || q) - KL(p || q)| for KL computed from float32 logits, log_softmax in
    float32 and a float32 sum over the vocabulary, given exact float64 log-probabilities [batch, vocab] and a
    bound `logit_error` [batch] on the error of every logit of either distribution (`float32_readout_error`).

    First-order terms, one per float32 operation:
    - logits: |dKL/dz_q|_1 = |q - p|_1 <= 2 and |dKL/dz_p|_1 = sum_v p_v |log(p_v/q_v) - KL| <= 2A, with
      A = sum_v p_v |log p_v - log q_v|, so (2 + 2A) * logit_error;
    - log_softmax over V logits with range R: z - max (u R), exp (u (R + 1) relative), the V-term sum
      (`float32_sum_error`), log (u ln V), the final subtraction (u (R + ln V)); each log-probability enters
      once, weighted by p (sum 1), for p and for q;
    - the products p_v (log p_v - log q_v) (p = exp of a rounded log p: u (|log p_v| + 2) relative) and
      their V-term sum (`float32_sum_error` relative to sum |terms| = A).
    """
    vocab = log_p.shape[-1]
    terms = log_p.exp() * (log_p - log_q)  # [batch, vocab]
    spread = terms.abs().sum(-1)  # A
    logit_range = torch.maximum(log_p.max(-1).values - log_p.min(-1).values,
                                log_q.max(-1).values - log_q.min(-1).values)  # fmt: skip
    log_softmax = U32 * (3 * logit_range + 2 * math.log(vocab) + 1) + float32_sum_error(vocab)
    products = U32 * (terms.abs() * (log_p.abs() + 2)).sum(-1) + float32_sum_error(vocab) * spread
    return (2 + 2 * spread) * logit_error + 2 * log_softmax + products
