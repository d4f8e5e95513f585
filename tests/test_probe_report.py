"""probe_accuracies.json on cached activations (tiny backbone, MATH subjects): every new field recomputed here
independently from the prompt rows, the checkpointed probes and scikit-learn."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from datamodules.activations import CachedActivationDataModule
from datamodules.problems import DatasetSource
from datamodules.prompts import ReasoningPromptsDataModule
from interp.backbone import BackboneSpec
from lightning_modules.cache_writer import extract_activations
from lightning_modules.probe_report import probe_report, write_probe_report
from lightning_modules.probes import LayerProbeModule


def _trainer(**kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def _first_word(question: str) -> str:
    """The first run of alphanumeric characters, lower-cased (written without regular expressions)."""
    text = question.lower()
    start = next((i for i, c in enumerate(text) if c.isalnum()), len(text))
    end = start
    while end < len(text) and text[end].isalnum():
        end += 1
    return text[start:end]


@pytest.fixture(scope="module")
def report_and_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe_report")
    prompts = ReasoningPromptsDataModule(sources=[DatasetSource("gsm8k", limit=8), DatasetSource("math", limit=40)])
    dm = CachedActivationDataModule(prompts=prompts, backbone=BackboneSpec("tiny"), layers=[1, 3], positions="last",
                                    label="subject", cache_dir=str(tmp / "cache"), batch_size=16)  # fmt: skip
    extract_activations(_trainer(), dm)
    L.seed_everything(0, verbose=False)
    module = LayerProbeModule(lr=3e-2)
    _trainer(max_epochs=5, num_sanity_val_steps=0).fit(module, datamodule=dm)
    report = probe_report(_trainer(), module, dm, checkpoint="in-memory")
    paths = write_probe_report(report, tmp / "out")
    return report, dm, module, paths


def test_report_fields_equal_an_independent_computation(report_and_data):
    report, dm, module, paths = report_and_data
    assert json.loads(paths["json"].read_text()) == report and paths["figure"].is_file()
    rows = [r for r in dm.prompts.rows if r.dataset == "math"]  # the rows with a subject, in row order
    subjects = sorted({r.subject for r in rows})
    y = {split: np.array([subjects.index(r.subject) for r in rows if r.split == split]) for split in ("train", "test")}
    n_classes = len(subjects)
    # majority baseline: share of test rows in the TRAIN split's most frequent class (ties: lowest index)
    majority = np.bincount(y["train"], minlength=n_classes).argmax()
    assert report["majority_baseline"] == pytest.approx(np.mean(y["test"] == majority), abs=1e-15)
    assert report["uniform_chance"] == 1 / n_classes and "chance" not in report
    present = [k for k in range(n_classes) if 0 < np.sum(y["test"] == k) < len(y["test"])]
    assert report["absent_classes"] == [subjects[k] for k in range(n_classes) if k not in present]
    assert len(present) >= 3 and report["absent_classes"]  # multi-class with a class absent from test
    batches = list(dm.test_dataloader())
    x = torch.cat([b["x"] for b in batches])  # [n_test, n_layers, d_model]
    assert np.array_equal(torch.cat([b["y"] for b in batches]).numpy(), y["test"])
    with torch.no_grad():
        logits = module.probe(x).double()  # [n_test, n_layers, n_classes]
    for slot, row in enumerate(report["layers"]):
        predicted = logits[:, slot].argmax(-1).numpy()
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y["test"], predicted), abs=1e-12)
        probs = logits[:, slot, present].softmax(-1).numpy()
        auroc = roc_auc_score(y["test"], probs, multi_class="ovr", labels=present)
        # same batches -> the same float32 logits as trainer.test; the rest is float64 (rank sums of <= 18 rows)
        assert row["auroc"] == pytest.approx(auroc, abs=1e-12)
        assert np.isfinite([row["sklearn_balanced_accuracy"], row["sklearn_auroc"]]).all()
        assert row["selectivity"] == pytest.approx(row["accuracy"] - row["control_accuracy"], abs=1e-12)


def test_control_task_follows_the_question_type_across_splits(report_and_data):
    report, dm, module, _ = report_and_data
    by_row = {r.row_index: r for r in dm.prompts.rows}
    label_of_type, types = {}, {}
    for split in ("train", "val", "test"):
        ds = dm.datasets[split]
        types[split] = [_first_word(by_row[int(i)].question) for i in dm.row_index[split]]
        for word, label in zip(types[split], ds.y_control.tolist()):
            assert label_of_type.setdefault(word, label) == label  # one label per type, in every split
    seen = sum(word in set(types["train"]) for word in types["test"])
    assert report["n_test_control_type_seen"] == seen and 0 < seen < len(types["test"])
    assert report["control_type_coverage"] == pytest.approx(seen / len(types["test"]), abs=1e-15)
    # control accuracy on the train split, from the control probe applied here
    batches = list(dm.train_dataloader())
    x, y_control = torch.cat([b["x"] for b in batches]), torch.cat([b["y_control"] for b in batches])
    with torch.no_grad():
        predicted = module.control_probe(x).argmax(-1)  # [n_train, n_layers]
    for slot, row in enumerate(report["layers"]):
        expected = (predicted[:, slot] == y_control).double().mean()
        assert row["control_train_accuracy"] == pytest.approx(float(expected), abs=1e-15)


def test_control_baseline_excess_selectivity_and_best_layer(report_and_data):
    report, dm, module, _ = report_and_data
    y_train, y_test = (torch.as_tensor(dm.datasets[split].y_control) for split in ("train", "test"))
    majority = int(np.bincount(y_train.numpy()).argmax())
    assert report["control_majority_baseline"] == pytest.approx(float((y_test == majority).double().mean()), abs=1e-15)
    for row in report["layers"]:
        expected = (row["accuracy"] - report["majority_baseline"]) - (
            row["control_accuracy"] - report["control_majority_baseline"])  # fmt: skip
        assert row["excess_selectivity"] == pytest.approx(expected, abs=1e-12)
    # best_layer: the highest VAL accuracy (recomputed from the probe), reported with its TEST numbers
    batches = list(dm.val_dataloader())
    x, y = torch.cat([b["x"] for b in batches]), torch.cat([b["y"] for b in batches])
    with torch.no_grad():
        val_accuracy = (module.probe(x).argmax(-1) == y[:, None]).double().mean(0)  # [n_layers]
    best = int(val_accuracy.argmax())
    assert report["best_layer"]["chosen_on"] == "val"
    assert report["best_layer"]["val_accuracy"] == pytest.approx(float(val_accuracy[best]), abs=1e-12)
    assert {k: v for k, v in report["best_layer"].items() if k not in ("chosen_on", "val_accuracy")} == report[
        "layers"][best]  # fmt: skip


def test_non_finite_training_activations_are_one_clear_error():
    from datamodules.tensors import TensorProbeDataModule
    from interp.errors import UserError

    x, y = torch.randn(40, 2, 4), torch.randint(0, 2, (40,))
    x[3, 1, 2] = float("nan")
    dm = TensorProbeDataModule(x, y, num_classes=2, seed=0)
    with pytest.raises(UserError, match=r"layer\(s\) \[1\] hold NaN or inf"):
        _trainer(max_epochs=1).fit(LayerProbeModule(), datamodule=dm)
