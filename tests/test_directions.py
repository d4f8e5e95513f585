"""Directions recover planted truth, stream exactly, accumulate in float64, round-trip through files; selection
filters a hand-made table for each documented reason."""

import json
import math

import numpy as np
import pytest
import torch
from tolerances import gamma

from interp.directions import (
    check_directions,
    check_nonzero_norm,
    compute_contrastive_directions,
    load_directions,
    load_extra_tensors,
    pca_directions,
    random_directions,
    save_directions,
    unit_directions,
)
from interp.errors import UserError
from interp.selection import select_direction


def _cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _planted(n_r=300, n_c=200, n_pos=None, n_layers=3, d=32, scale=2.0, seed=0):
    """Reasoning = control distribution shifted by `scale * u[pos, layer]`; returns acts and the unit u."""
    g = torch.Generator().manual_seed(seed)
    item = (n_layers, d) if n_pos is None else (n_pos, n_layers, d)
    u = torch.randn(item, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    base = torch.randn(item, generator=g, dtype=torch.float64) * 5
    control = base + 0.3 * torch.randn((n_c, *item), generator=g, dtype=torch.float64)
    reasoning = base + scale * u + 0.3 * torch.randn((n_r, *item), generator=g, dtype=torch.float64)
    return reasoning.float(), control.float(), u


@pytest.mark.parametrize("n_pos", [None, 4])
def test_contrastive_recovers_planted_direction_and_equals_numpy(n_pos):
    reasoning, control, u = _planted(n_pos=n_pos)
    directions = compute_contrastive_directions(reasoning, control)
    assert directions.dtype == torch.float32 and directions.shape == u.shape
    ref = reasoning.double().numpy().mean(0) - control.double().numpy().mean(0)
    np.testing.assert_allclose(directions.numpy(), ref, rtol=1e-6, atol=1e-6)
    for index in np.ndindex(*u.shape[:-1]):
        assert _cos(directions[index], u[index]) > 0.99
        assert abs(float(directions[index].norm()) - 2.0) < 0.3  # unnormalised: the planted shift


@pytest.mark.parametrize("n_pos", [None, 2])
def test_pca_recovers_planted_direction_and_equals_svd(n_pos):
    g = torch.Generator().manual_seed(1)
    n, n_layers, d = 400, 3, 24
    item = (n_layers, d) if n_pos is None else (n_pos, n_layers, d)
    u = torch.randn(item, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    control = torch.randn((n, *item), generator=g, dtype=torch.float64) * 3
    strength = 1.5 + torch.rand((n, *item[:-1], 1), generator=g, dtype=torch.float64)  # varies per pair, > 0
    reasoning = control + strength * u + 0.1 * torch.randn((n, *item), generator=g, dtype=torch.float64)
    reasoning, control = reasoning.float(), control.float()
    pca = pca_directions(reasoning, control)
    assert pca.dtype == torch.float32 and pca.shape == u.shape
    delta = (reasoning.double() - control.double()).numpy()
    for index in np.ndindex(*u.shape[:-1]):
        rows = delta[(slice(None), *index)]  # [n, d]
        mean = rows.mean(0)
        v = np.linalg.svd(rows, full_matrices=False)[2][0]  # uncentred first principal axis
        np.testing.assert_allclose(pca[index].numpy(), (v @ mean) * v, rtol=1e-5, atol=1e-6)
        assert _cos(pca[index], u[index]) > 0.99
        assert float(pca[index].double() @ torch.from_numpy(mean)) > 0  # sign: along the mean difference


def test_pca_sign_flips_with_the_sides_and_constant_shift_is_exact():
    reasoning, control, u = _planted(n_r=100, n_c=100, d=8)
    pca = pca_directions(reasoning, control)
    torch.testing.assert_close(pca_directions(control, reasoning), -pca, atol=1e-6, rtol=1e-5)
    shift = torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0, 0.0, 0.0, 1.0])
    const = pca_directions(control + shift, control)
    torch.testing.assert_close(const, shift.expand(3, 8), atol=1e-4, rtol=1e-4)  # = the mean difference


def test_pca_is_uncentred():
    """Differences = +-5 along e0 (zero mean) plus a constant 1 along e1: a centred PCA would give e0,
    the documented uncentred one gives the consistent shift e1 (second moment 25 vs 1, mean on e1)."""
    n, d = 100, 4
    delta = torch.zeros(n, 1, d)
    delta[:, 0, 0] = torch.tensor([5.0, -5.0]).repeat(n // 2)
    delta[:, 0, 1] = 1.0
    control = torch.randn(n, 1, d)
    pca = pca_directions(control + delta, control)
    # Top eigenvector of E[dd^T] = diag(25, 1) is e0, whose projection on the mean (0, 1, 0, 0) is 0.
    assert float(pca.norm()) < 1e-4
    delta[:, 0, 0] = torch.tensor([0.5, -0.5]).repeat(n // 2)
    pca = pca_directions(control + delta, control)
    torch.testing.assert_close(pca[0], torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_streaming_equals_in_memory_for_any_batching():
    reasoning, control, _ = _planted(n_r=37, n_c=23, n_pos=2, d=8)
    whole = compute_contrastive_directions(reasoning, control)
    whole_pca = pca_directions(reasoning, control[:23].repeat(2, 1, 1, 1)[:37])
    for sizes_r, sizes_c in (([37], [23]), ([1] * 37, [5, 18]), ([10, 0, 27], [1] * 23)):
        gen_r = (chunk for chunk in torch.split(reasoning, sizes_r))  # single-pass generators
        streamed = compute_contrastive_directions(gen_r, list(torch.split(control, sizes_c)))
        torch.testing.assert_close(streamed, whole, atol=1e-6, rtol=1e-6)
        paired = control[:23].repeat(2, 1, 1, 1)[:37]
        streamed_pca = pca_directions(torch.split(reasoning, sizes_r), torch.split(paired, sizes_r))
        torch.testing.assert_close(streamed_pca, whole_pca, atol=1e-5, rtol=1e-5)


def test_float64_accumulation_where_float32_drifts():
    g = torch.Generator().manual_seed(0)
    n, d = 20000, 4
    reasoning = (1e4 + torch.randn(n, 1, d, generator=g, dtype=torch.float64)).float()
    control = (1e4 - 0.05 + torch.randn(n, 1, d, generator=g, dtype=torch.float64)).float()
    exact = reasoning.double().numpy().mean(0) - control.double().numpy().mean(0)

    def naive_float32_mean(x):
        total = torch.zeros(x.shape[1:])
        for chunk in torch.split(x, 100):
            total = total + chunk.sum(0)
        return total / x.shape[0]

    naive = (naive_float32_mean(reasoning) - naive_float32_mean(control)).numpy()
    ours = compute_contrastive_directions(torch.split(reasoning, 100), torch.split(control, 100)).numpy()
    scale = np.abs(exact).max()
    assert np.abs(naive - exact).max() / scale > 1e-3  # the naive float32 stream visibly drifts ...
    assert np.abs(ours - exact).max() / scale < 1e-6  # ... ours does not


def test_shape_mismatches_are_user_errors():
    a, b = torch.zeros(5, 3, 8), torch.zeros(4, 3, 16)
    with pytest.raises(UserError, match=r"\(3, 8\) and \(3, 16\)"):
        compute_contrastive_directions(a, b)
    with pytest.raises(UserError, match=r"\(3, 8\) and \(3, 7\)"):
        compute_contrastive_directions([torch.zeros(2, 3, 8), torch.zeros(2, 3, 7)], a)
    with pytest.raises(UserError, match=r"\(5, 8\)"):
        compute_contrastive_directions(torch.zeros(5, 8), a)
    with pytest.raises(UserError, match="no control"):
        compute_contrastive_directions(a, [])
    with pytest.raises(UserError, match=r"\(5, 3, 8\) and \(4, 3, 8\)"):
        pca_directions(a, torch.zeros(4, 3, 8))
    with pytest.raises(UserError, match="control side ran out"):
        pca_directions([a, a], [a])
    with pytest.raises(UserError, match="reasoning side ran out"):
        pca_directions([a], [a, a])


def test_random_directions_have_the_norms_of_like():
    like = torch.randn(2, 3, 16) * torch.tensor([1.0, 10.0, 0.1])[None, :, None]
    out = random_directions(like, 50, torch.Generator().manual_seed(0))
    assert out.shape == (50, 2, 3, 16) and out.dtype == like.dtype
    # two float32 norms of 16 terms (the rescaling's and this check's) and the rescaling product: 2 gamma_18
    torch.testing.assert_close(out.norm(dim=-1), like.norm(dim=-1).expand(50, 2, 3), rtol=2 * gamma(18), atol=0)
    torch.testing.assert_close(out, random_directions(like, 50, 0))  # an int seed = a seeded generator
    assert not torch.allclose(out[0], out[1])
    unit = out / out.norm(dim=-1, keepdim=True)
    assert float(unit.mean(0).norm(dim=-1).max()) < 0.5  # isotropic: no preferred direction
    assert abs(_cos(unit[:, 0, 0], like[0, 0].expand(50, 16))) < 0.3


def test_save_load_round_trip(tmp_path):
    directions = torch.randn(2, 4, 16)
    meta = {"model": "tiny", "layers": [0, 3, 5, 7], "positions": "last_2", "selection": [{"layer": 3}]}
    extra = {"pca": torch.randn(2, 4, 16), "null_norms": torch.arange(4.0)}
    path = save_directions(tmp_path, directions.double(), meta, extra=extra)
    assert path == tmp_path / "reasoning_directions.safetensors"
    loaded, loaded_meta = load_directions(tmp_path)
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, directions, atol=0, rtol=0)
    on_disk = json.loads((tmp_path / "reasoning_directions.json").read_text())
    assert on_disk == loaded_meta
    assert {k: loaded_meta[k] for k in meta} == meta
    assert loaded_meta["d_model"] == 16 and loaded_meta["shape"] == [2, 4, 16]
    np.testing.assert_allclose(loaded_meta["norms"], directions.double().norm(dim=-1).numpy(), rtol=1e-6)
    extras = load_extra_tensors(path)
    assert set(extras) == {"pca", "null_norms"}
    torch.testing.assert_close(extras["null_norms"], extra["null_norms"])
    single = save_directions(tmp_path / "other" / "dirs.safetensors", directions[0], {"model": "x"})
    assert single.with_suffix(".json").is_file()
    torch.testing.assert_close(load_directions(single)[0], directions[0])


def test_load_rejects_missing_and_mismatched_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_directions(tmp_path)
    save_directions(tmp_path / "a", torch.randn(3, 8), {"model": "tiny", "layers": [0, 1, 2]})
    save_directions(tmp_path / "b", torch.randn(3, 8), {"model": "tiny", "layers": [1, 2, 3]})
    (tmp_path / "a" / "reasoning_directions.json").write_text((tmp_path / "b" / "reasoning_directions.json").read_text())
    with pytest.raises(UserError, match=r"layers is \[1, 2, 3\] in the JSON but \[0, 1, 2\]"):
        load_directions(tmp_path / "a")
    (tmp_path / "b" / "reasoning_directions.json").unlink()
    with pytest.raises(UserError, match="reasoning_directions.json"):
        load_directions(tmp_path / "b")
    with pytest.raises(UserError, match="metadata lists 2 layers but directions have 3"):
        save_directions(tmp_path / "c", torch.randn(3, 8), {"layers": [0, 1]})
    with pytest.raises(UserError, match="d_model=4"):
        save_directions(tmp_path / "c", torch.randn(3, 8), {"d_model": 4})


def test_check_directions_names_the_mismatch():
    check_directions(torch.zeros(32, 64), n_layers=32, d_model=64)
    check_directions(torch.zeros(5, 2, 64), n_layers=32, d_model=64, layers=[3, 31])
    with pytest.raises(UserError, match="d_model 48 but the model has d_model 64"):
        check_directions(torch.zeros(32, 48), n_layers=32, d_model=64)
    with pytest.raises(UserError, match="cover 30 layers but the model's 32 layers"):
        check_directions(torch.zeros(30, 64), n_layers=32, d_model=64)
    with pytest.raises(UserError, match=r"\[40\] out of range"):
        check_directions(torch.zeros(2, 64), n_layers=32, d_model=64, layers=[3, 40])


def test_zero_norm_check_and_unit_directions():
    directions = torch.randn(3, 5, 8)
    torch.testing.assert_close(unit_directions(directions).norm(dim=-1), torch.ones(3, 5))
    directions[1, 2] = 0.0
    with pytest.raises(UserError, match=r"^zero-norm direction at layer 12 \(position 1\)$"):
        check_nonzero_norm(directions, layers=[10, 11, 12, 13, 14])
    with pytest.raises(UserError, match="zero-norm direction at layer 2"):
        unit_directions(directions[1])
    directions[1, 2, 0] = math.nan
    with pytest.raises(UserError, match="non-finite direction at layer 2"):
        check_nonzero_norm(directions)


def _row(layer, ablation=0.5, induction=0.1, kl=0.01, position=-1):
    return {"position": position, "layer": layer, "ablation_score": ablation, "induction_score": induction, "kl": kl}


def test_select_direction_filters_each_reason_and_picks_the_most_harmful_ablation():
    table = [
        _row(2, ablation=0.3),
        _row(5, ablation=float("nan")),  # NaN score
        _row(26, ablation=9.0),  # 26 >= 0.8 * 32 = 25.6
        _row(7, ablation=5.0, kl=0.2),  # KL too large
        _row(8, ablation=4.0, induction=-0.01),  # adding does not induce reasoning
        _row(9, ablation=0.9, position=-2),  # the winner: the largest NLL increase among survivors
        _row(25, ablation=0.9),  # tie: first in table order wins; 25 < 25.6 passes
        _row(3, ablation=-1.0, induction=-1.0, kl=1.0),  # several reasons at once
    ]
    best, annotated = select_direction(table, n_layers=32)
    assert best == {**table[5], "filtered": None, "selected": True}
    assert [row["filtered"] is None for row in annotated] == [True, False, False, False, False, True, True, False]
    assert annotated[1]["filtered"] == "nan ablation_score"
    assert annotated[2]["filtered"] == "layer 26 >= 25.6"
    assert annotated[3]["filtered"] == "kl 0.2 > 0.1"
    assert annotated[4]["filtered"] == "induction_score -0.01 < 0"
    assert annotated[7]["filtered"] == "kl 1 > 0.1; induction_score -1 < 0"
    assert [row["selected"] for row in annotated] == [False] * 5 + [True, False, False]
    assert "filtered" not in table[0]  # the input table is not modified


def test_select_direction_thresholds_are_arguments():
    table = [_row(2, ablation=0.3), _row(7, ablation=5.0, kl=0.2), _row(30, ablation=9.0)]
    assert select_direction(table, n_layers=32, kl_threshold=0.5)[0]["layer"] == 7
    assert select_direction(table, n_layers=32, kl_threshold=0.5, max_layer_fraction=1.0)[0]["layer"] == 30
    best, annotated = select_direction(table, n_layers=4)  # every layer >= 3.2 ... except layer 2
    assert best["layer"] == 2
    best, annotated = select_direction([_row(7, kl=0.2)], n_layers=32)
    assert best is None and annotated[0]["filtered"] == "kl 0.2 > 0.1"
    table = [_row(2, ablation=3.0, induction=0.05), _row(3, ablation=5.0, induction=-0.5), _row(4, induction=0.2)]
    assert select_direction(table, n_layers=32)[0]["layer"] == 2  # default: induction_score >= 0
    assert select_direction(table, n_layers=32, min_induction_score=None)[0]["layer"] == 3  # filter off
    best, annotated = select_direction(table, n_layers=32, min_induction_score=0.1)
    assert best["layer"] == 4 and annotated[0]["filtered"] == "induction_score 0.05 < 0.1"
    with pytest.raises(UserError, match="lacks kl"):
        select_direction([{"position": -1, "layer": 1, "ablation_score": 0, "induction_score": 0}], n_layers=4)
