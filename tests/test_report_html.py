"""report.html (interp/report_html.py): the embedded numbers are the result files verbatim, and in a real headless
browser (Debian's chromium through selenium; the Makefile installs it, else these tests skip saying so) the page loads
with no console error, every chart draws, the layer control and hover show the JSON's values for that layer, the
samples filter by condition and correctness, and a screenshot is saved beside the report."""

import json

import pytest
from pipeline_utils import open_in_browser, tiny_config

import evaluate
import train
from interp.report_html import ARTIFACTS, provenance, read_embedded_data, write_report_html


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A quick probe run evaluated on best.ckpt: logs/run holds probe_accuracies.json and report.html."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        train.main(["--config", str(tiny_config("quickstart.yaml", root, limit=6)), "--run_name", "run",
                    "--trainer.max_epochs", "1"])  # fmt: skip
        evaluate.main(["--ckpt", "checkpoints/run/best.ckpt"])
    return root / "logs" / "run"


def _conditions_artifact() -> dict:
    """An intervention report's shape (interp/intervention_eval.py) with two conditions and graded samples, one of
    them holding "</script>" (it must not end the page's data block)."""
    def sample(i, correct, text):
        return {"row_index": i, "pair_index": i, "dataset": "gsm8k", "gold_answer": "4", "generation": text,
                "extracted_answer": "4" if correct else "5", "correct": correct, "truncated": not correct}  # fmt: skip

    def condition(name, accuracy, samples):
        return {"name": name, "accuracy": accuracy, "truncation_rate": 0.5, "samples": samples,
                "gold_nll": {"mean": 1.25, "ci": [1.0, 1.5]}, "accuracy_change": {"mean": -0.5, "ci": [-1.0, 0.0]},
                "control_kl": {"mean": 0.01}}  # fmt: skip

    return {"checkpoint": "c.ckpt", "conditions": [
        condition("baseline", 1.0, [sample(0, True, "2 + 2 = \\boxed{4}"), sample(1, True, "so 4 </script> ok")]),
        condition("ablated", 0.5, [sample(0, False, "2 + 2 = 5"), sample(1, True, "<!-- <script>four: \\boxed{4}")]),
    ]}  # fmt: skip


def test_the_embedded_numbers_are_the_result_files(probe_run):
    embedded = read_embedded_data(probe_run / "report.html")
    assert embedded["artifacts"] == {"probe_accuracies.json": json.loads((probe_run / "probe_accuracies.json").read_text())}
    assert "LayerProbeModule" in embedded["provenance"]["config"]  # the exact config of the run
    assert embedded["provenance"]["backbone"]["name_or_path"] == "tiny"
    assert set(embedded["provenance"]["versions"]) >= {"torch", "transformers", "lightning"}
    assert (probe_run / "report.html").stat().st_size < 200_000  # self-contained, no bundled library


def test_a_generated_script_tag_cannot_break_the_page(tmp_path):
    (tmp_path / "intervention_results.json").write_text(json.dumps(_conditions_artifact()))
    report = write_report_html(tmp_path, provenance())
    assert "</script> ok" not in report.read_text() and "<!-- <script>" not in report.read_text()
    assert read_embedded_data(report)["artifacts"]["intervention_results.json"] == _conditions_artifact()
    assert "intervention_results.json" in ARTIFACTS


# ---- in a real browser ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_report_works_in_a_browser(browser, probe_run):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_in_browser(browser, probe_run / "report.html")
    rows = json.loads((probe_run / "probe_accuracies.json").read_text())["layers"]
    charts = browser.find_elements(By.CSS_SELECTOR, ".chart svg")
    assert charts and all(chart.find_elements(By.CSS_SELECTOR, "path[d^='M']") for chart in charts)
    slider = browser.find_element(By.ID, "layer-slider")
    for row in (rows[0], rows[7], rows[-1]):  # the layer control shows exactly the JSON's values of that layer
        browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                               slider, row["layer"])  # fmt: skip
        shown = {tr.get_attribute("data-metric"): json.loads(tr.find_elements(By.TAG_NAME, "td")[2].get_attribute("data-value"))
                 for tr in browser.find_elements(By.CSS_SELECTOR, "#layer-table tbody tr")}  # fmt: skip
        assert shown == {key: value for key, value in row.items() if key != "layer"}
        assert browser.find_element(By.ID, "layer-value").text == str(row["layer"])
    chart = charts[0]
    ActionChains(browser).move_to_element_with_offset(chart, -chart.size["width"] // 2 + 56, 0).perform()  # layer 0
    tip = browser.find_element(By.CSS_SELECTOR, ".tooltip")
    assert tip.is_displayed() and tip.text.splitlines()[0] == f"layer {rows[0]['layer']}"
    assert f"accuracy: {rows[0]['accuracy']:.4g}" in tip.text or f"accuracy: {rows[0]['accuracy']}" in tip.text
    browser.save_screenshot(str(probe_run / "report.png"))
    assert (probe_run / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_samples_filter_by_condition_and_correctness_in_a_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    (tmp_path / "intervention_results.json").write_text(json.dumps(_conditions_artifact()))
    open_in_browser(browser, write_report_html(tmp_path, provenance()))
    def shown():
        return [(tr.get_attribute("data-condition"), tr.get_attribute("data-correct"))
                for tr in browser.find_elements(By.CSS_SELECTOR, "table.samples tr[data-condition]")]  # fmt: skip

    assert shown() == [("baseline", "true"), ("baseline", "true"), ("ablated", "false"), ("ablated", "true")]
    assert "so 4 </script> ok" in browser.find_element(By.CSS_SELECTOR, "table.samples").text
    assert "<!-- <script>four" in browser.find_element(By.CSS_SELECTOR, "table.samples").text  # the page script ran
    Select(browser.find_element(By.CSS_SELECTOR, "select[data-filter='condition']")).select_by_value("ablated")
    assert shown() == [("ablated", "false"), ("ablated", "true")]
    Select(browser.find_element(By.CSS_SELECTOR, "select[data-filter='correct']")).select_by_value("incorrect")
    assert shown() == [("ablated", "false")]
    Select(browser.find_element(By.CSS_SELECTOR, "select[data-filter='correct']")).select_by_value("ungraded")
    assert shown() == []  # every sample here is graded
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.bars rect")
    assert [bar.find_element(By.TAG_NAME, "title").get_attribute("textContent") for bar in bars] == [
        "baseline: accuracy 1", "ablated: accuracy 0.5000"]


@pytest.mark.slow
def test_compare_overlays_two_runs_in_a_browser(browser, probe_run, tmp_path, monkeypatch):
    """evaluate.py --compare: for every per-layer metric of the file both folders hold, one chart whose two series
    are the two runs' values (hover shows both at a layer); the embedded files are the folders' own."""
    from selenium.webdriver.common.by import By

    monkeypatch.chdir(probe_run.parents[1])
    config = str(tiny_config("quickstart.yaml", tmp_path, limit=6))
    train.main(["--config", config, "--run_name", "other", "--trainer.max_epochs", "1", "--model.init_args.lr", "0.05"])
    evaluate.main(["--ckpt", "checkpoints/other/best.ckpt"])
    evaluate.main(["--compare", "logs/run", "logs/other"])
    report = probe_run.parent / "compare" / "run_vs_other" / "report.html"
    embedded = read_embedded_data(report)
    runs = {name: json.loads((probe_run.parent / name / "probe_accuracies.json").read_text()) for name in ("run", "other")}
    assert embedded["artifacts"] == {f"{name}/probe_accuracies.json": runs[name] for name in runs}

    open_in_browser(browser, report)
    chart = browser.find_element(By.CSS_SELECTOR, "section[data-artifact='compare'] .chart[data-title='probe_accuracies.json: accuracy']")
    assert [p.get_attribute("data-series") for p in chart.find_elements(By.CSS_SELECTOR, "path[data-series]")] == ["run", "other"]
    from selenium.webdriver.common.action_chains import ActionChains

    svg = chart.find_element(By.TAG_NAME, "svg")
    ActionChains(browser).move_to_element_with_offset(svg, -svg.size["width"] // 2 + 56, 0).perform()  # layer 0
    lines = chart.find_element(By.CSS_SELECTOR, ".tooltip").text.splitlines()
    assert lines[0] == "layer 0"
    for line, name in zip(lines[1:], ("run", "other")):
        assert line.startswith(f"{name}: ") and float(line.split(": ")[1]) == pytest.approx(
            runs[name]["layers"][0]["accuracy"], rel=5e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cut", "one pair"])
def test_patching_cells_without_a_value_or_a_ci_say_why_in_a_browser(browser, tmp_path, case):
    """A heatmap cell left NaN by the cutoff is grey and its hover gives the cut reason; with one pair the hover gives
    the value and why there is no CI (interp.patching_stats.summarise, the callback's own summary)."""
    import torch
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from interp.patching_stats import summarise

    reasoning, control = (torch.tensor([1.0, -1.0]), torch.zeros(2)) if case == "cut" else (torch.ones(1), torch.zeros(1))
    patched = torch.linspace(0, 1, len(reasoning) * 2 * 3).reshape(len(reasoning), 2, 3)
    result = summarise("exact", reasoning, control, patched, [3, 5], ["<|im_end|>", "\n", "<think>"]).to_dict()
    (tmp_path / "patching_results.json").write_text(json.dumps(result))
    open_in_browser(browser, write_report_html(tmp_path, provenance()))
    cell = browser.find_element(By.CSS_SELECTOR, ".heatmap rect[data-row='5'][data-col='1:\"\\\\n\"']")
    ActionChains(browser).move_to_element(cell).perform()
    text = browser.find_element(By.CSS_SELECTOR, ".heatmap .tooltip").get_attribute("textContent")
    if case == "cut":
        assert result["cut"][1][1] and cell.get_attribute("fill") == "#ddd"
        assert text == f'layer 5, token 1:"\\n": cut ({result["cut_reason"]})'
    else:
        assert result["recovered"][1][1] == pytest.approx(float(patched[0, 1, 1]))
        assert text.startswith('layer 5, token 1:"\\n": ') and text.endswith(f"(no CI: {result['ci_reason']})")
        assert float(text.split(": ")[1].split(" ")[0]) == pytest.approx(result["recovered"][1][1], rel=5e-4)


@pytest.mark.slow
def test_missing_values_break_the_line_and_lone_values_show_in_a_browser(browser, tmp_path):
    """A null layer breaks a chart's line and CI band instead of bridging it; a value between nulls, or a run's only
    layer, is still drawn (a point, a thin band); a metric null everywhere draws nothing and says so."""
    from selenium.webdriver.common.by import By

    rows = [{"layer": 0, "delta": -0.5, "ci": [-0.7, -0.3]}, {"layer": 1, "delta": None, "ci": [None, None]},
            {"layer": 2, "delta": 0.4, "ci": [0.2, 0.6]}, {"layer": 3, "delta": None, "ci": [None, None]},
            {"layer": 4, "delta": 0.1, "ci": [0.0, 0.2]}]  # fmt: skip
    (tmp_path / "ablation_results.json").write_text(json.dumps({"metric": "first_tokens", "layers": rows}))
    (tmp_path / "logit_lens.json").write_text(json.dumps({"layers": [0, 1, 2], "kl": {"mean": [None] * 3, "ci": [None] * 3},
                                                          "answer": {"mean": [0.1, 0.2, 0.3]}}))  # fmt: skip
    open_in_browser(browser, write_report_html(tmp_path, provenance()))
    chart = browser.find_element(By.CSS_SELECTOR, "section[data-artifact='ablation_results.json'] .chart")
    path = chart.find_element(By.CSS_SELECTOR, "path[data-series='delta']").get_attribute("d")
    assert path.count("M") == 3 and "L" not in path  # three lone values, nothing bridged
    assert len(chart.find_elements(By.CSS_SELECTOR, "circle[data-series='delta']")) == 3
    assert len(chart.find_elements(By.CSS_SELECTOR, "polygon[data-band='delta']")) == 3
    lens = browser.find_element(By.CSS_SELECTOR, "section[data-artifact='logit_lens.json']")
    assert "kl by layer: no values" in lens.text and lens.find_elements(By.CSS_SELECTOR, "path[data-series='answer.mean']")
    assert not browser.find_elements(By.CSS_SELECTOR, "#layer-table tr[data-metric='kl.ci']")
