"""The activation cache: content equals direct capture, reuse by key, resume, DDP == single process."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from pipeline_utils import REPO, build_datamodule

from interp.activations import collect_activations
from lightning_modules.cache_writer import extract_activations


def _trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def _contents(cache):
    """Everything in a cache, in row order: metadata columns and activations."""
    meta = cache.metadata()
    acts = torch.cat([shard["activations"] for shard in cache.iter_shards()])
    rows = torch.cat([shard["row_index"] for shard in cache.iter_shards()])
    acts = acts[rows.argsort()]
    return {k: v for k, v in meta.items() if not k.startswith("shard")}, acts


def test_cache_holds_what_collect_activations_returns(tmp_path, tiny):
    dm = build_datamodule(tmp_path, layers=[0, 7, 31])
    cache = extract_activations(_trainer(), dm)
    assert cache.complete
    manifest = cache.manifest
    assert manifest["n_rows"] == len(dm.prompts.rows) == 40 and manifest["layers"] == [0, 7, 31]
    meta, acts = _contents(cache)
    assert torch.equal(meta["row_index"], torch.arange(40))
    assert acts.shape == (40, 2, 3, 64)
    model, tokenizer = tiny
    expected = collect_activations(model, tokenizer, [r.prompt for r in dm.prompts.rows], layers=[0, 7, 31],
                                   positions="last_2")  # fmt: skip
    torch.testing.assert_close(acts, expected, atol=1e-5, rtol=1e-5)
    kinds = torch.tensor([r.kind == "reasoning" for r in dm.prompts.rows]).long()
    assert torch.equal(meta["label.reasoning"], kinds)


def test_same_key_is_reused_and_interrupted_runs_resume(tmp_path, monkeypatch):
    dm = build_datamodule(tmp_path)
    cache = extract_activations(_trainer(), dm)
    meta, acts = _contents(cache)

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
    meta2, acts2 = _contents(resumed.cache)
    assert all(torch.equal(meta[k], meta2[k]) for k in meta)
    torch.testing.assert_close(acts2, acts, atol=0, rtol=0)


def test_key_changes_with_what_determines_content(tmp_path):
    base = build_datamodule(tmp_path).cache.directory.name
    assert build_datamodule(tmp_path, layers=[1, 2]).cache.directory.name != base
    assert build_datamodule(tmp_path, positions="mean").cache.directory.name != base
    assert build_datamodule(tmp_path, limit=11).cache.directory.name != base


@pytest.mark.slow
def test_ddp_cache_equals_single_process_cache(tmp_path):
    single = build_datamodule(tmp_path / "single")
    _, acts_single = _contents(extract_activations(_trainer(), single))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    subprocess.run([sys.executable, str(REPO / "tests" / "ddp_extract.py"), str(tmp_path / "ddp"), "2"],
                   check=True, cwd=tmp_path, env=env, timeout=600)  # fmt: skip
    ddp = build_datamodule(tmp_path / "ddp")
    assert ddp.cache.complete
    ranks_wrote = {Path(p).name for p in ddp.cache.shards()}
    assert len(ranks_wrote) == len(single.cache.shards()) or len(ranks_wrote) > 1
    meta_ddp, acts_ddp = _contents(ddp.cache)
    meta_single, _ = _contents(single.cache)
    assert all(torch.equal(meta_single[k], meta_ddp[k]) for k in meta_single)
    torch.testing.assert_close(acts_ddp, acts_single, atol=1e-5, rtol=1e-5)


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
