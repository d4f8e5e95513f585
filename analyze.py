"""The whole two-model study from a preset: every stage for BOTH backbones on identical problems, one result folder.

    python analyze.py --preset quick_test --run_name my_experiment
    python analyze.py --preset full_analysis --run_name qwq_vs_r1 [--stages alignment,transplant,summary]

Stages, in order (study/preset.py STAGES): probes, directions, tuned_lens, interventions, logit_lens (each model:
the project's own train.py / evaluate.py runs and the directions run's cache), alignment, transplant (the pair),
summary. tuned_lens runs only when the preset names a tuned-lens config.
Results: logs/<run_name>/ (layout in study/stages.py and the README, "Reproduce the study"). A stage whose result
file exists is skipped, so rerunning the same command resumes an interrupted study.
"""

from __future__ import annotations

import argparse
import json

from cli import LOG_ROOT, check_run_name, run_main
from interp.backbone import BackboneSpec
from interp.errors import UserError
from interp.report_html import package_versions
from study.preset import PER_MODEL_STAGES, load_preset, parse_stages
from study.stages import Study, run_directions, run_interventions, run_probes, run_tuned_lens, write_json


def _check(study: Study, stages: list[str]) -> None:
    """What can be checked before any model loads: run name, backbones' shapes."""
    check_run_name(study.run)
    specs = {label: BackboneSpec(name_or_path=name) for label, name in study.preset.models.items()}
    if {"alignment", "transplant"} & set(stages):
        widths = {label: spec.hidden_size() for label, spec in specs.items()}
        if "identity" in study.preset.transplant["maps"] and len(set(widths.values())) > 1:
            raise UserError(f"d_model differs {widths}: the identity transplant needs one basis; set the preset's "
                            "transplant.maps to [ridge] (the linear map)")  # fmt: skip
        depths = {label: spec.num_layers() for label, spec in specs.items()}
        if study.preset.layers is None and len(set(depths.values())) > 1:
            raise UserError(f"the backbones have {depths} layers: the pair stages compare layer by layer; set the "
                            "preset's layers to ones both have")  # fmt: skip


def _record(study: Study, done: list[str]) -> None:
    versions = package_versions()
    write_json(study.root / "study.json", {"run_name": study.run, "preset": study.preset.as_dict(),
                                            "stages_finished": done, "versions": versions})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from study.pair import run_alignment, run_logit_lens, run_transplant
    from study.summary import run_summary

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick_test", help="configs/presets/<name>.yaml, or a path")
    parser.add_argument("--run_name", required=True, help="the study's folder under logs/ and checkpoints/")
    parser.add_argument("--model1", default=None, help="replace the preset's first backbone (hub id, dir, built-in)")
    parser.add_argument("--model2", default=None, help="replace the preset's second backbone")
    parser.add_argument("--stages", default=None, help="comma-separated subset of the stages (default: all)")
    parser.add_argument("--n_problems", type=int, default=None, help="problems per source (replaces each limit)")
    args = parser.parse_args(argv)
    stages = parse_stages(args.stages)
    study = Study(args.run_name, load_preset(args.preset, args.model1, args.model2, args.n_problems))
    _check(study, stages)
    previous = LOG_ROOT / study.run / "study.json"
    if previous.is_file() and json.loads(previous.read_text())["preset"] != study.preset.as_dict():
        raise UserError(f"{previous} holds a study with other settings: pick another --run_name (nothing is "
                        "overwritten)")  # fmt: skip
    per_model = {"probes": run_probes, "directions": run_directions, "tuned_lens": run_tuned_lens,
                 "interventions": run_interventions, "logit_lens": run_logit_lens}  # fmt: skip
    pair = {"alignment": run_alignment, "transplant": run_transplant, "summary": run_summary}
    done = []
    _record(study, done)
    for stage in stages:
        if stage == "tuned_lens" and not study.preset.tuned_lens:
            print("[analyze] tuned_lens: skipped (the preset's tuned_lens is null)")
            continue
        for label in study.labels if stage in PER_MODEL_STAGES else [None]:
            output = study.output(stage, label)
            what = f"{stage} ({label})" if label else stage
            if output.is_file():
                print(f"[analyze] {what}: done already ({output})")
                continue
            print(f"[analyze] {what} ...")
            per_model[stage](study, label) if label else pair[stage](study)
        done.append(stage)
        _record(study, done)
    print(f"[analyze] finished: {study.root}")


if __name__ == "__main__":
    run_main(main)
