"""The activation cache: content equals direct capture, reuse by key, resume. DDP == single process: the one DDP
run in test_direction_run.py checks the cache and the class means."""

import shutil

import lightning as L
import pytest
import torch
from pipeline_utils import build_datamodule, cache_contents

from interp.activations import collect_activations
from interp.errors import UserError
from lightning_modules.cache_writer import extract_activations, fast_dev_rows


def _trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def test_cache_holds_what_collect_activations_returns(tmp_path, tiny):
    dm = build_datamodule(tmp_path, layers=[0, 7, 31])
    cache = extract_activations(_trainer(), dm)
    assert cache.complete
    manifest = cache.manifest
    assert manifest["n_rows"] == len(dm.prompts.rows) == 40 and manifest["layers"] == [0, 7, 31]
    meta, acts = cache_contents(cache)
    assert torch.equal(meta["row_index"], torch.arange(40))
    assert acts.shape == (40, 2, 3, 64)
    model, tokenizer = tiny
    expected = collect_activations(model, tokenizer, [r.prompt for r in dm.prompts.rows], layers=[0, 7, 31],
                                   positions="last_2")  # fmt: skip
    torch.testing.assert_close(acts, expected, atol=1e-5, rtol=1e-5)
    kinds = torch.tensor([r.kind == "reasoning" for r in dm.prompts.rows]).long()
    assert torch.equal(meta["label.reasoning"], kinds)


@pytest.fixture(scope="module")
def default_cache(shared_cache_dir):
    """The complete cache of build_datamodule's defaults (10 + 10 problems, every layer, last_2), shared."""
    return extract_activations(_trainer(), build_datamodule(shared_cache_dir))


def test_same_key_is_reused_and_interrupted_runs_resume(tmp_path, monkeypatch, default_cache):
    dm = build_datamodule(tmp_path)
    shutil.copytree(default_cache.directory, dm.cache.directory)  # a private copy: this test deletes shards
    cache = extract_activations(_trainer(), dm)
    meta, acts = cache_contents(cache)

    again = build_datamodule(tmp_path)
    assert again.cache.directory == cache.directory
    monkeypatch.setattr(L.Trainer, "predict", lambda *a, **k: pytest.fail("a complete cache must be reused"))
    extract_activations(_trainer(), again)
    monkeypatch.undo()

    # Simulate an interruption: the manifest and half of the shards are gone.
    shards = cache.shards()
    (cache.directory / "manifest.json").unlink()
    for shard in shards[::2]:
        shard.unlink()
    seen = []
    resumed = build_datamodule(tmp_path)
    original_predict = L.Trainer.predict

    def spy(trainer, model, datamodule=None, **kwargs):
        seen.extend(r for r in range(len(datamodule.rows)) if r not in datamodule.exclude_rows)
        return original_predict(trainer, model, datamodule=datamodule, **kwargs)

    monkeypatch.setattr(L.Trainer, "predict", spy)
    extract_activations(_trainer(), resumed)
    assert 0 < len(seen) < 40  # only the rows of the deleted shards were computed again
    meta2, acts2 = cache_contents(resumed.cache)
    assert all(torch.equal(meta[k], meta2[k]) for k in meta)
    torch.testing.assert_close(acts2, acts, atol=0, rtol=0)


def test_fast_dev_run_extracts_a_few_problems_and_a_real_run_completes_the_cache(tmp_path, default_cache):
    dm = build_datamodule(tmp_path / "dev")
    cache = extract_activations(L.Trainer(accelerator="cpu", fast_dev_run=True, logger=False,
                                          enable_progress_bar=False, enable_model_summary=False), dm)  # fmt: skip
    rows = dm.prompts.rows
    wanted = fast_dev_rows(rows)
    assert cache.finished_rows() == wanted and not cache.complete and cache.manifest is not None
    assert {rows[i].split for i in wanted} == {"train", "val", "test"} and len(wanted) == 12 < len(rows)
    with pytest.raises(UserError, match="incomplete"):  # outside a fast_dev_run the partial cache is unusable
        build_datamodule(tmp_path / "dev").setup()

    resumed = build_datamodule(tmp_path / "dev")
    assert extract_activations(_trainer(), resumed).complete
    assert resumed.cache.directory.name == default_cache.directory.name
    meta, acts = cache_contents(resumed.cache)
    meta_fresh, acts_fresh = cache_contents(default_cache)
    assert all(torch.equal(meta[k], meta_fresh[k]) for k in meta_fresh)
    torch.testing.assert_close(acts, acts_fresh, atol=1e-5, rtol=1e-5)  # other batches: other padding


def test_key_changes_with_what_determines_content(tmp_path):
    base = build_datamodule(tmp_path).cache.directory.name
    assert build_datamodule(tmp_path, layers=[1, 2]).cache.directory.name != base
    assert build_datamodule(tmp_path, positions="mean").cache.directory.name != base
    assert build_datamodule(tmp_path, limit=11).cache.directory.name != base


def test_extraction_leaves_the_random_state_as_it_found_it(tmp_path):
    """Training after an extraction in the same process shuffles exactly like training on a reused cache."""
    import random

    import lightning as L
    import numpy as np
    from pipeline_utils import build_datamodule

    from lightning_modules.cache_writer import extract_activations

    dm = build_datamodule(tmp_path, limit=2, positions="last", batch_size=4)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    extract_activations(L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                  enable_model_summary=False), dm)  # fmt: skip
    assert dm.cache.complete
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_a_bfloat16_cache_is_the_float32_cache_rounded_at_half_the_size(tmp_path, default_cache):
    """data.cache_dtype bfloat16: its own cache key, every stored value exactly the float32 cache's rounded to
    bfloat16, ~half the bytes, float32 batches, and per-layer probe accuracies within one held-out row of the
    float32 cache's."""
    from lightning_modules.probes import train_layer_probes

    dm = build_datamodule(tmp_path, cache_dtype="bfloat16")
    cache = extract_activations(_trainer(), dm)
    assert cache.complete and cache.manifest["dtype"] == "bfloat16"
    assert cache.directory.name != default_cache.directory.name
    meta, acts16 = cache_contents(cache)
    _, acts32 = cache_contents(default_cache)
    assert acts16.dtype == torch.bfloat16 and torch.equal(acts16, acts32.to(torch.bfloat16))
    size = lambda c: sum(path.stat().st_size for path in c.shards())  # noqa: E731
    assert 0.45 < size(cache) / size(default_cache) < 0.55
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["x"].dtype == torch.float32
    layers, labels, problems = [0, 15, 31], meta["label.reasoning"], meta["label.problem"]
    accuracy = {name: train_layer_probes(acts[:, -1, layers].float(), labels, 2, groups=problems, max_epochs=30)
                for name, acts in (("float32", acts32), ("bfloat16", acts16))}  # fmt: skip
    n_val = round(0.2 * len(problems.unique())) * 2  # two rows per held-out problem
    assert (accuracy["float32"] - accuracy["bfloat16"]).abs().max() <= 1 / n_val + 1e-12, accuracy


def test_float16_overflow_and_unknown_dtypes_are_refused(tmp_path):
    from interp.cache import ActivationCache

    big = torch.full((1, 1, 1, 4), 1e5)
    with pytest.raises(UserError, match="overflow float16: cache them as bfloat16"):
        ActivationCache(tmp_path).write_shard(big, torch.tensor([0]), torch.tensor([0]), {}, dtype="float16")
    with pytest.raises(UserError, match="data.cache_dtype 'int8' is not one of"):
        build_datamodule(tmp_path, cache_dtype="int8")
