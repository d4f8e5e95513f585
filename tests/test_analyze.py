"""analyze.py end to end on the tiny pair (random weights: the wiring, files and shapes, not findings), a rerun that
skips every finished stage, and bad input stopped before anything is loaded or written."""

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

import analyze
from interp.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LAYERS = [1, 2]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny study in a temp working directory: (root, stdout of the first run, stdout of the rerun)."""
    import contextlib
    import io
    import os

    work = tmp_path_factory.mktemp("study")
    quick = yaml.safe_load((REPO / "configs/presets/quick_test.yaml").read_text())
    lens = yaml.safe_load((REPO / quick["tuned_lens"]).read_text())
    lens["trainer"]["max_epochs"] = 2
    (work / "tuned_lens.yaml").write_text(yaml.safe_dump(lens))
    preset = {**quick, "sources": [{"name": "toy_arithmetic", "path": "embedded", "split": "test", "limit": 24}],
              "layers": LAYERS, "probes": str(REPO / quick["probes"]), "directions": str(REPO / quick["directions"]),
              "tuned_lens": str(work / "tuned_lens.yaml"),
              "interventions": {"greedy": True, "max_new_tokens": 8, "n_prompts": 3, "n_random": 2, "strengths": [1.0]},
              "logit_lens": {"n_bootstrap": 50}, "alignment": {"n_null": 9, "n_bootstrap": 50},
              "transplant": {"n_prompts": 3, "n_null": 2, "n_bootstrap": 50, "generate": True}}  # fmt: skip
    (work / "tiny.yaml").write_text(yaml.safe_dump(preset))
    args = ["--preset", str(work / "tiny.yaml"), "--run_name", "s", "--model1", "tiny-qwq", "--model2", "tiny-r1-distill"]
    cwd, outputs = os.getcwd(), []
    os.chdir(work)
    try:
        for _ in range(2):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                analyze.main(args)
            outputs.append(out.getvalue())
    finally:
        os.chdir(cwd)
    return work / "logs" / "s", *outputs


def test_every_documented_file_with_its_shape(study):
    root, _, _ = study
    for label in ("qwq", "r1_distill"):
        model = root / label
        for name in ("probe_accuracies.json", "reasoning_directions.json", "intervention_results.json",
                     "logit_lens.json"):  # fmt: skip
            assert (model / name).is_file(), name
        with safe_open(str(model / "reasoning_directions.safetensors"), framework="pt") as f:
            n_pos = {"qwq": 7, "r1_distill": 3}[label]  # the two templates' post-instruction tokens
            assert list(f.get_slice("directions").get_shape()) == [n_pos, len(LAYERS), 64]
        lens = json.loads((model / "logit_lens.json").read_text())
        assert lens["layers"] == LAYERS and len(lens["kl"]["mean"]) == len(LAYERS) and lens["n_prompts"] >= 3
        tuned = lens["tuned_lens"]  # the tuned_lens stage's translators for layers 1 and 2, on the same rows
        assert tuned["layers"] == LAYERS and len(tuned["answer"]["prob"]["mean"]) == len(LAYERS)
        assert tuned["n_prompts"] == lens["n_prompts"] and (root.parents[1] / tuned["checkpoint"]).is_file()
        trained = json.loads((model / "tuned_lens_results.json").read_text())  # evaluate.py on the lens run
        assert [row["layer"] for row in trained["layers"]] == list(range(32))  # its own: all, the last the target
    alignment = json.loads((root / "alignment_results.json").read_text())
    assert alignment["layers"] == LAYERS and set(alignment["roles"]) == {"assistant", "think", "last"}
    for block in alignment["roles"].values():
        assert len(block["cka"]["diagonal"]) == len(LAYERS) and len(block["cka"]["matrix"]) == len(LAYERS)
        assert len(block["direction_cosine"]["value"]) == len(LAYERS) and block["direction_cosine"]["warnings"]
    transfers = json.loads((root / "transplant_results.json").read_text())["transfers"]
    assert set(transfers) == {"qwq->r1_distill", "r1_distill->qwq"}
    for entry in transfers.values():
        assert entry["role"] in ("assistant", "think", "last") and entry["layers"] == LAYERS
        for method in ("identity", "ridge"):
            assert len(entry["transplanted"][method]["ablation_score"]["ratio"]) == len(LAYERS)
            graded = entry["graded"][method]  # the same 3 problems as the interventions stage, ablated / added
            assert [c["name"] for c in graded["conditions"]] == ["baseline", "ablated", "added@1"]
            own = graded["own_accuracy"]
            accuracy = {c["name"]: c["accuracy"] for c in graded["conditions"]}
            drop, own_drop = accuracy["baseline"] - accuracy["ablated"], own["baseline"] - own["ablated"]
            assert graded["accuracy_drop_ratio"] == (None if own_drop == 0 else pytest.approx(drop / own_drop))
    names = {p.name for p in (root / "visualizations").glob("*.png")}
    assert {"summary.png", "qwq_probe_accuracy.png", "r1_distill_interventions.png", "cka_last.png",
            "logit_lens.png"} <= names  # fmt: skip
    record = json.loads((root / "study.json").read_text())
    assert record["preset"]["models"] == {"qwq": "tiny-qwq", "r1_distill": "tiny-r1-distill"}
    assert record["stages_finished"][-1] == "summary" and record["versions"]["torch"]
    assert list((root / "study").glob("events.out.tfevents.*")) and list((root / "qwq" / "probes").glob("events.*"))


def test_a_rerun_skips_every_finished_stage(study):
    _, first, second = study
    assert "done already" not in first
    assert second.count("done already") == 5 * 2 + 3 and "..." not in second.replace("[analyze] finished", "")


def test_a_tuned_lens_fitted_on_the_test_problems_is_refused(study, monkeypatch):
    """The lens stage reads the directions run's test rows: a tuned lens trained with other splits is an error."""
    import dataclasses
    from types import SimpleNamespace

    from study.pair import _tuned_lens
    from study.preset import load_preset
    from study.stages import Study

    root, _, _ = study
    monkeypatch.chdir(root.parents[1])
    run = Study("s", load_preset(str(root.parents[1] / "tiny.yaml"), "tiny-qwq", "tiny-r1-distill"))
    directions = run.run_datamodule("qwq")
    directions.prompts.setup("predict")
    model, _ = directions.backbone.load()
    lens, slots, _ = _tuned_lens(run, "qwq", model, directions)  # the study's own: same splits
    assert slots == LAYERS  # its layers are 0..31: slot l is layer l
    # a lens run whose splits put the directions run's test problems in its train split
    rows = [dataclasses.replace(row, split="train") for row in directions.prompts.rows]
    lens_run = SimpleNamespace(prompts=SimpleNamespace(rows=rows, setup=lambda stage=None: None))
    monkeypatch.setattr(Study, "run_datamodule", lambda self, label, stage="directions": lens_run)
    with pytest.raises(UserError, match="trained or validated on"):
        _tuned_lens(run, "qwq", model, directions)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope", "--run_name", "x"], "unknown preset 'nope'"),
        (["--run_name", "x", "--stages", "probes,cka"], "unknown stages"),
        (["--run_name", "../x"], "--run_name"),
        (["--run_name", "x", "--n_problems", "2"], "--n_problems must be >= 4"),
    ],
)
def test_bad_input_stops_before_anything_is_written(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(REPO)  # the presets resolve from the repository; nothing may be written
    before = set(REPO.joinpath("logs").glob("*")) if REPO.joinpath("logs").exists() else set()
    with pytest.raises(UserError, match=message):
        analyze.main(args)
    after = set(REPO.joinpath("logs").glob("*")) if REPO.joinpath("logs").exists() else set()
    assert after == before


@pytest.mark.parametrize("name", ["quick_test", "full_analysis", "layer_specific"])
def test_every_shipped_preset_loads(name, monkeypatch):
    from study.preset import load_preset

    monkeypatch.chdir(REPO)
    preset = load_preset(name)
    assert len(preset.models) == 2 and preset.sources and set(preset.transplant["maps"]) <= {"identity", "ridge"}
    assert load_preset(name, model1="tiny-qwq", n_problems=10).sources[0]["limit"] == 10
    assert load_preset(name, model1="tiny-qwq").models[next(iter(preset.models))] == "tiny-qwq"


def test_the_study_report_embeds_every_result_and_works_in_a_browser(study, browser):
    """logs/<run>/report.html: the pair's files and both models' files verbatim; in chromium the CKA heatmap has a
    cell per layer pair whose hover text is the JSON's value, and the layer table shows both models at one layer."""
    from pipeline_utils import open_in_browser
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from interp.report_html import ARTIFACTS, read_embedded_data

    root, _, _ = study
    embedded = read_embedded_data(root / "report.html")
    alignment = json.loads((root / "alignment_results.json").read_text())
    assert embedded["study"]["alignment"] == alignment
    assert embedded["study"]["transplant"] == json.loads((root / "transplant_results.json").read_text())
    shown = {f"{label}/{name}": json.loads((root / label / name).read_text())
             for label in ("qwq", "r1_distill") for name in ARTIFACTS if (root / label / name).is_file()}  # fmt: skip
    assert embedded["artifacts"] == shown and len(shown) == 2 * 5  # probes, directions, lens, interventions, logit lens

    open_in_browser(browser, root / "report.html")
    role, block = next(iter(alignment["roles"].items()))
    cells = browser.find_elements(By.CSS_SELECTOR, ".heatmap svg rect")
    assert len(cells) == len(alignment["layers"]) ** 2 * len(alignment["roles"])
    cell = next(c for c in cells if (c.get_attribute("data-row"), c.get_attribute("data-col")) == ("2", "1"))
    ActionChains(browser).move_to_element(cell).perform()
    value = block["cka"]["matrix"][LAYERS.index(2)][LAYERS.index(1)]
    tip = cell.find_element(By.XPATH, "ancestor::div[contains(@class, 'heatmap')]//div[@class='tooltip']")
    assert tip.text.startswith("qwq 2, r1_distill 1: ")
    assert float(tip.text.rsplit(": ", 1)[1]) == pytest.approx(value, rel=5e-4)  # shown to 4 significant digits
    browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                           browser.find_element(By.ID, "layer-slider"), LAYERS[0])  # fmt: skip
    shown = {(tr.get_attribute("data-artifact"), tr.get_attribute("data-metric")): tr
             for tr in browser.find_elements(By.CSS_SELECTOR, "#layer-table tbody tr")}  # fmt: skip
    assert ("qwq/probe_accuracies.json", "accuracy") in shown and ("r1_distill/probe_accuracies.json", "accuracy") in shown
    cka = shown[(f"alignment ({role} token)", "cka_diagonal")].find_elements(By.TAG_NAME, "td")[2]
    assert json.loads(cka.get_attribute("data-value")) == block["cka"]["diagonal"][0]
    transfers = json.loads((root / "transplant_results.json").read_text())["transfers"]
    for name, transfer in transfers.items():  # the transplant ratios by layer, with their CI and p_rank
        for map_name in transfer["maps"]:
            for score, values in transfer["transplanted"][map_name].items():
                for metric, expected in ((f"{score} ratio", values["ratio"][0]), (f"{score} p_rank", values["p_rank"][0]),
                                         (f"{score} ratio ci", values["ci"][0])):  # fmt: skip
                    cell = shown[(f"transplant {name} ({map_name})", metric)].find_elements(By.TAG_NAME, "td")[2]
                    assert json.loads(cell.get_attribute("data-value")) == expected
    browser.save_screenshot(str(root / "report.png"))
