"""Extraction benchmark (not a test): throughput of hooked capture vs plain forwards, and memory flatness.

    python bench/extraction.py [--repeats 7] [--skip-rss]

Model: random-weight Qwen2 (hidden 512, 8 layers, intermediate 1408, the real 152,064-token vocabulary),
batch 8 x 128 tokens, float32 on the CPU. All timings run in this one process, interleaved round-robin, and
are reported as medians and as ratios to the bare decoder forward (`model.model`, no unembedding): compare
ratios, not absolute times (these machines are noisy).

Memory: peak RSS of the real extraction pipeline (Trainer.predict + ActivationCacheWriter) over 200 and
2,000 prompts, each in a fresh subprocess, with positions last_32 so that 2,000 prompts hold ~1 GB of
activations: if anything kept them in RAM the two peaks would differ by about that much.
Targets: all layers >= 0.95x bare decoder; first half >= 1.8x; peak RSS (2,000) within 10% of (200).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from timing import round_robin  # noqa: E402

from interp.activations import capture_residuals  # noqa: E402
from interp.positions import PositionSpec, padded_position_ids  # noqa: E402

BATCH, SEQ = 8, 128


def bench_model(hidden: int = 512, layers: int = 8, vocab: int = 152064) -> Qwen2ForCausalLM:
    """The benchmarks' random-weight Qwen2 (seed 0); the defaults are the bench model, smaller sizes a smoke run's."""
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    assert model.config.hidden_size == hidden and len(model.model.layers) == layers
    return model


def throughput(repeats: int) -> None:
    model = bench_model()
    ids = torch.randint(0, 151000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[: BATCH // 2, : SEQ // 4] = 0  # half the rows left-padded, as in real batches
    pos = padded_position_ids(mask)
    last = PositionSpec.parse("last")
    n = model.config.num_hidden_layers
    modes = {
        "HF CausalLM forward": lambda: model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False),
        "output_hidden_states=True": lambda: model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, output_hidden_states=True
        ),
        "bare decoder (model.model)": lambda: model.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
        ),
        "ours: all layers": lambda: capture_residuals(model, ids, mask, list(range(n)), last),
        "ours: first half": lambda: capture_residuals(model, ids, mask, list(range(n // 2)), last),
    }
    with torch.inference_mode():
        times = round_robin(modes, repeats)
    base = statistics.median(times["bare decoder (model.model)"])
    print(f"\nThroughput, batch {BATCH} x {SEQ} tokens, {repeats} repeats, torch threads {torch.get_num_threads()}")
    print(f"{'mode':32s} {'median s':>9s} {'tokens/s':>10s} {'x bare decoder':>15s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32s} {median:9.4f} {BATCH * SEQ / median:10.0f} {base / median:15.2f}")


def rss_child(n_prompts: int, model_dir: str, cache_dir: str) -> None:
    """Extract n_prompts through the real pipeline and print this process's peak RSS (MiB) as JSON."""
    import lightning as L

    from datamodules.activations import CachedActivationDataModule
    from datamodules.problems import DatasetSource
    from datamodules.prompts import ReasoningPromptsDataModule
    from interp.backbone import BackboneSpec
    from lightning_modules.cache_writer import extract_activations

    prompts = ReasoningPromptsDataModule(sources=[DatasetSource("gsm8k", limit=n_prompts // 2)], batch_size=8,
                                         val_fraction=0.1, test_fraction=0.1, max_prompt_tokens=None)  # fmt: skip
    datamodule = CachedActivationDataModule(prompts=prompts, backbone=BackboneSpec(model_dir), positions="last_32",
                                            cache_dir=cache_dir)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    start = time.perf_counter()
    cache = extract_activations(trainer, datamodule)
    elapsed = time.perf_counter() - start
    rows = cache.manifest["n_rows"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n_prompts": rows, "peak_rss_mib": peak, "seconds": elapsed}))


def memory() -> None:
    from interp.backbone import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "bench-model"
        bench_model().save_pretrained(model_dir)
        load_tokenizer("tiny").save_pretrained(model_dir)
        results = []
        for n in (200, 2000):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n), str(model_dir), str(Path(tmp) / f"cache{n}")],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\nPeak RSS of the extraction pipeline (positions last_32: 512 KiB of activations per prompt)")
    for r in results:
        print(f"{r['n_prompts']:6d} prompts: peak RSS {r['peak_rss_mib']:8.1f} MiB  ({r['seconds']:.1f} s)")
    print(f"ratio 2000/200: {results[1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-child", nargs=3, metavar=("N", "MODEL_DIR", "CACHE_DIR"))
    args = parser.parse_args()
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], args.rss_child[2])
    else:
        throughput(args.repeats)
        if not args.skip_rss:
            memory()
