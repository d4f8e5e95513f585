"""Streaming statistics in float64 (means, variances) so any number of prompts fits in constant memory."""

from __future__ import annotations

import torch


class RunningMoments:
    """Mean and variance over the first axis of a stream of batches, accumulated in float64.

    `update(x)` takes [batch, *shape]; `mean` and `var` are [*shape] float64. Merging uses the parallel
    (Chan et al.) update, so the result does not depend on how the stream was split into batches.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> RunningMoments:
        x = x.detach().to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return self
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        if self._mean is None:
            self.count, self._mean, self._m2 = n, batch_mean, batch_m2
            return self
        total = self.count + n
        delta = batch_mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total
        return self

    @property
    def mean(self) -> torch.Tensor:
        if self._mean is None:
            raise ValueError("RunningMoments has seen no data")
        return self._mean

    def var(self, unbiased: bool = False) -> torch.Tensor:
        """Population variance (unbiased=False, as sklearn's StandardScaler) or sample variance."""
        if self._m2 is None:
            raise ValueError("RunningMoments has seen no data")
        return self._m2 / (self.count - 1 if unbiased else self.count)
