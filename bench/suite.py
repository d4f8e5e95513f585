"""`make bench`: the project's speed against plain HF forwards and the tools researchers would otherwise use, one table.

    python bench/suite.py [--repeats 5] [--smoke] [--sections extraction,probes,generation,steering,cka,ddp]

Everything runs in this ONE process (DDP extraction: in subprocesses), on the CPU bench model (random-weight Qwen2,
hidden 512, 8 layers, the real 152,064-token vocabulary; `bench/extraction.py:bench_model`), batch 8 x 128 tokens;
timings are interleaved round-robin after a warm-up and reported as medians; every row is a RATIO of two timings
taken side by side, so machine noise mostly cancels. `--smoke` shrinks every size (hidden 64, 2 layers, vocab
4,096, 2 repeats): the wiring check the test suite runs in seconds, not a measurement.
Rows (speedup = reference time / our time, > 1 = ours faster):
    extraction   residual stream at the last token, all layers and the first half: `capture_residuals` vs the bare
                 decoder forward, HF output_hidden_states, and the peers when installed (`pip install -e .[peers]`):
                 TransformerLens (TransformerBridge.run_with_cache with a names filter; fastest form: stop_at_layer)
                 and nnsight (trace + save; fastest form: tracer.stop() after the last saved layer)
    probes       all-layer probe training (`train_layer_probes`, one Lightning fit for every layer) vs scikit-learn
                 LogisticRegression per layer (StandardScaler + lbfgs), same features and group split: speedup, and
                 the largest per-layer accuracy difference (points)
    generation   `generate` with an added direction at one layer vs plain generate (greedy, 16 new tokens)
    steering     steering-vector training step (all layers) vs a plain forward + backward of the model
    cka          all-pairs CKA matrix (`cka_matrix`) vs a per-pair `linear_cka` loop (timed on 64 pairs, scaled)
    ddp          activation extraction through train.py's Trainer.predict path with DDP on 2 CPU processes vs 1:
                 time ratio, and whether the two caches hold the same activations
Results: the table on stdout and bench/results.json ({"machine", "settings", "rows": [...]}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import torch  # noqa: E402
from extraction import bench_model  # noqa: E402
from timing import round_robin  # noqa: E402

from interp.activations import capture_residuals  # noqa: E402
from interp.positions import PositionSpec, padded_position_ids  # noqa: E402

SECTIONS = ("extraction", "probes", "generation", "steering", "cka", "ddp")
SMOKE = {"hidden": 64, "layers": 2, "vocab": 4096, "batch": 2, "seq": 16}
FULL = {"hidden": 512, "layers": 8, "vocab": 152064, "batch": 8, "seq": 128}


def medians(modes: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each callable (`timing.round_robin`)."""
    return {name: statistics.median(values) for name, values in round_robin(modes, repeats).items()}


def row(section: str, case: str, ours: str, reference: str, value: float | None, target: str | None,
        ok: bool | None, note: str = "") -> dict:  # fmt: skip
    return {"section": section, "case": case, "ours": ours, "reference": reference,
            "value": None if value is None else round(value, 3), "target": target, "ok": ok, "note": note}  # fmt: skip


def _inputs(size: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, size["vocab"] - 100, (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[: size["batch"] // 2, : size["seq"] // 4] = 0  # half the rows left-padded, as in real batches
    return ids, mask


def extraction(model, size: dict, repeats: int) -> list[dict]:
    from peers import peer_modes

    ids, mask = _inputs(size)
    pos, last, n = padded_position_ids(mask), PositionSpec.parse("last"), model.config.num_hidden_layers
    ours = {"all layers": list(range(n)), "first half": list(range(max(1, n // 2)))}
    modes = {
        "bare decoder": lambda: model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False),
        "output_hidden_states": lambda: model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                              output_hidden_states=True),
        **{f"ours {case}": (lambda layers=layers: capture_residuals(model, ids, mask, layers, last))
           for case, layers in ours.items()},
    }  # fmt: skip
    peers, notes = peer_modes(model, ids, mask, ours)
    with torch.inference_mode():
        timed = medians({**modes, **peers}, repeats)
    rows = []
    for case in ours:
        mine = timed[f"ours {case}"]
        rows.append(row("extraction", case, "capture_residuals", "bare decoder forward", timed["bare decoder"] / mine,
                        ">= 0.95" if case == "all layers" else ">= 1.8", None))  # fmt: skip
        rows.append(row("extraction", case, "capture_residuals", "HF output_hidden_states",
                        timed["output_hidden_states"] / mine, None, None))  # fmt: skip
        for name in [p for p in peers if p.endswith(f"| {case}")]:
            fastest = "fastest" in name
            speedup = timed[name] / mine
            target = 1.0 if fastest else 4.0
            rows.append(row("extraction", case, "capture_residuals", name.rsplit(" |", 1)[0], speedup, f">= {target:g}",
                            speedup >= target))  # fmt: skip
    for rows_row in rows:
        if rows_row["target"] in (">= 0.95", ">= 1.8"):
            rows_row["ok"] = rows_row["value"] >= float(rows_row["target"][3:])
    rows += [row("extraction", "-", "-", peer, None, None, None, note) for peer, note in notes.items()]
    return rows


def probes(size: dict, repeats: int) -> list[dict]:
    """Synthetic features with a planted class direction at every layer (so accuracies are not all 1 or 0.5)."""
    from datamodules.tensors import group_split
    from lightning_modules.probe_report import sklearn_layer_scores
    from lightning_modules.probes import train_layer_probes

    n_problems, n_layers, d = (40, 2, 16) if size is SMOKE else (1000, 8, 512)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(2 * n_problems) % 2  # a reasoning and a control row per problem
    groups = torch.arange(2 * n_problems) // 2
    direction = torch.randn(n_layers, d, generator=generator)
    acts = torch.randn(2 * n_problems, n_layers, d, generator=generator)
    acts += 0.15 * (2 * labels - 1)[:, None, None].float() * direction  # ~85-95% separable
    is_val = group_split(groups, 0.2, 0)

    def ours():
        return train_layer_probes(acts, labels, 2, groups=groups, max_epochs=30)

    def sklearn():
        return torch.tensor([sklearn_layer_scores(acts[~is_val, layer].double().numpy(), labels[~is_val].numpy(),
                                                  acts[is_val, layer].double().numpy(), labels[is_val].numpy(), 2)
                             ["accuracy"] for layer in range(n_layers)])  # fmt: skip

    results = {}
    timed = medians({"ours": lambda: results.__setitem__("ours", ours()),
                     "sklearn": lambda: results.__setitem__("sklearn", sklearn())}, max(1, repeats // 2))  # fmt: skip
    gap = float((results["ours"].double() - results["sklearn"].double()).abs().max()) * 100
    return [row("probes", f"{n_layers} layers x d {d}, {2 * n_problems} rows", "train_layer_probes",
                "scikit-learn LogisticRegression per layer", timed["sklearn"] / timed["ours"], ">= 5",
                timed["sklearn"] / timed["ours"] >= 5),
            row("probes", "accuracy gap (points, max over layers)", "train_layer_probes",
                "scikit-learn LogisticRegression per layer", gap, "<= 1", gap <= 1)]  # fmt: skip


def generation(model, size: dict, repeats: int) -> list[dict]:
    from interp.interventions import AddDirection

    ids, mask = _inputs(size)
    new = 4 if size is SMOKE else 16
    model.generation_config.eos_token_id = None  # every generation runs the full length
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def plain():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)

    def added():
        with AddDirection(model, direction, 2.0, layers=[model.config.num_hidden_layers // 2]):
            return plain()

    timed = medians({"plain": plain, "added": added}, repeats)
    ratio = timed["plain"] / timed["added"]
    return [row("generation", f"{new} new tokens, greedy", "generate + AddDirection (1 layer)", "plain generate",
                ratio, ">= 0.9", ratio >= 0.9)]  # fmt: skip


def steering(size: dict, repeats: int) -> list[dict]:
    import steering as steering_bench

    models = {condition: _model(size) for condition in ("plain", "vectors")}
    steps = {condition: steering_bench.step_fn(condition, models[condition]) for condition in models}
    timed = medians(steps, repeats)
    ratio = timed["vectors"] / timed["plain"]
    return [row("steering", "training step (time ratio, lower is better)", "AddTrainableVectors, all layers",
                "plain forward + backward", ratio, "<= 1.1", ratio <= 1.1)]  # fmt: skip


def cka(size: dict, repeats: int) -> list[dict]:
    from interp.similarity import cka_matrix, linear_cka

    n, layers, d = (64, 4, 16) if size is SMOKE else (1000, 32, 512)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, layers, d, generator=generator)
    b = 0.5 * a + torch.randn(n, layers, d, generator=generator)
    pairs = [(i, j) for i in range(layers) for j in range(layers)][:: max(1, layers * layers // 64)]
    timed = medians({"batched": lambda: cka_matrix(a, b),
                     "loop": lambda: [linear_cka(a[:, i], b[:, j]) for i, j in pairs]}, repeats)  # fmt: skip
    speedup = timed["loop"] / len(pairs) * layers * layers / timed["batched"]
    return [row("cka", f"{layers}x{layers} layers, n {n}, d {d}", "cka_matrix", "per-pair linear_cka loop",
                speedup, ">= 10", speedup >= 10)]  # fmt: skip


def _model(size: dict):
    return bench_model(hidden=size["hidden"], layers=size["layers"], vocab=size["vocab"])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the wiring in seconds")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--output", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; expected some of {', '.join(SECTIONS)}")
    size, repeats = (SMOKE, 2) if args.smoke else (FULL, args.repeats)
    model = _model(size)
    rows: list[dict] = []
    for section in sections:
        if section == "extraction":
            rows += extraction(model, size, repeats)
        elif section == "probes":
            rows += probes(size, repeats)
        elif section == "generation":
            rows += generation(model, size, repeats)
        elif section == "steering":
            rows += steering(size, repeats)
        elif section == "cka":
            rows += cka(size, repeats)
        else:
            from ddp import ddp_rows

            rows += ddp_rows(smoke=args.smoke)
    if args.smoke:  # tiny sizes measure nothing: no target is judged
        rows = [{**r, "ok": None} for r in rows]
    print_table(rows)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "settings": {"smoke": args.smoke, "repeats": repeats, **size}, "rows": rows}  # fmt: skip
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="make bench (speedup = reference time / our time; ratios measured side by side)")
    for column in ("section", "case", "ours", "reference", "value", "target", "ok"):
        table.add_column(column)
    for r in rows:
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        value = r["note"] if r["value"] is None else f"{r['value']:g}"
        table.add_row(r["section"], r["case"], r["ours"], r["reference"], value, r["target"] or "", ok)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
