"""Steering-vector training benchmark (not a test): step time and peak memory of training steering vectors through
the frozen bench model, against a plain forward + backward of the same model.

    python bench/steering.py [--repeats 7]

Model: bench/extraction.py's random-weight Qwen2 (hidden 512, 8 layers, the real 152,064-token vocabulary), float32
on the CPU; batch 8 x (96 prompt + 32 completion) tokens, half the rows left padded. The loss is the sft objective
(`interp.metrics.completion_logprobs`, mean NLL of the completion tokens) in every condition:
    plain       every weight trainable: forward + backward (weight gradients), no optimizer step
    vectors     frozen weights, a vector at every layer (`AddTrainableVectors`): forward + backward + AdamW step
    vectors_gc  the same with HF gradient checkpointing (non-reentrant, backbone in train mode)
    lora        frozen weights, a rank-8 peft LoRA adapter on every projection of every layer (the baseline of
                lightning_modules/steering_lora.py): forward + backward + AdamW step
Timings: one process, conditions interleaved round-robin, medians, reported as ratios to `plain` (compare ratios:
these machines are noisy). Peak memory: each condition alone in a fresh subprocess (2 steps), peak RSS growth over
the loaded model (VmHWM after a reset, minus VmRSS before the steps). Target (issue 10): vectors <= 1.1x plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from extraction import BATCH, bench_model  # noqa: E402

from interp.interventions import AddTrainableVectors  # noqa: E402
from interp.metrics import completion_logprobs  # noqa: E402
from interp.steering_objectives import sft_loss  # noqa: E402
from lightning_modules.steering_lora import PROJECTIONS  # noqa: E402

PROMPT, COMPLETION = 96, 32
CONDITIONS = ("plain", "vectors", "vectors_gc", "lora")


def batch(vocab: int = 151000) -> tuple[list[list[int]], list[list[int]]]:
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (PROMPT - (16 if i % 2 else 0),), generator=generator).tolist() for i in range(BATCH)]
    completions = [torch.randint(0, vocab, (COMPLETION,), generator=generator).tolist() for _ in range(BATCH)]
    return prompts, completions


def step_fn(condition: str, model):
    """A closure running one training step of `condition` on `model` (set up for it here)."""
    prompts, completions = batch(min(151000, model.config.vocab_size - 100))
    if condition == "plain":
        model.requires_grad_(True)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            sft_loss(*completion_logprobs(model, prompts, completions, 0)).backward()

        return step
    model.requires_grad_(False)
    if condition == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJECTIONS)), model)
        adapter = [p for name, p in model.named_parameters() if "lora_" in name]
        optimizer = torch.optim.AdamW(adapter, lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            sft_loss(*completion_logprobs(model, prompts, completions, 0)).backward()
            optimizer.step()

        return step
    if condition == "vectors_gc":
        model.activation_checkpointing_enable()
        model.train()
    n_layers = len(model.model.layers)
    vectors = torch.nn.Parameter(torch.zeros(n_layers, model.config.hidden_size))
    optimizer = torch.optim.AdamW([vectors], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with AddTrainableVectors(model, vectors, list(range(n_layers))):
            loss = sft_loss(*completion_logprobs(model, prompts, completions, 0))
        loss.backward()
        optimizer.step()

    return step


def timings(repeats: int) -> dict:
    models = {condition: bench_model() for condition in CONDITIONS}  # one model each: no state leaks between them
    steps = {condition: step_fn(condition, models[condition]) for condition in CONDITIONS}
    for step in steps.values():  # warm-up
        step()
    times = {condition: [] for condition in CONDITIONS}
    for _ in range(repeats):
        for condition, step in steps.items():
            start = time.perf_counter()
            step()
            times[condition].append(time.perf_counter() - start)
    medians = {condition: statistics.median(values) for condition, values in times.items()}
    return {condition: {"median_s": round(medians[condition], 4), "ratio_to_plain": round(medians[condition] /
            medians["plain"], 3)} for condition in CONDITIONS}  # fmt: skip


def peak_rss(condition: str) -> float:
    """Peak RSS growth (GB) of 2 steps of `condition` over the loaded model, in a fresh process (Linux: the peak is
    reset after loading by writing 5 to /proc/self/clear_refs, then read as VmHWM)."""
    code = (f"import sys; sys.argv = ['x']; sys.path[:0] = [{str(REPO / 'bench')!r}, {str(REPO)!r}]\n"
            "from steering import bench_model, step_fn\n"
            "def status(key): return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))\n"
            f"model = bench_model(); step = step_fn({condition!r}, model)\n"
            "open('/proc/self/clear_refs', 'w').write('5'); base = status('VmRSS:')\n"
            "step(); step(); print((status('VmHWM:') - base) / 2**20)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    result = {"threads": torch.get_num_threads(), "batch": [BATCH, PROMPT + COMPLETION], **timings(args.repeats)}
    for condition in CONDITIONS:
        result[condition]["peak_rss_growth_gb"] = peak_rss(condition)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
