"""The steering evaluation report (vectors and the LoRA baseline): a strength sweep on held-out problems.

`steering_report(module, datamodule, options, checkpoint)` reads the run's test split (reasoning and control
prompts of the same problems; `--n_prompts` caps the problems) and measures, through the one intervention
evaluation (`interp.intervention_eval.evaluate_conditions`, so every number means what it means in the directions
report: accuracy, gold_nll, accuracy_change, gold_nll_change, control_kl, control_accuracy, truncation,
degeneration, samples), these conditions:
    baseline            strength 0: the unsteered backbone
    steered@{s}         the module's steering at strength s (`module.steered`: the vectors times s, or every
                        adapter's output times s), for s in --strengths (default STEERING_STRENGTHS) and 1
    null{k}_steered@1   steering vectors only: null vector set k added instead of the learned vectors, at
                        strength 1 and the same layers and tokens (NULL_DEFINITION: placebo contrasts of the
                        train problems' residual stream, rescaled to each learned vector's norm; `--n_random` sets)
vs_null (`interp.intervention_eval.vs_null`, steering vectors with --n_random >= 1): steered@1 against its nulls
prompt by prompt, on accuracy ("steered": > 0 = more answers right than with the nulls) and on the gold NLL
("steered_gold_nll": < 0 = the gold solution more likely than with the nulls); CI over prompts, p_rank over the
m nulls. How to read them (HOW_TO_READ, also in the JSON): the test is p_rank, never below 1 / (m + 1), so
--n_random 19 is needed for 0.05 (the default 1 gives 0.5 or 1). The CI resamples prompts with the vectors held
fixed: it says whether the learned vectors differ from THESE nulls on the prompt population, not that they beat
data-shaped vectors in general (a no-effect simulation, the "learned" vectors themselves a placebo draw, gave a CI
excluding 0 in 30-41% of runs at m = 1-49; p_rank was uniform).
cosine_to_directions (steering vectors and `--directions`): per steered layer, cos(v_l, r_l) between the learned
vector and a directions run's direction at its selected position (same backbone, checked), and the cosines of
the null vectors with r_l (what a data-shaped direction of no learned meaning gives).
`write_steering_report` writes steering_results.json and visualizations/steering_sweep.png. JSON shape:
    {"checkpoint", "module", "backbone", "layers", "trainable_parameters", "split": "test", "n_problems",
     "max_solution_tokens", "n_bootstrap", "strengths": [float, 0 and 1 included], "generation": {...},
     "null": NULL_DEFINITION | null, "n_null": int, "reasoning_rows", "control_rows", "pair_indices",
     "conditions": [the `evaluate_conditions` entries, `interp.intervention_eval` docstring],
     "vs_null": {"steered": {...}, "steered_gold_nll": {...}} | {}, "how_to_read": HOW_TO_READ,
     "cosine_to_directions": {"directions", "position", "layers", "cosine": [per layer],
                              "null_cosine": [[per null] per layer]} | null,
     "not_measured": [str]}      what this report cannot compute for this module
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from interp.activations import collect_activations
from interp.errors import UserError
from interp.intervention_eval import Condition, evaluate_conditions, vs_null
from interp.null_directions import null_directions
from interp.plots import plt
from lightning_modules.protocol import STEERING_STRENGTHS, write_report_files

RESULTS_FILE = "steering_results.json"
FIGURE_FILE = "steering_sweep.png"
HOW_TO_READ = (
    "vs_null: the test is p_rank = (1 + #{nulls at least as extreme}) / (m + 1), never below 1 / (m + 1) (m = "
    "--n_random; 19 reaches 0.05). The CI resamples prompts with the learned and null vectors held fixed: whether "
    "the learned vectors differ from these m nulls on the prompt population, not a test against null vectors in "
    "general (with no effect it excluded 0 in 30-41% of simulated runs)."
)
NULL_PROBLEMS = 256  # train problems the placebo nulls are built from (the first by problem order)
NULL_DEFINITION = (
    "per null k and steered layer l: the balanced within-pair sign-flip placebo (interp.null_directions, "
    "'placebo') of the residual stream blocks.{l}.resid_post at the last prompt token of the first "
    f"{NULL_PROBLEMS} train problems (one sign vector per k, shared by all layers), rescaled to |v_l|"
)


def paired_rows(datamodule, split: str, n_prompts: int | None) -> list:
    """The reasoning rows, then the control rows, of the first n_prompts `split` problems (by problem order) that
    have both; UserError when there are none."""
    by_pair: dict[int, dict[str, object]] = {}
    for row in datamodule.prompts.rows:
        if row.split == split:
            by_pair.setdefault(row.pair_index, {})[row.kind] = row
    pairs = [kinds for _, kinds in sorted(by_pair.items()) if len(kinds) == 2][:n_prompts]
    if not pairs:
        raise UserError(f"the run has no {split} problems with a reasoning and a control prompt")
    return [pair[kind] for kind in ("reasoning", "control") for pair in pairs]


def placebo_vectors(model, tokenizer, rows, layers: list[int], like: torch.Tensor, n: int, seed: int,
                    batch_size: int = 8) -> torch.Tensor:  # fmt: skip
    """[n, len(layers), d_model] null vector sets (NULL_DEFINITION) for the vectors `like` [len(layers), d_model],
    from `rows` (the train PromptRows; the first NULL_PROBLEMS problems with both kinds)."""
    pairs = sorted({row.pair_index for row in rows if row.kind == "reasoning"}
                   & {row.pair_index for row in rows if row.kind == "control"})[:NULL_PROBLEMS]  # fmt: skip
    if len(pairs) < 2:
        raise UserError(f"the placebo null needs at least 2 train problems with both prompts, the run has {len(pairs)}")
    keep = set(pairs)
    chosen = [row for row in rows if row.pair_index in keep]
    acts = collect_activations(model, tokenizer, [row.prompt for row in chosen], layers, "last", batch_size)
    labels = torch.tensor([row.kind == "reasoning" for row in chosen], dtype=torch.long)
    problems = torch.tensor([row.pair_index for row in chosen])
    per_layer = [null_directions("placebo", like[i].cpu().to(torch.float64), n, seed, acts[:, i], labels, problems)
                 for i in range(len(layers))]  # fmt: skip  same seed: the same signs at every layer
    return torch.stack(per_layer, dim=1).to(like.dtype)  # [n, n_layers, d_model]


def _cosines(vectors: torch.Tensor, directions: torch.Tensor) -> list[float]:
    """Row-wise cosine of [n, d] with [n, d], float64."""
    return torch.nn.functional.cosine_similarity(vectors.to(torch.float64), directions.to(torch.float64), dim=-1).tolist()


def steering_report(module, datamodule, options, checkpoint: str, n_bootstrap: int = 1000,
                    batch_size: int = 8) -> dict:  # fmt: skip
    """The strength sweep of `module` (a SteeringObjectiveModule loaded from `checkpoint`) on the test split, with
    `options` (`lightning_modules.protocol.EvaluateOptions`); JSON shape in the module docstring. The gold NLL
    reads the first data.max_completion_tokens solution tokens: the length the steering was trained on."""
    from lightning_modules.steering import selected_directions

    vectors = module.learned_vectors()  # [n_steered, d_model] | None (LoRA)
    if options.directions is not None and vectors is None:
        raise UserError(f"--directions compares steering vectors with directions; {type(module).__name__} has none")
    datamodule.setup("test")
    module.pad_id = datamodule.pad_id
    max_solution_tokens = datamodule.max_completion_tokens
    spec = module.backbone_spec or datamodule.backbone
    # before any generation: a wrong directions file is one line, not an error after the sweep
    reference = None if options.directions is None else selected_directions(
        options.directions, list(module.layers), spec, datamodule.d_model, "--directions")  # fmt: skip
    rows = paired_rows(datamodule, "test", options.n_prompts)
    model, tokenizer = module.backbone_model, datamodule.prompts.tokenizer
    n_null = options.n_random if vectors is not None else 0
    nulls = None
    if n_null:
        train = [row for row in datamodule.prompts.rows if row.split == "train"]
        nulls = placebo_vectors(model, tokenizer, train, list(module.layers), vectors, n_null, options.seed, batch_size)
    strengths = sorted({0.0, 1.0, *(float(s) for s in (options.strengths or STEERING_STRENGTHS))})
    conditions = [Condition("baseline", "none", "none", strength=0.0)]
    conditions += [Condition(f"steered@{s:g}", "steer", "learned", strength=s) for s in strengths if s != 0]
    conditions += [Condition(f"null{k}_steered@1", "steer", "random", strength=1.0, random_index=k) for k in range(n_null)]

    def handler(condition: Condition):
        if condition.intervention == "none":
            return contextlib.nullcontext()
        if condition.direction == "learned":
            return module.steered(None, condition.strength)
        return module.steered(None, condition.strength, nulls[condition.random_index].to(vectors))

    gen = {"max_new_tokens": options.max_new_tokens, "do_sample": not options.greedy, "temperature": 0.6,
           "top_p": 0.95, "seed": options.seed}  # fmt: skip
    with torch.no_grad():
        results = evaluate_conditions(model, tokenizer, rows, conditions, handler, gen, batch_size, n_samples=4,
                                      n_bootstrap=n_bootstrap, max_solution_tokens=max_solution_tokens)  # fmt: skip
    cosine = None
    if reference is not None:
        directions, position = reference
        cosine = {"directions": str(options.directions), "position": position, "layers": list(module.layers),
                  "cosine": _cosines(vectors.cpu(), directions),
                  "null_cosine": None if nulls is None else [_cosines(nulls[:, i].cpu(), directions[i].expand(n_null, -1))
                                                             for i in range(len(module.layers))]}  # fmt: skip
    not_measured = [] if vectors is not None else [
        "null conditions (a null for an adapter's weight change is not defined here)",
        "cosine to a directions run (an adapter has no vectors)"]  # fmt: skip
    reasoning = [row for row in rows if row.kind == "reasoning"]
    return {
        "checkpoint": str(checkpoint), "module": type(module).__name__, "backbone": spec.name_or_path,
        "layers": list(module.layers), "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
        "split": "test", "n_problems": len(reasoning), "max_solution_tokens": max_solution_tokens,
        "n_bootstrap": n_bootstrap, "strengths": strengths, "generation": gen,
        "null": NULL_DEFINITION if n_null else None, "n_null": n_null,
        "reasoning_rows": [row.row_index for row in reasoning],
        "control_rows": [row.row_index for row in rows if row.kind == "control"],
        "pair_indices": [row.pair_index for row in reasoning], "conditions": results,
        "vs_null": vs_null(results, n_bootstrap, options.seed), "how_to_read": HOW_TO_READ,
        "cosine_to_directions": cosine,
        "not_measured": not_measured,
    }  # fmt: skip


def plot_steering(report: dict):
    """Gold NLL (with CI) and accuracy vs strength, null conditions as points at strength 1; cosine vs layer."""
    sweep = sorted((c for c in report["conditions"] if c["direction"] != "random"), key=lambda c: c["strength"])
    nulls = [c for c in report["conditions"] if c["direction"] == "random"]
    cosine = report["cosine_to_directions"]
    fig, axes = plt.subplots(1, 3 if cosine else 2, figsize=(14 if cosine else 9.5, 3.8))
    x = [c["strength"] for c in sweep]
    for ax, key, label in ((axes[0], "gold_nll", "gold-solution NLL (nats/token)"), (axes[1], "accuracy", "accuracy")):
        if key == "gold_nll":
            ax.plot(x, [c[key]["mean"] for c in sweep], "o-", label=report["module"])
            ax.fill_between(x, [c[key]["ci"][0] for c in sweep], [c[key]["ci"][1] for c in sweep], alpha=0.25)
            ax.plot([1.0] * len(nulls), [c[key]["mean"] for c in nulls], "kx", label="null vectors")
        else:
            ax.plot(x, [c[key] for c in sweep], "o-", label=report["module"])
            ax.plot([1.0] * len(nulls), [c[key] for c in nulls], "kx", label="null vectors")
        ax.set(xlabel="steering strength", ylabel=label)
        ax.legend(fontsize=8)
    if cosine:
        axes[2].plot(cosine["layers"], cosine["cosine"], "o-", label="learned vector")
        for k, values in enumerate(zip(*cosine["null_cosine"] or [])):
            axes[2].plot(cosine["layers"], values, "kx", label="null vectors" if k == 0 else None)
        axes[2].axhline(0, color="grey", lw=0.5)
        axes[2].set(xlabel="layer", ylabel="cosine to the directions run", ylim=(-1, 1))
        axes[2].legend(fontsize=8)
    fig.suptitle(f"{report['module']} on {report['backbone']} ({report['split']}, n={report['n_problems']})")
    fig.tight_layout()
    return fig


def write_steering_report(report: dict, output_dir: Path) -> dict[str, Path]:
    """Write steering_results.json and visualizations/steering_sweep.png into output_dir, print a table."""
    paths = write_report_files(report, output_dir, RESULTS_FILE, plot_steering(report), FIGURE_FILE)
    table = Table(title=f"Steering sweep (n={report['n_problems']} test problems, "
                        f"{report['trainable_parameters']} trained parameters)")  # fmt: skip
    for column in ("condition", "accuracy", "truncated", "gold NLL", "95% CI", "change", "control KL",
                   "ctrl solved", "4-gram rep."):  # fmt: skip
        table.add_column(column, justify="right", no_wrap=True)
    for c in report["conditions"]:
        low, high = c["gold_nll"]["ci"]
        solved = "-" if c["control_accuracy"] is None else f"{c['control_accuracy']:.3f}"
        table.add_row(c["name"], f"{c['accuracy']:.3f}", f"{c['truncation_rate']:.3f}", f"{c['gold_nll']['mean']:.3f}",
                      f"[{low:.3f}, {high:.3f}]", f"{c['gold_nll_change']['mean']:+.3f}",
                      f"{c['control_kl']['mean']:.4f}", solved, f"{c['ngram_repetition']:.3f}")  # fmt: skip
    Console().print(table)
    for name, test in report["vs_null"].items():
        floor = 1 / (len(test["null_values"]) + 1)
        Console().print(f"vs {len(test['null_values'])} null vector sets ({name}): {test['metric']} {test['value']:.3f}, "
                        f"difference {test['difference']:+.3f} [{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}] (CI over "
                        f"prompts, nulls fixed), p_rank {test['p_rank']:.3f} (smallest possible {floor:.3f})")  # fmt: skip
    return paths
