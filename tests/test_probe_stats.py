"""Probe statistics: AUROC over present classes, balanced accuracy, majority baseline, grouped splits and the
Hewitt & Liang control task, each pinned against scikit-learn, a closed form or a planted ground truth."""

import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from test_probes import identity_probe_module, run_validation

import datamodules.tensors as tensors  # module import: each test, not the file, fails on code without a name
from datamodules.tensors import TensorProbeDataModule, control_task_labels
from lightning_modules.probes import LayerProbeModule, train_layer_probes

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _softmax64(logits: torch.Tensor) -> np.ndarray:
    return logits.double().softmax(-1).numpy()


# ---- 6. macro AUROC over the classes present in the evaluated split ----------------------------------------------
@pytest.mark.parametrize("num_classes", [3, 4])
def test_macro_auroc_averages_only_present_classes_like_sklearn(num_classes):
    g = torch.Generator().manual_seed(num_classes)
    n, absent = 120, 1
    present = [k for k in range(num_classes) if k != absent]
    y = torch.tensor(present)[torch.randint(0, len(present), (n,), generator=g)]  # class 1 never occurs
    logits = torch.randn(n, 2, num_classes, generator=g)
    logits[:, 0, :] += 1.5 * torch.nn.functional.one_hot(y, num_classes)  # layer 0 informative, layer 1 noise
    metrics = run_validation(identity_probe_module([0, 1], [f"c{k}" for k in range(num_classes)]), logits, y)
    for slot in range(2):
        # scikit-learn needs probabilities over the present classes that sum to 1: softmax over their logits
        probs = _softmax64(logits[:, slot, present])
        if len(present) == 2:
            expected = roc_auc_score(y == present[1], probs[:, 1])
        else:
            expected = roc_auc_score(y, probs, multi_class="ovr", labels=present)
        # ours is float64 rank arithmetic on the same float64 probabilities; the old code averaged in a 0 (or
        # scored on the unrestricted softmax in float32) and differs by >= 0.1 here
        assert float(metrics["auroc"][slot]) == pytest.approx(expected, abs=1e-12)
    assert metrics["absent_classes"] == [absent]


def test_auroc_is_nan_with_a_single_present_class():
    metrics = run_validation(identity_probe_module([0], ["a", "b", "c"]), torch.randn(10, 1, 3), torch.full((10,), 2))
    assert torch.isnan(metrics["auroc"]).all() and metrics["absent_classes"] == [0, 1, 2]


# ---- 7. balanced accuracy and the majority-class baseline -------------------------------------------------------
def test_balanced_accuracy_equals_sklearn_also_when_an_absent_class_is_predicted():
    g = torch.Generator().manual_seed(7)
    y = torch.tensor([0] * 50 + [2] * 10)  # imbalanced; class 1 absent from the split
    logits = torch.randn(60, 3, 3, generator=g)
    logits[:, 2, 1] += 5.0  # layer 2 predicts the absent class 1 most of the time
    metrics = run_validation(identity_probe_module([0, 1, 2], ["a", "b", "c"]), logits, y, sizes=[25, 35])
    for slot in range(3):
        predicted = logits[:, slot].argmax(-1).numpy()
        assert float(metrics["balanced_acc"][slot]) == pytest.approx(balanced_accuracy_score(y, predicted), abs=1e-12)


def test_majority_baseline_uses_the_train_majority_class():
    module = identity_probe_module([0], ["a", "b", "c"])
    module.train_class_counts = torch.tensor([5, 9, 9])  # tie between 1 and 2: the lower index, 1
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)  # the split's own majority (0) is not the baseline's class
    metrics = run_validation(module, torch.randn(10, 1, 3), y)
    assert float(metrics["majority_baseline"]) == pytest.approx(3 / 10, abs=1e-15)


def test_fit_wires_the_datamodule_train_counts_into_the_baseline():
    g = torch.Generator().manual_seed(0)
    labels = torch.multinomial(torch.tensor([0.2, 0.5, 0.3]), 200, replacement=True, generator=g)
    dm = TensorProbeDataModule(torch.randn(200, 1, 4, generator=g), labels, 3, val_fraction=0.3, seed=0)
    module = _fit(dm, max_epochs=1)
    train, val = dm.splits["train"], dm.splits["val"]
    majority = int(torch.bincount(labels[train], minlength=3).argmax())
    expected = (labels[val] == majority).double().mean()
    assert float(module.last_metrics["val"]["majority_baseline"]) == pytest.approx(float(expected), abs=1e-15)


def _fit(dm, max_epochs: int, seed: int = 0) -> LayerProbeModule:
    L.seed_everything(seed, verbose=False)
    module = LayerProbeModule()
    L.Trainer(
        max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
        check_val_every_n_epoch=max_epochs,
    ).fit(module, datamodule=dm)  # fmt: skip
    return module


# ---- 5. grouped splits -----------------------------------------------------------------------------------------
def _paired_noise(n_problems=300, d=800, seed=0):
    """The audit's case: 2 nearly identical rows per problem, a noise label constant within a problem, d > n."""
    g = torch.Generator().manual_seed(seed)
    problem = torch.randn(n_problems, d, generator=g)
    x = problem.repeat_interleave(2, 0) + 0.01 * torch.randn(2 * n_problems, d, generator=g)  # [n, d]
    y = torch.randint(0, 2, (n_problems,), generator=g).repeat_interleave(2)
    return x[:, None, :], y, torch.arange(n_problems).repeat_interleave(2)


def test_group_split_keeps_every_group_on_one_side():
    x, y, groups = _paired_noise(n_problems=50, d=3)
    dm = TensorProbeDataModule(x, y, 2, val_fraction=0.2, groups=groups)
    val_groups = set(groups[dm.splits["val"]].tolist())
    assert val_groups.isdisjoint(groups[dm.splits["train"]].tolist()) and len(val_groups) == 10


def test_grouped_split_removes_the_pair_leak():
    x, y, groups = _paired_noise()
    grouped = float(train_layer_probes(x, y, 2, groups=groups, max_epochs=30)[0])
    row_wise = float(train_layer_probes(x, y, 2, max_epochs=30)[0])
    # grouped: 60 held-out problems, a label independent of x, both rows of a problem predicted alike, so
    # accuracy ~ Binomial(60, 1/2) / 60: 4 sd = 4 * 0.5 / sqrt(60) = 0.26
    assert abs(grouped - 0.5) < 4 * 0.5 / 60**0.5
    assert row_wise > 0.85  # the documented leak: the twin of a held-out row was trained on


# ---- 4. control task: labels a fixed function of a type that recurs across splits -------------------------------
def test_question_type_is_the_first_word_lower_cased():
    assert tensors.question_type("John has 3 apples.") == "john"
    assert tensors.question_type("  What's 2+2?") == "what"
    assert tensors.question_type("$\\frac{1}{2}$ of 10 is?") == "frac"
    assert tensors.question_type("Élodie buys...") == "élodie"
    assert tensors.question_type("?!") == ""


def test_control_labels_are_a_stable_hash_of_the_type():
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    types = ["what", "find", "what", "let", "find", "new"]
    train = torch.tensor([True, True, True, True, False, False])
    control = control_task_labels(labels, types, train, seed=5)
    assert control[0] == control[2] and control[1] == control[4]  # a type keeps its label across splits
    assert tensors.control_type_seen(types, train).tolist() == [True, True, True, True, True, False]
    # Python's hash() of a str changes with PYTHONHASHSEED; the control labels must not
    code = (
        "import torch; from datamodules.tensors import control_task_labels; "
        f"print(control_task_labels(torch.tensor({labels.tolist()}), {types}, torch.tensor({train.tolist()}), 5).tolist())"
    )
    hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # another salt than this process's
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(control.tolist())


def _typed_data(n_problems=300, n_types=30, seed=0):
    """Layer 0 encodes the problem's type (one-hot + noise), layer 1 is noise; the task label ignores the type."""
    g = torch.Generator().manual_seed(seed)
    problem_type = torch.randint(0, n_types, (n_problems,), generator=g)
    types = problem_type.repeat_interleave(2)  # both prompts of a problem share its type
    x = 0.1 * torch.randn(2 * n_problems, 2, n_types, generator=g)  # [n, n_layers, d]
    x[:, 0] += torch.nn.functional.one_hot(types, n_types)
    y = torch.randint(0, 2, (2 * n_problems,), generator=g)
    return x, y, torch.arange(n_problems).repeat_interleave(2), types


def test_control_probe_beats_chance_only_where_the_type_is_encoded():
    x, y, groups, types = _typed_data()
    dm = TensorProbeDataModule(x, y, 2, val_fraction=0.3, groups=groups, control_types=types)
    val = dm.splits["val"]
    y_control_val = dm.datasets["val"].tensors[2]
    # every held-out type was seen in train (30 types, 210 train problems), counted independently here
    seen = torch.isin(types[val], types[dm.splits["train"]])
    assert dm.control_type_coverage["val"] == (int(seen.sum()), int(val.sum())) == (180, 180)
    majority_share = float(torch.bincount(y_control_val).max()) / len(y_control_val)
    assert majority_share < 0.7  # the held-out control labels are not nearly constant (a precondition)
    control = _fit(dm, max_epochs=40).last_metrics["val"]["control_acc"]
    assert float(control[0]) > 0.85  # type encoded: type -> label learned on train transfers to held-out rows
    # type not encoded: no better than the best constant guess (plus a margin for 30 types' worth of noise)
    assert float(control[1]) < majority_share + 0.1


def test_binary_auroc_uses_the_margin_and_survives_saturated_logits():
    """Two present classes: the AUROC of the logit margin, equal to sklearn's on unsaturated scores and still
    exact where softmax would round both rows to probability 1.0."""
    from sklearn.metrics import roc_auc_score

    from interp.probe_metrics import layer_macro_auroc

    logits = torch.tensor([[[0.0, 40.0]], [[0.0, 41.0]], [[0.0, -1.0]], [[0.0, 42.0]]], dtype=torch.float64)
    y = torch.tensor([1, 1, 0, 0])
    auroc = layer_macro_auroc(logits, y, [0, 1])
    margin = (logits[:, 0, 1] - logits[:, 0, 0]).numpy()
    assert float(auroc[0]) == roc_auc_score(y.numpy(), margin) == 0.5
    saturated = logits.float().softmax(-1)[:, 0, 1]  # 40, 41 and 42 all round to 1.0 in float32
    assert roc_auc_score(y.numpy(), saturated.numpy()) == 0.75  # ties a probability-based score cannot break


def test_one_row_split_is_scored():
    from interp.probe_metrics import layer_accuracy, layer_balanced_accuracy, present_classes

    logits, y = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), torch.tensor(1)  # one row, 0-dim label
    assert present_classes(y, 2) == []
    assert layer_accuracy(logits, y).tolist() == [1.0, 0.0]
    assert layer_balanced_accuracy(logits, y).tolist() == [1.0, 0.0]
