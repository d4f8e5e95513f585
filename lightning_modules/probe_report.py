"""The probe evaluation report: per-layer test metrics of the trained probes beside scikit-learn.

`probe_report` runs `trainer.test` (accuracy, balanced accuracy, AUROC, control accuracy, selectivity per layer;
definitions in lightning_modules/probes.py), scores the control probe on the train split, and fits
scikit-learn's LogisticRegression on the same cached features (train split -> test split) as an independent
reference. `write_probe_report` writes probe_accuracies.json and visualizations/probe_accuracy.png and prints a
rich table. JSON shape (documented in the README):

    {"checkpoint": str, "backbone": str, "label": str, "class_names": [str], "split": "test",
     "n_train": int, "n_test": int,
     "majority_baseline": float,    share of test rows in the train split's most frequent class (ties: lowest
                                    index): the accuracy of a constant predictor fitted on train
     "control_majority_baseline": float,  share of test rows whose control label is the train split's most
                                    frequent control label: the control task's own no-information level
     "uniform_chance": float,       1 / number of classes
     "absent_classes": [str],       classes without both a positive and a negative test row (not in the AUROCs)
     "control_type": str,           what the control task's type is
     "control_type_coverage": float,      share of test rows whose control type occurs among the train rows
     "n_test_control_type_seen": int,     that number of rows (only they can beat chance on the control task)
     "layers": [{"layer": int, "accuracy": float, "balanced_accuracy": float, "auroc": float,
                 "control_accuracy": float, "control_train_accuracy": float, "selectivity": float,
                 "excess_selectivity": float,
                 "sklearn_accuracy": float, "sklearn_balanced_accuracy": float, "sklearn_auroc": float}, ...],
     "best_layer": {same fields as one entry of "layers" (TEST numbers), "chosen_on": "val", "val_accuracy"}}
                                    the layer with the highest VAL accuracy: test takes no part in choosing it

control_accuracy is on the test split, control_train_accuracy on the train split (how well the control probe
fits type -> label where it learned it); selectivity = accuracy - control_accuracy (Hewitt & Liang).
excess_selectivity = (accuracy - majority_baseline) - (control_accuracy - control_majority_baseline): each
accuracy above its own task's no-information level; with few, frequent types the control labels are far more
concentrated than the task's, so plain selectivity is biased (negative) even for a probe that learns nothing. The scikit-learn columns use
the same definitions (balanced_accuracy_score; roc_auc_score one-vs-rest over the present classes with the
probabilities renormalised over them).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from datamodules.tensors import QUESTION_TYPE
from interp.plots import plot_layer_curves
from lightning_modules.protocol import write_report_files

RESULTS_FILE = "probe_accuracies.json"


def sklearn_layer_scores(x_train, y_train, x_test, y_test, num_classes: int, seed: int = 0) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro one-vs-rest AUROC (over the classes present in y_test, with the
    probabilities renormalised over them) of a standardized L2 logistic regression."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    classifier.fit(x_train, y_train)
    predicted = classifier.predict(x_test)
    scores = {"accuracy": float(accuracy_score(y_test, predicted)),
              "balanced_accuracy": float(balanced_accuracy_score(y_test, predicted))}  # fmt: skip
    proba = classifier.predict_proba(x_test)
    full = np.zeros((len(y_test), num_classes))
    full[:, classifier.classes_] = proba
    present = np.unique(y_test)
    if len(present) < 2:
        return {**scores, "auroc": float("nan")}
    full = full[:, present] / full[:, present].sum(1, keepdims=True).clip(min=1e-12)
    if len(present) == 2:
        return {**scores, "auroc": float(roc_auc_score(y_test == present[1], full[:, 1]))}
    return {**scores, "auroc": float(roc_auc_score(y_test, full, multi_class="ovr", labels=present))}


def control_train_accuracy(module, datamodule) -> torch.Tensor:
    """[n_layers] float64: the control probe's accuracy on the train split's control labels."""
    correct, n = 0, 0
    with torch.no_grad():
        for batch in datamodule.train_dataloader():
            logits = module.control_probe(batch["x"].to(module.device))  # [b, n_layers, C]
            correct = correct + (logits.argmax(-1).cpu() == batch["y_control"][:, None]).sum(0)
            n += len(batch["y_control"])
    return correct.double() / n


def _control_labels(datamodule, split: str) -> torch.Tensor:
    """[n] int64: the control-task labels of a split's rows."""
    return torch.cat([batch["y_control"] for batch in datamodule._loader(split, shuffle=False)])


def control_majority_baseline(datamodule) -> float:
    """Share of test rows whose control label is the train split's most frequent control label (ties: lowest).

    The control task's own no-information level: one label per type concentrates the control labels when a few
    types are frequent, so a probe that learns nothing scores this, not `majority_baseline`, on it."""
    train, test = _control_labels(datamodule, "train"), _control_labels(datamodule, "test")
    majority = int(torch.bincount(train).argmax())
    return float((test == majority).double().mean())


def probe_report(trainer: L.Trainer, module, datamodule, checkpoint: str) -> dict:
    trainer.validate(module, datamodule=datamodule, verbose=False)
    val_accuracy = module.last_metrics["val"]["acc"]  # [n_layers]: chooses best_layer, never reported as a result
    trainer.test(module, datamodule=datamodule, verbose=False)
    ours = module.last_metrics["test"]
    control_train = control_train_accuracy(module, datamodule)
    control_baseline = control_majority_baseline(datamodule)
    rows = []
    for slot, layer in enumerate(module.layers):
        x_train, y_train = datamodule.split_features("train", slot)
        x_test, y_test = datamodule.split_features("test", slot)
        sk = sklearn_layer_scores(x_train.double().numpy(), y_train.numpy(), x_test.double().numpy(),
                                  y_test.numpy(), len(module.class_names))  # fmt: skip
        rows.append({
            "layer": layer,
            "accuracy": float(ours["acc"][slot]),
            "balanced_accuracy": float(ours["balanced_acc"][slot]),
            "auroc": float(ours["auroc"][slot]),
            "control_accuracy": float(ours["control_acc"][slot]),
            "control_train_accuracy": float(control_train[slot]),
            "selectivity": float(ours["selectivity"][slot]),
            "excess_selectivity": float(ours["acc"][slot] - ours["majority_baseline"]
                                        - (ours["control_acc"][slot] - control_baseline)),
            **{f"sklearn_{name}": value for name, value in sk.items()},
        })  # fmt: skip
    n_seen, n_test = datamodule.control_type_coverage["test"]
    return {
        "checkpoint": str(checkpoint),
        "backbone": datamodule.backbone.name_or_path,
        "label": datamodule.label,
        "class_names": module.class_names,
        "split": "test",
        "n_train": len(datamodule.datasets["train"]),
        "n_test": len(datamodule.datasets["test"]),
        "majority_baseline": float(ours["majority_baseline"]),
        "control_majority_baseline": control_baseline,
        "uniform_chance": 1.0 / len(module.class_names),
        "absent_classes": [module.class_names[k] for k in ours["absent_classes"]],
        "control_type": QUESTION_TYPE,
        "control_type_coverage": n_seen / max(n_test, 1),
        "n_test_control_type_seen": n_seen,
        "layers": rows,
        # chosen on val, reported on test: the test split takes no part in choosing it
        "best_layer": {**rows[int(val_accuracy.argmax())], "chosen_on": "val",
                       "val_accuracy": float(val_accuracy.max())},
    }


def write_probe_report(report: dict, output_dir: Path) -> dict[str, Path]:
    layers = [row["layer"] for row in report["layers"]]
    curves = {key: [row[key] for row in report["layers"]]
              for key in ("accuracy", "balanced_accuracy", "sklearn_accuracy", "control_accuracy")}  # fmt: skip
    curves["majority baseline"] = [report["majority_baseline"]] * len(layers)
    fig = plot_layer_curves(
        layers, curves, ylabel="test accuracy", title=f"{report['backbone']}: {report['label']} probes"
    )
    paths = write_report_files(report, output_dir, RESULTS_FILE, fig, "probe_accuracy.png")
    table = Table(
        title=f"Probe test accuracy per layer ({report['label']}, n_test={report['n_test']}, "
        f"majority baseline {report['majority_baseline']:.3f}, control-type coverage "
        f"{report['control_type_coverage']:.2f})"
    )
    columns = {
        "acc": "accuracy", "bal acc": "balanced_accuracy", "auroc": "auroc", "ctrl acc": "control_accuracy",
        "ctrl train": "control_train_accuracy", "select.": "selectivity", "sk acc": "sklearn_accuracy",
        "sk bal acc": "sklearn_balanced_accuracy", "sk auroc": "sklearn_auroc",
    }  # fmt: skip
    for column in ("layer", *columns):
        table.add_column(column, justify="right")
    for row in report["layers"]:
        table.add_row(str(row["layer"]), *(f"{row[key]:.3f}" for key in columns.values()))
    Console().print(table)
    return paths
