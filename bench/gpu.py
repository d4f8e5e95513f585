"""The GPU part of `make bench`: extraction on a real-shape 32B backbone, its model FLOP utilization and peak memory.

    bash bench/gpu.sh                        # shape:qwq-32b, bf16, cuda:0; under 8 minutes with the model build
    python bench/gpu.py --backbone shape:r1-distill-qwen-32b --seq 512 --batch 8

The backbone is `load_backbone("shape:qwq-32b", dtype="bfloat16", device_map="cuda")`: QwQ-32B's architecture with
random weights built directly on the GPU (interp/shape_backbone.py), so no download is needed. Timings are medians of
round-robin repeats after a warm-up (bench/timing.py), CUDA-synchronized. Rows:
    extraction    `capture_residuals` (every layer's residual stream at the last token) vs the bare decoder forward:
                  tokens/s of each and their ratio (target >= 0.95)
    mfu           model FLOP utilization of extraction: 2 x parameters x tokens / time / the card's dense bf16 peak
                  (PEAK_BF16 below, by card name; unknown cards print n/a). Target >= 0.5 at 256+ tokens per prompt.
    memory        peak GPU memory allocated during extraction (torch.cuda.max_memory_allocated), and the weights alone
Results: the table on stdout and bench/results_gpu.json. `--smoke` runs the same code on the CPU with a small random
Qwen2 (the test suite's wiring check; it measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import torch  # noqa: E402
from timing import round_robin  # noqa: E402

from interp.activations import capture_residuals  # noqa: E402
from interp.positions import PositionSpec, padded_position_ids  # noqa: E402

# Dense bf16 tensor-core peak (FLOP/s, no sparsity), from the vendors' data sheets, matched against
# torch.cuda.get_device_name() by substring, most specific first (the H100 SXM reports "NVIDIA H100 80GB HBM3").
PEAK_BF16 = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
    "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12, "B200": 2250e12,
}  # fmt: skip


def peak_flops(card: str) -> float | None:
    return next((flops for name, flops in PEAK_BF16.items() if name in card), None)


def smoke_backbone(directory: Path) -> str:
    """The built-in tiny Qwen2 config (hidden 64, 32 layers, the real vocabulary) as a `shape:` directory: the CPU wiring check."""
    from interp.backbone import BUILTIN_BACKBONES, tiny_config

    directory.mkdir(parents=True, exist_ok=True)
    tiny_config(BUILTIN_BACKBONES["tiny"]).save_pretrained(directory)
    return f"shape:{directory}"


def measure(backbone: str, device: str, batch: int, seq: int, repeats: int) -> dict:
    from interp.backbone import load_backbone

    on_gpu = device.startswith("cuda")
    model, _ = load_backbone(backbone, dtype="bfloat16" if on_gpu else "float32", device_map=device)
    parameters = sum(p.numel() for p in model.parameters())
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab - 100, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    pos, last = padded_position_ids(mask), PositionSpec.parse("last")
    layers = list(range(model.config.num_hidden_layers))

    def synced(fn):
        def run():
            fn()
            if on_gpu:
                torch.cuda.synchronize()
        return run

    modes = {
        "bare decoder": synced(lambda: model.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                   use_cache=False)),  # fmt: skip
        "ours": synced(lambda: capture_residuals(model, ids, mask, layers, last)),
    }
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        timed = {name: statistics.median(v) for name, v in round_robin(modes, repeats).items()}
    card = torch.cuda.get_device_name() if on_gpu else "cpu"
    tokens = batch * seq
    peak = peak_flops(card) if on_gpu else None
    return {
        "backbone": backbone, "device": card, "parameters": parameters, "batch": batch, "seq": seq,
        "tokens_per_s": {name: tokens / seconds for name, seconds in timed.items()},
        "extraction_vs_bare": timed["bare decoder"] / timed["ours"],
        "mfu": None if peak is None else 2 * parameters * tokens / timed["ours"] / peak,
        "peak_bf16_flops": peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "weights_gib": weights_bytes / 2**30,
    }


def table(result: dict, smoke: bool) -> str:
    judge = not smoke

    def verdict(ok: bool) -> str:
        return ("ok" if ok else "BELOW TARGET") if judge else "-"

    mfu = result["mfu"]
    lines = [
        f"{result['backbone']} on {result['device']}: {result['parameters']:,} parameters, batch {result['batch']} x "
        f"{result['seq']} tokens",
        f"extraction  ours {result['tokens_per_s']['ours']:,.0f} tok/s, bare decoder "
        f"{result['tokens_per_s']['bare decoder']:,.0f} tok/s: {result['extraction_vs_bare']:.3f}x (target >= 0.95) "
        f"{verdict(result['extraction_vs_bare'] >= 0.95)}",
        "mfu         n/a (no known bf16 peak for this device)" if mfu is None else
        f"mfu         {mfu:.3f} of {result['peak_bf16_flops'] / 1e12:.0f} TFLOP/s (target >= 0.5 at 256+ tokens) "
        f"{verdict(mfu >= 0.5 or result['seq'] < 256)}",
        f"memory      weights {result['weights_gib']:.1f} GiB, peak during extraction "
        + ("n/a (cpu)" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.1f} GiB"),
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="shape:qwq-32b")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(REPO / "bench" / "results_gpu.json"))
    parser.add_argument("--smoke", action="store_true", help="CPU, a small random Qwen2: the wiring check")
    args = parser.parse_args(argv)
    if args.smoke:
        import tempfile

        args.backbone = smoke_backbone(Path(tempfile.mkdtemp()) / "smoke")
        args.device, args.batch, args.seq, args.repeats = "cpu", 2, 16, 2
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "error: no CUDA device is visible: bench/gpu.py needs a GPU (--smoke runs on the CPU)\n")
    result = measure(args.backbone, args.device, args.batch, args.seq, args.repeats)
    print(table(result, args.smoke))
    Path(args.output).write_text(json.dumps({**result, "smoke": args.smoke}, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
