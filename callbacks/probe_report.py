"""The probe evaluation report: per-layer test metrics of the trained probes beside scikit-learn.

`probe_report` runs `trainer.test` (torchmetrics accuracy/AUROC per layer, control accuracy, selectivity)
and fits scikit-learn's LogisticRegression on the same cached features (train split -> test split) as an
independent reference. `write_probe_report` writes probe_accuracies.json and
visualizations/probe_accuracy.png and prints a rich table. JSON shape (documented in the README):

    {"checkpoint": str, "backbone": str, "label": str, "class_names": [str], "split": "test",
     "n_train": int, "n_test": int, "chance": float,
     "layers": [{"layer": int, "accuracy": float, "auroc": float, "control_accuracy": float,
                 "selectivity": float, "sklearn_accuracy": float, "sklearn_auroc": float}, ...],
     "best_layer": {same fields as one entry of "layers", highest accuracy}}
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from interp.plots import plot_layer_curves


def sklearn_layer_scores(x_train, y_train, x_test, y_test, num_classes: int, seed: int = 0) -> tuple[float, float]:
    """Accuracy and (macro one-vs-rest) AUROC of a standardized L2 logistic regression."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    classifier.fit(x_train, y_train)
    accuracy = float(classifier.score(x_test, y_test))
    proba = classifier.predict_proba(x_test)
    full = np.zeros((len(y_test), num_classes))
    full[:, classifier.classes_] = proba
    present = np.unique(y_test)
    if len(present) < 2:
        return accuracy, float("nan")
    if num_classes == 2:
        return accuracy, float(roc_auc_score(y_test, full[:, 1]))
    full = full[:, present] / full[:, present].sum(1, keepdims=True).clip(min=1e-12)
    return accuracy, float(roc_auc_score(y_test, full, multi_class="ovr", labels=present))


def probe_report(trainer: L.Trainer, module, datamodule, checkpoint: str) -> dict:
    trainer.test(module, datamodule=datamodule, verbose=False)
    ours = module.last_metrics["test"]
    rows = []
    for slot, layer in enumerate(module.layers):
        x_train, y_train = datamodule.split_features("train", slot)
        x_test, y_test = datamodule.split_features("test", slot)
        sk_acc, sk_auroc = sklearn_layer_scores(
            x_train.double().numpy(), y_train.numpy(), x_test.double().numpy(), y_test.numpy(), module.probe.bias.shape[1]
        )
        rows.append({
            "layer": layer,
            "accuracy": float(ours["acc"][slot]),
            "auroc": float(ours["auroc"][slot]),
            "control_accuracy": float(ours["control_acc"][slot]),
            "selectivity": float(ours["selectivity"][slot]),
            "sklearn_accuracy": sk_acc,
            "sklearn_auroc": sk_auroc,
        })  # fmt: skip
    return {
        "checkpoint": str(checkpoint),
        "backbone": datamodule.backbone.name_or_path,
        "label": datamodule.label,
        "class_names": module.class_names,
        "split": "test",
        "n_train": len(datamodule.datasets["train"]),
        "n_test": len(datamodule.datasets["test"]),
        "chance": 1.0 / len(module.class_names),
        "layers": rows,
        "best_layer": max(rows, key=lambda row: row["accuracy"]),
    }


def write_probe_report(report: dict, output_dir: Path) -> dict[str, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "visualizations").mkdir(exist_ok=True)
    json_path = output_dir / "probe_accuracies.json"
    json_path.write_text(json.dumps(report, indent=2))
    layers = [row["layer"] for row in report["layers"]]
    fig = plot_layer_curves(
        layers,
        {key: [row[key] for row in report["layers"]] for key in ("accuracy", "sklearn_accuracy", "control_accuracy")},
        ylabel="test accuracy",
        title=f"{report['backbone']}: {report['label']} probes",
        chance=report["chance"],
    )
    png_path = output_dir / "visualizations" / "probe_accuracy.png"
    fig.savefig(png_path)
    plt.close(fig)
    table = Table(title=f"Probe test accuracy per layer ({report['label']}, n_test={report['n_test']})")
    for column in ("layer", "acc", "auroc", "control acc", "select.", "sklearn acc", "sklearn auroc"):
        table.add_column(column, justify="right")
    for row in report["layers"]:
        table.add_row(
            str(row["layer"]),
            *(f"{row[k]:.3f}" for k in ("accuracy", "auroc", "control_accuracy", "selectivity", "sklearn_accuracy", "sklearn_auroc")),
        )  # fmt: skip
    Console().print(table)
    return {"json": json_path, "figure": png_path}
