"""Intervention benchmark (not a test): generation speed under interventions, cost of patching sweeps.

    python bench/interventions.py [--repeats 5] [--new-tokens 16] [--skip-patching]

Model: the extraction benchmark's random-weight Qwen2 (hidden 512, 8 layers, the real 152,064-token vocabulary,
`bench/extraction.py:bench_model`) with the tiny backbone's tokenizer and QwQ chat template, float32 on the CPU.
EOS is switched off so every generation runs the full --new-tokens; greedy decoding, batch 8.

1. Generation tokens/s with each intervention active vs plain `interp.generation.generate_token_ids`, measured
   round-robin in this one process (ratio = plain time / time with the intervention, target >= 0.9x; from the
   best of the repeats, which other load on a shared machine disturbs least, and from the medians):
   add at one layer (apply_to all, and apply_to generated), directional ablation everywhere (17 hook sites),
   LayerAblator zero and mean at one layer.
2. Exact patching sweep (`patching_sweep`, 8 reasoning/control pairs) over 1, 2, 4 and 8 layers x the 7
   post-instruction tokens: seconds, seconds per (layer, token) cell, and cells per plain last-token forward of
   the same batch (1 forward per cell is the floor).
3. Attribution vs exact sweep on all layers: time ratio and the agreement of the two heatmaps.
Compare ratios, not absolute times (these machines are noisy and shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.extraction import bench_model  # noqa: E402
from bench.timing import round_robin  # noqa: E402
from interp.ablation import LayerAblator  # noqa: E402
from interp.backbone import load_tokenizer  # noqa: E402
from interp.generation import generate_token_ids  # noqa: E402
from interp.interventions import InterventionHandler  # noqa: E402
from interp.patching_stats import target_log_prob  # noqa: E402
from interp.patching_sweep import attribution_patching, patching_sweep  # noqa: E402
from interp.positions import padded_position_ids  # noqa: E402
from interp.prompts import format_chat_prompt, tokenize_prompts  # noqa: E402

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Compute the sum of the first 20 positive odd integers.",
    "If x + y = 10 and x - y = 2, what is x?",
    "A rectangle has a perimeter of 30 and a length of 9. What is its area?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "What is the remainder when 2^10 is divided by 7?",
    "Betty has half of the $100 she needs for a wallet. Her parents give her $15 and her grandparents twice as "
    "much. How much more money does Betty need?",
]
REASONING = "{q} Please reason step by step, and put your final answer within \\boxed{{}}."
CONTROL = "{q} Restate the problem in your own words. Do not solve it."
LAYER = 4


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def with_handler(make, fn):
    def run():
        with make():
            return fn()

    return run


def generation(model, tokenizer, prompts: list[str], new_tokens: int, repeats: int) -> None:
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def plain():
        ids = generate_token_ids(model, tokenizer, prompts, max_new_tokens=new_tokens, do_sample=False)
        assert all(len(row) == new_tokens for row in ids), "a generation stopped early"

    mean_ablator = LayerAblator(model, LAYER, "mean", reference_inputs=prompts, tokenizer=tokenizer)  # means once
    modes = {
        "plain generate": plain,
        "add, 1 layer (all positions)": with_handler(
            lambda: InterventionHandler(model, direction, 2.0, layers=[LAYER]), plain),
        "add, 1 layer (generated only)": with_handler(
            lambda: InterventionHandler(model, direction, 2.0, layers=[LAYER], apply_to="generated"), plain),
        "ablate direction everywhere": with_handler(
            lambda: InterventionHandler(model, direction, mode="ablate"), plain),
        "LayerAblator zero, 1 layer": with_handler(lambda: LayerAblator(model, LAYER, "zero"), plain),
        "LayerAblator mean, 1 layer": with_handler(lambda: mean_ablator, plain),
    }  # fmt: skip
    times = round_robin(modes, repeats)
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    n_tokens = len(prompts) * new_tokens
    print(f"\nGeneration: batch {len(prompts)}, {new_tokens} new tokens (greedy, KV cache), {repeats} repeats, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print("x plain = plain time / time with the intervention: of the best runs (robust to other load on the machine)"
          " and of the medians")  # fmt: skip
    print(f"{'mode':34s} {'best s':>7s} {'tokens/s':>9s} {'x plain':>8s} {'median s':>9s} {'x plain':>8s} {'>=0.9':>6s}")
    for name in modes:
        ratio = best["plain generate"] / best[name]
        flag = "" if name == "plain generate" else ("ok" if ratio >= 0.9 else "LOW")
        print(f"{name:34s} {best[name]:7.3f} {n_tokens / best[name]:9.1f} {ratio:8.2f} {median[name]:9.3f} "
              f"{median['plain generate'] / median[name]:8.2f} {flag:>6s}")  # fmt: skip


def patching(model, tokenizer, repeats: int) -> None:
    reasoning = [format_chat_prompt(tokenizer, REASONING.format(q=q)) for q in QUESTIONS]
    control = [format_chat_prompt(tokenizer, CONTROL.format(q=q)) for q in QUESTIONS]
    metric = target_log_prob(tokenizer("To", add_special_tokens=False)["input_ids"][0])
    batch = tokenize_prompts(tokenizer, control)
    position_ids = padded_position_ids(batch["attention_mask"])

    def forward():
        with torch.no_grad():
            model(**batch, position_ids=position_ids, use_cache=False, logits_to_keep=1)

    one = min(round_robin({"forward": forward}, repeats)["forward"])
    n_layers = model.config.num_hidden_layers
    rows = []
    for k in (1, 2, 4, n_layers):  # each sweep once: they are long enough to time
        seconds, exact = timed(lambda k=k: patching_sweep(model, tokenizer, reasoning, control, metric,
                                                          layers=list(range(k))))  # fmt: skip
        rows.append((f"exact, {k} layer(s)", k * len(exact.post_tokens), seconds))
    seconds, approx = timed(lambda: attribution_patching(model, tokenizer, reasoning, control, metric))
    rows.append(("attribution, all layers", n_layers * len(approx.post_tokens), seconds))
    print(f"\nPatching: {len(QUESTIONS)} pairs (one batch), {len(exact.post_tokens)} post-instruction tokens; "
          f"one plain last-token forward of the control batch (best of {repeats}): {one:.3f} s")  # fmt: skip
    print(f"{'sweep':26s} {'cells':>6s} {'seconds':>8s} {'s / cell':>9s} {'forwards / cell':>16s}")
    for name, cells, seconds in rows:
        print(f"{name:26s} {cells:6d} {seconds:8.3f} {seconds / cells:9.4f} {seconds / cells / one:16.2f}")
    correlation = float(torch.corrcoef(torch.stack([exact.recovered.flatten(), approx.recovered.flatten()]))[0, 1])
    print(f"attribution vs exact, all {n_layers} layers: {rows[-2][2] / rows[-1][2]:.1f}x faster; correlation of the "
          f"heatmaps {correlation:.3f}; max |difference| {float((exact.recovered - approx.recovered).abs().max()):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip-patching", action="store_true")
    args = parser.parse_args()
    model = bench_model()
    model.generation_config.eos_token_id = None  # every generation runs the full length
    tokenizer = load_tokenizer("tiny")
    prompts = [format_chat_prompt(tokenizer, REASONING.format(q=q)) for q in QUESTIONS]
    generation(model, tokenizer, prompts, args.new_tokens, args.repeats)
    if not args.skip_patching:
        patching(model, tokenizer, args.repeats)


if __name__ == "__main__":
    main()
