"""The tuned-lens evaluation report: per layer, the tuned lens's and the logit lens's KL on the test split.

`tuned_lens_report` runs `trainer.test` of a TunedLensModule (definitions in lightning_modules/tuned_lens.py):
for every cached test row (each prompt, reasoning and control, at the cached position) and every cached layer l,
    kl_tuned = KL(p_final || q_l),  kl_logit = KL(p_final || logit lens at l),
p_final the model's own next-token distribution (the last layer read through the final norm and unembedding),
averaged over the rows (float64 sums of float32 per-row KLs, rounded to float32). `write_tuned_lens_report`
writes tuned_lens_results.json and visualizations/tuned_lens_kl.png and prints a rich table. JSON shape:

    {"checkpoint": str, "backbone": str, "positions": str, "split": "test", "n_test": int (rows averaged over),
     "kl_tuned_mean": float, "kl_logit_mean": float,   means of the per-layer values over the lensed layers,
                                                       i.e. every cached layer but the last (the model itself,
                                                       KL 0 by construction)
     "lensed_layers": [int],
     "layers": [{"layer": int, "kl_tuned": float, "kl_logit": float}, ...],   every cached layer, the last too
     "top_tokens": {"k": int, "examples": [{"row_index", "kind", "problem_id", "prompt_tail": str (the last
                    TAIL_CHARS characters of the prompt up to the token read: the lenses predict the token after
                    it; with positions mean, of the whole prompt), "tuned": {...}, "logit": {"ids", "tokens", "probs":
                    [[k values] per cached layer]}}]}}   the first TOP_TOKEN_ROWS test rows: each lens's k most
                    probable next tokens per layer (`interp.lens.lens_top_k`, softmax over the whole vocabulary);
                    at the last layer both are the model's own output

KL in nats.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from interp.lens import lens_top_k
from interp.plots import plot_layer_curves
from lightning_modules.protocol import write_report_files

RESULTS_FILE = "tuned_lens_results.json"
FIGURE_FILE = "tuned_lens_kl.png"
TOP_TOKEN_ROWS, TOP_K, TAIL_CHARS = 4, 5, 120


def tuned_lens_report(trainer: L.Trainer, module, datamodule, checkpoint: str) -> dict:
    """Test-split KLs of `module` (a TunedLensModule) per cached layer, and their means over the lensed layers."""
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = module.last_metrics["test"]  # name -> [n_layers] float32
    kl_tuned, kl_logit = metrics["kl_tuned"].double(), metrics["kl_logit"].double()
    lensed = module.trained_slots  # every slot but the last layer's
    spec = module.backbone_spec or datamodule.backbone
    return {
        "checkpoint": str(checkpoint),
        "backbone": spec.name_or_path,
        "positions": str(datamodule.positions),
        "split": "test",
        "n_test": len(datamodule.datasets["test"]),
        "kl_tuned_mean": float(kl_tuned[lensed].mean()),
        "kl_logit_mean": float(kl_logit[lensed].mean()),
        "lensed_layers": [module.layers[slot] for slot in lensed],
        "layers": [{"layer": layer, "kl_tuned": float(kl_tuned[slot]), "kl_logit": float(kl_logit[slot])}
                   for slot, layer in enumerate(module.layers)],  # fmt: skip
        "top_tokens": top_tokens(module, datamodule),
    }


def top_tokens(module, datamodule) -> dict:
    """Both lenses' TOP_K next tokens per cached layer on the first TOP_TOKEN_ROWS test rows (module docstring)."""
    test = datamodule.datasets["test"]
    n = min(TOP_TOKEN_ROWS, len(test))
    x = torch.stack([test[i]["x"] for i in range(n)])  # [n, n_layers, d_model]
    lens = module.lens
    readouts = {"tuned": lens.layer_logits, "logit": lambda resid, slot: lens.readout(resid)}
    tokenizer = datamodule.prompts.tokenizer  # set up with the rows
    tops = {name: lens_top_k(readout, x, TOP_K, tokenizer) for name, readout in readouts.items()}
    examples = []
    for i, row_index in enumerate(datamodule.row_index["test"][:n].tolist()):
        row = datamodule.prompts.rows[row_index]
        example = {"row_index": row_index, "kind": row.kind, "problem_id": row.problem_id,
                   "prompt_tail": _text_read(datamodule, tokenizer, row.prompt)[-TAIL_CHARS:]}  # fmt: skip
        for name, top in tops.items():
            example[name] = {"ids": top.ids[i].tolist(), "tokens": top.tokens[i], "probs": top.probs[i].tolist()}
        examples.append(example)
    return {"k": TOP_K, "examples": examples}


def _text_read(datamodule, tokenizer, prompt: str) -> str:
    """The prompt up to and including the token whose residual the batches hold: the cached positions are the
    prompt's last n_positions tokens (last, last_<k>, post_instruction) and batch_position picks one; with
    positions "mean" (every token averaged) the whole prompt."""
    if datamodule.positions.kind == "mean":
        return prompt
    n_positions = int(datamodule.cache.manifest["n_positions"])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: len(ids) - n_positions + datamodule.batch_position % n_positions + 1])


def write_tuned_lens_report(report: dict, output_dir: Path) -> dict[str, Path]:
    """Write tuned_lens_results.json and visualizations/tuned_lens_kl.png into output_dir, print a table."""
    rows = report["layers"]
    curves = {"tuned lens": [row["kl_tuned"] for row in rows], "logit lens": [row["kl_logit"] for row in rows]}
    fig = plot_layer_curves([row["layer"] for row in rows], curves, ylabel="KL(model || lens), nats",
                            title=f"{report['backbone']}: tuned vs logit lens ({report['split']})")  # fmt: skip
    paths = write_report_files(report, output_dir, RESULTS_FILE, fig, FIGURE_FILE)
    table = Table(title=f"Lens KL per layer (n_{report['split']}={report['n_test']}; means over the lensed "
                  f"layers: tuned {report['kl_tuned_mean']:.4f}, logit {report['kl_logit_mean']:.4f})")  # fmt: skip
    for column in ("layer", "KL tuned", "KL logit"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["layer"]), f"{row['kl_tuned']:.4f}", f"{row['kl_logit']:.4f}")
    Console().print(table)
    return paths
