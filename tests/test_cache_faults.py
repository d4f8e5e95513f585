"""Faults during and after extraction, with real kills: an extraction SIGKILLed at seeded points resumes to a cache
byte-identical to an uninterrupted one, no partial shard is ever read as finished, and a truncated or corrupted
shard of a finished cache is named, removed and extracted again."""

import json
import os
import signal
import subprocess
import sys

import lightning as L
import pytest
from pipeline_utils import REPO, build_datamodule

from lightning_modules.cache_writer import extract_activations

# Extraction of build_datamodule(limit=4): 16 rows in 4 shards of 4. Run in a child that SIGKILLs itself at one
# point: "after:K" once shard K is renamed into place, "during:K" while shard K is half written to its temp file.
_KILLED_EXTRACTION = """
import os, signal, sys
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
import safetensors.torch
from interp import cache as cache_module
from pipeline_utils import build_datamodule
import lightning as L
from lightning_modules.cache_writer import extract_activations

when, k = sys.argv[2].split(":")
k, written = int(k), []
save_file = cache_module.save_file

def save_then_maybe_die(tensors, path, *args, **kwargs):
    if when == "during" and len(written) + 1 == k:
        with open(path, "wb") as f:
            f.write(b"half a shard")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save_file(tensors, path, *args, **kwargs)
    written.append(path)

original_write = cache_module.ActivationCache.write_shard

def write_then_maybe_die(self, *args, **kwargs):
    path = original_write(self, *args, **kwargs)
    if when == "after" and len(written) == k:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

cache_module.save_file = save_then_maybe_die
cache_module.ActivationCache.write_shard = write_then_maybe_die
trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
extract_activations(trainer, build_datamodule(sys.argv[1], limit=4))
"""


def _trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def _files(cache) -> dict[str, bytes]:
    """Every file of a cache, by name relative to it (hidden temporaries included)."""
    return {str(path.relative_to(cache.directory)): path.read_bytes()
            for path in sorted(cache.directory.rglob("*")) if path.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted extraction of the same rows."""
    dm = build_datamodule(tmp_path_factory.mktemp("reference"), limit=4)
    return _files(extract_activations(_trainer(), dm))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["after:1", "during:2", "after:3"])
def test_a_killed_extraction_resumes_to_the_same_bytes(kill_at, tmp_path, reference):
    result = subprocess.run([sys.executable, "-c", _KILLED_EXTRACTION, str(tmp_path), kill_at, str(REPO)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    dm = build_datamodule(tmp_path, limit=4)
    finished = {p.name for p in dm.cache.shards()}
    assert len(finished) == int(kill_at[-1]) - kill_at.startswith("during")  # only whole shards took their name
    assert not dm.cache.complete and dm.cache.manifest is None

    cache = extract_activations(_trainer(), dm)
    files = _files(cache)
    assert files == reference  # the killed writer's temporary is gone too  # shards and manifest (with the shards' sha256) byte for byte


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete"])
def test_a_damaged_shard_is_named_removed_and_extracted_again(damage, tmp_path, reference):
    dm = build_datamodule(tmp_path, limit=4)
    cache = extract_activations(_trainer(), dm)
    victim = cache.shards()[1]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        victim.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])  # inside the activations
    else:
        victim.unlink()
    with pytest.warns(UserWarning, match=f"{victim.name}.*removed it, its rows are extracted again"):
        again = extract_activations(_trainer(), build_datamodule(tmp_path, limit=4))
    assert _files(again) == reference


def test_the_manifest_records_each_shards_size_and_sha256(tmp_path):
    import hashlib

    cache = extract_activations(_trainer(), build_datamodule(tmp_path, limit=4))
    recorded = json.loads((cache.directory / "manifest.json").read_text())["shards"]
    assert recorded == {p.name: {"bytes": os.path.getsize(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                        for p in cache.shards()}  # fmt: skip
    assert cache.damaged_shards() == {}


def test_a_full_disk_stops_with_one_line_and_the_rerun_completes(tmp_path, monkeypatch, reference):
    """The third shard write fails with ENOSPC (what a full disk raises): one clear UserError naming the file; the two
    finished shards stay, nothing half-written is left, and a rerun with space completes the same cache."""
    import errno

    from interp import cache as cache_module
    from interp.errors import UserError

    calls, save_file = [], cache_module.save_file

    def fills_the_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "save_file", fills_the_disk)
    with pytest.raises(UserError, match=r"no space left on the device while writing .*rows-\d+\.safetensors"):
        extract_activations(_trainer(), build_datamodule(tmp_path, limit=4))
    dm = build_datamodule(tmp_path, limit=4)
    assert len(dm.cache.shards()) == 2 and not list(dm.cache.shard_dir.glob(".*"))
    monkeypatch.undo()
    assert _files(extract_activations(_trainer(), dm)) == reference
