"""The stages that read the directions runs' activation caches: the logit lens per model, then the two models lined
up (alignment) and each model's direction transplanted into the other (transplant).

Every one reads the post-instruction cache of the model's directions run and picks positions by role
(`interp.prompts.role_positions`: assistant, think, last), so the two chat templates are matched token for token.
Rows are keyed (problem id, kind); the two models' keys must agree (`interp.alignment.check_matched_rows`).
    logit_lens   test split, reasoning rows, role "last": `interp.lens_depth.logit_lens_depth`, the final
                 distribution from the model itself (`next_token_logits`); when the tuned_lens stage ran, the
                 same through its best.ckpt's translators (trained at the last prompt token on train / val
                 problems only: checked against these test problems)
    alignment    test split, every role: `analyze_cross_model_alignment` (directions recomputed from the test rows)
    transplant   for A -> B in both orders, at the role of B's selected position (or "last" when it has none):
                 B's own directions and A's (file: the directions runs', train split) mapped by each of the
                 preset's maps (ridge fitted on the val rows of both models: never on the directions' own rows,
                 see interp.transplant), scored on B's test problems
                 (`interp.transplant.transplant_report` with B's run's own scoring settings) against
                 transplant.n_null placebo directions of B (balanced sign flips of B's train paired differences);
                 with transplant.generate, also graded generations with each transplanted direction ablated / added
                 at B's selected layer on the interventions stage's problems: the ratio of accuracy drops
"""

from __future__ import annotations

import json

import torch

from datamodules.prompts import problem_pairs
from interp.alignment import analyze_cross_model_alignment, check_matched_rows, paired_layer_differences
from interp.direction_scoring import PromptScorer
from interp.directions import load_directions
from interp.errors import UserError
from interp.intervention_eval import intervention_report
from interp.lens import LensReadout, LogitLens, TunedLens
from interp.lens_depth import first_token_ids, logit_lens_depth
from interp.metrics import next_token_logits
from interp.null_directions import balanced_signs, signflip_directions
from interp.prompts import POSITION_ROLES, role_positions
from interp.transplant import map_directions, ratio_of_means_ci, transplant_report
from study.stages import Study, write_json


def _tokenizer(datamodule):
    datamodule.prompts.setup("predict")
    return datamodule.prompts.tokenizer


def _rows(datamodule, split: str, position: int) -> tuple[torch.Tensor, list[tuple]]:
    """(acts [n, L, d] float32, keys (problem, kind), row indices [n]) of one split at one cached position."""
    rows = datamodule.split_position(split, position)
    kinds = ["reasoning" if int(y) == 1 else "control" for y in rows["y"]]
    return rows["x"], [(int(p), k) for p, k in zip(rows["problem"], kinds)], rows["row_index"]


def _tuned_lens(study: Study, label: str, model, datamodule) -> tuple[TunedLens, list[int], str] | None:
    """(the tuned_lens stage's lens on `model`'s readout, its slot for each of the datamodule's layers, checkpoint)
    or None when the preset has no tuned lens. UserError when it lacks a layer or trained on a test problem."""
    from lightning_modules.tuned_lens import TunedLensModule

    if not study.preset.tuned_lens:
        return None
    ckpt = study.checkpoint_dir(label, "tuned_lens") / "best.ckpt"
    if not ckpt.is_file():
        raise UserError(f"{ckpt} does not exist: run the tuned_lens stage of {label} first")
    module = TunedLensModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    missing = [layer for layer in datamodule.layers if layer not in module.layers]
    if missing:
        raise UserError(f"the tuned lens of {label} ({ckpt}) has no translator for layers {missing}")
    lens_data = study.run_datamodule(label, "tuned_lens").prompts
    lens_data.setup("predict")
    fitted = {row.problem_id for row in lens_data.rows if row.split != "test"}
    leaked = sorted(fitted & {row.problem_id for row in datamodule.prompts.rows if row.split == "test"})
    if leaked:
        raise UserError(f"the tuned lens of {label} trained or validated on {len(leaked)} of the test problems the "
                        f"lens stage reads (e.g. {leaked[0]}): give its config the directions config's splits")  # fmt: skip
    readout = LensReadout(model)
    lens = TunedLens(module.translators.to(readout.unembed.weight.device), readout, module.final_slot)
    return lens, [module.layers.index(layer) for layer in datamodule.layers], str(ckpt)


def run_logit_lens(study: Study, label: str) -> None:
    datamodule = study.run_datamodule(label)
    model, tokenizer = datamodule.backbone.load()
    acts, keys, row_index = _rows(datamodule, "test", role_positions(tokenizer)["last"])
    reasoning = [i for i, (_, kind) in enumerate(keys) if kind == "reasoning"]
    rows = [datamodule.prompts.rows[int(row_index[i])] for i in reasoning]
    final = next_token_logits(model, tokenizer, [row.prompt for row in rows], datamodule.prompts.batch_size)
    inputs = dict(acts=acts[reasoning], final_logits=final, layers=datamodule.layers,
                  answer_ids=first_token_ids(tokenizer, [row.gold_answer for row in rows]),
                  solution_ids=first_token_ids(tokenizer, [row.gold_solution for row in rows]),
                  n_bootstrap=study.preset.logit_lens["n_bootstrap"])  # fmt: skip
    report = logit_lens_depth(LogitLens(model, tokenizer), **inputs)
    tuned = _tuned_lens(study, label, model, datamodule)
    if tuned is not None:
        lens, slots, ckpt = tuned
        report["tuned_lens"] = {**logit_lens_depth(lens, lens_slots=slots, **inputs), "checkpoint": ckpt}
    else:
        report["tuned_lens"] = None
    report.update(backbone=datamodule.backbone.name_or_path, split="test", position="last prompt token")
    write_json(study.output("logit_lens", label), report)


def _check_same_layers(modules: dict) -> list[int]:
    layers = {label: list(dm.layers) for label, dm in modules.items()}
    first, second = layers.values()
    if first != second:
        raise UserError(f"the two directions runs cached different layers {layers}: the pair stages need the same")
    return first


def run_alignment(study: Study) -> None:
    modules = {label: study.run_datamodule(label) for label in study.labels}
    layers = _check_same_layers(modules)
    roles = {label: role_positions(_tokenizer(dm)) for label, dm in modules.items()}
    settings = study.preset.alignment
    result = {"models": study.preset.models, "layers": layers, "split": "test", "roles": {}}
    for role in POSITION_ROLES:
        (acts1, keys1, _), (acts2, keys2, _) = (_rows(dm, "test", roles[label][role]) for label, dm in modules.items())
        result["roles"][role] = analyze_cross_model_alignment(
            acts1, acts2, keys1=keys1, keys2=keys2, n_null=settings["n_null"], n_bootstrap=settings["n_bootstrap"],
            debiased=settings["debiased"],
        )  # fmt: skip
    write_json(study.output("alignment"), result)


def _placebo_nulls(acts: torch.Tensor, keys: list[tuple], n: int, seed: int) -> torch.Tensor:
    """n balanced sign-flip placebo directions per layer: [n, L, d] float64."""
    diffs = paired_layer_differences(acts, keys)  # [n_problems, L, d]
    flat = signflip_directions(diffs.reshape(len(diffs), -1), balanced_signs(len(diffs), n, seed))  # [n, L * d]
    return flat.reshape(n, *diffs.shape[1:])


def _transplant_one(study: Study, source: str, target: str, modules: dict, layers: list[int]) -> dict:
    settings = study.preset.transplant
    files = {label: load_directions(study.output("directions", label)) for label in (source, target)}
    roles = {label: role_positions(_tokenizer(modules[label])) for label in (source, target)}
    (own_all, meta), (source_all, source_meta) = files[target], files[source]
    if meta.get("layers") != layers or source_meta.get("layers") != layers:
        raise UserError(f"the directions files do not cover the cached layers {layers}: rerun the directions stage")
    by_index = {index: role for role, index in roles[target].items()}
    selected = (meta.get("selected") or {}).get("position")
    role = by_index.get(selected, "last")
    own = own_all[roles[target][role]].double()  # [L_cached, d_B]
    source_dirs = source_all[roles[source][role]].double()  # [L_cached, d_A]
    transplanted = {}
    if "ridge" in settings["maps"]:
        # fitted on the val rows: disjoint from the train rows the directions came from (on those, a ridge map
        # with fewer rows than dimensions interpolates and maps any A's mean difference onto B's) and from test
        x, keys_x, _ = _rows(modules[source], "val", roles[source][role])
        y, keys_y, _ = _rows(modules[target], "val", roles[target][role])
        check_matched_rows(keys_x, keys_y)
        transplanted["ridge"] = map_directions(source_dirs, own.norm(dim=-1), "ridge", x, y, settings["ridge"])
    if "identity" in settings["maps"]:
        transplanted["identity"] = map_directions(source_dirs, own.norm(dim=-1), "identity",
                                                  target_activations=own[None])  # fmt: skip
    train_acts, train_keys, _ = _rows(modules[target], "train", roles[target][role])
    nulls = _placebo_nulls(train_acts, train_keys, settings["n_null"], seed=0) if settings["n_null"] else None
    n_model_layers = int(meta["n_model_layers"])

    def full(t: torch.Tensor) -> torch.Tensor:  # [..., L_cached, d] -> [..., n_model_layers, d], zeros elsewhere
        out = torch.zeros(*t.shape[:-2], n_model_layers, t.shape[-1], dtype=torch.float32)
        out[..., layers, :] = t.float()
        return out

    model, tokenizer = modules[target].backbone.load()
    init = study.directions_config(target)["model"]["init_args"]
    scorer = PromptScorer(model, tokenizer, init["selection_metric"], init["k_first_tokens"], init["batch_size"],
                          init["intervention_strength"])  # fmt: skip
    pairs = problem_pairs(modules[target], "test", settings["n_prompts"], seed=0)
    problems = [(r.prompt, r.gold_solution, c.prompt, c.gold_solution) for r, c in pairs]
    report = transplant_report(scorer, problems, full(own), {name: full(t) for name, t in transplanted.items()},
                               layers, None if nulls is None else full(nulls), settings["n_bootstrap"])  # fmt: skip
    graded = _graded(study, target, model, tokenizer, modules[target], {name: full(t) for name, t in transplanted.items()})
    return {"source": source, "target": target, "role": role, "target_selected_position": selected, "graded": graded,
            "source_position": roles[source][role], "target_position": roles[target][role], "maps": list(transplanted),
            "ridge": settings["ridge"], "null": "placebo (balanced sign flips of the target's train paired "
            "differences), rescaled to the target's own direction norm", **report}  # fmt: skip


def _graded(study: Study, target: str, model, tokenizer, datamodule, transplanted: dict) -> dict | None:
    """transplant.generate: each transplanted direction [n_model_layers, d] through `intervention_report` at the
    target's selected layer, on the problems of the target's own intervention_results.json, and the ratio of
    accuracy drops under ablation, mean_i (base_i - ablated_i) transplanted / own, with a bootstrap CI."""
    if not study.preset.transplant["generate"]:
        return None
    if not study.output("interventions", target).is_file():
        raise UserError(f"transplant.generate compares with {study.output('interventions', target)}: run the "
                        "interventions stage first")  # fmt: skip
    own = json.loads(study.output("interventions", target).read_text())
    opts = study.preset.interventions
    rows = [row for pair in problem_pairs(datamodule, "test", opts["n_prompts"], seed=opts["seed"]) for row in pair]
    out, generator = {}, torch.Generator().manual_seed(0)

    def correct(report: dict, name: str) -> torch.Tensor:
        return torch.tensor(next(c for c in report["conditions"] if c["name"] == name)["correct"], dtype=torch.float64)

    for name, directions in transplanted.items():
        report = intervention_report(model, tokenizer, rows, directions, own["selected_layer"], opts["strengths"],
                                     n_random=0, max_new_tokens=opts["max_new_tokens"], do_sample=not opts["greedy"],
                                     seed=opts["seed"], n_samples=2)  # fmt: skip
        if report["reasoning_rows"] != own["reasoning_rows"]:
            raise UserError("the transplant's problems differ from the interventions stage's: rerun both")
        num = correct(report, "baseline") - correct(report, "ablated")  # [n] accuracy drop per prompt
        den = correct(own, "baseline") - correct(own, "ablated")
        ratio = float(num.mean() / den.mean()) if float(den.mean()) != 0 else None
        out[name] = {"layer": own["selected_layer"], "accuracy_drop_ratio": ratio,
                     "ci": ratio_of_means_ci(num, den, study.preset.transplant["n_bootstrap"], generator),
                     "own_accuracy": {c["name"]: c["accuracy"] for c in own["conditions"][:2]},
                     "conditions": [{key: c[key] for key in ("name", "accuracy", "accuracy_change", "control_accuracy",
                                                            "truncation_rate")} for c in report["conditions"]]}  # fmt: skip
    return out


def run_transplant(study: Study) -> None:
    modules = {label: study.run_datamodule(label) for label in study.labels}
    layers = _check_same_layers(modules)
    first, second = study.labels
    results = {f"{a}->{b}": _transplant_one(study, a, b, modules, layers) for a, b in ((first, second), (second, first))}
    write_json(study.output("transplant"), {"models": study.preset.models, "layers": layers, "transfers": results})
