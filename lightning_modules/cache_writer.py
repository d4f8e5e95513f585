"""Extraction into the activation cache: `Trainer.predict` of the extractor with a prediction writer.

`extract_activations(trainer, datamodule)` is what train.py / evaluate.py call before fitting or testing:
it reuses a complete cache with the same key, resumes an interrupted one (finished rows are skipped), and
otherwise runs the prompts through the backbone on the trainer's own accelerator/strategy. Under DDP every
rank writes the shards of the rows it computed; rank zero writes the manifest after a barrier.
`ActivationCacheWriter` is a callback, but only as the extractor's output stage: it lives beside the extraction
so that the study modules' reports (protocol.py) extract a missing cache without importing callbacks/.
"""

from __future__ import annotations

import contextlib
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from datamodules.activations import CachedActivationDataModule
from interp.cache import ActivationCache
from lightning_modules.extractor import ActivationExtractor


class ActivationCacheWriter(BasePredictionWriter):
    """Writes each predicted batch as one shard, then the manifest (complete only if every row is there)."""

    def __init__(self, cache: ActivationCache, manifest: dict):
        super().__init__(write_interval="batch")
        self.cache = cache
        self.manifest = manifest

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.cache.write_shard(
            prediction["activations"], prediction["row_index"], prediction["split"], prediction["labels"]
        )

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.cache.finalize(self.manifest)
        trainer.strategy.barrier()


@contextlib.contextmanager
def _random_state_kept():
    """Restore Python's, numpy's and torch's (CPU and CUDA) random states on exit."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)  # fmt: skip
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def extract_activations(trainer: L.Trainer, datamodule: CachedActivationDataModule) -> ActivationCache:
    """Make sure `datamodule.cache` is complete, extracting what is missing with `trainer`."""
    cache = datamodule.cache
    if cache.complete:
        rank_zero_info(f"Reusing activation cache {cache.directory}")
        return cache
    prompts = datamodule.prompts
    prompts.setup("predict")
    prompts.exclude_rows = cache.finished_rows()
    manifest = datamodule.manifest()
    if len(prompts.exclude_rows) == manifest["n_rows"]:  # finished before the manifest was written
        if trainer.is_global_zero:
            cache.finalize(manifest)
        trainer.strategy.barrier()
        return cache
    rank_zero_info(
        f"Extracting activations of {manifest['n_rows'] - len(prompts.exclude_rows)} prompts into {cache.directory}"
    )
    extractor = ActivationExtractor(datamodule.backbone, datamodule.layers, str(datamodule.positions))
    writer = ActivationCacheWriter(cache, manifest)
    # The cache must be complete to be reused, so debugging limits (fast_dev_run) do not apply to extraction.
    saved_limit, trainer.limit_predict_batches = trainer.limit_predict_batches, 1.0
    trainer.callbacks.append(writer)
    try:
        with _random_state_kept():  # a run that extracts first trains exactly like one that reuses the cache
            trainer.predict(extractor, datamodule=prompts, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)
        trainer.limit_predict_batches = saved_limit
    if not cache.complete:
        raise RuntimeError(f"extraction finished but the cache {cache.directory} is incomplete")
    return cache
