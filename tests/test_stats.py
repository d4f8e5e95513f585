import numpy as np
import torch

from interp.stats import RunningMoments


def test_running_moments_match_numpy_for_any_batching():
    x = torch.randn(103, 3, 5, dtype=torch.float32) * 7 + 100
    ref = x.double().numpy()
    for sizes in ([103], [1] * 103, [10, 50, 43], [60, 0, 43]):
        moments = RunningMoments()
        for chunk in torch.split(x, sizes) if 0 not in sizes else (x[:60], x[60:60], x[60:]):
            moments.update(chunk)
        assert moments.count == 103
        np.testing.assert_allclose(moments.mean.numpy(), ref.mean(0), rtol=1e-12)
        np.testing.assert_allclose(moments.var().numpy(), ref.var(0), rtol=1e-10)
        np.testing.assert_allclose(moments.var(unbiased=True).numpy(), ref.var(0, ddof=1), rtol=1e-10)
