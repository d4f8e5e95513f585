"""All-layer probes: forward, metrics and training pinned against closed forms and scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from datamodules.tensors import TensorProbeDataModule, control_task_labels
from interp.errors import UserError
from lightning_modules.probes import LayerProbeModule, LinearProbe, train_layer_probes


def test_linear_probe_is_one_standardized_affine_map_per_layer():
    torch.manual_seed(0)
    probe = LinearProbe(n_layers=3, d_model=5, num_classes=4)
    torch.nn.init.normal_(probe.weight)
    torch.nn.init.normal_(probe.bias)
    mean, std = torch.randn(3, 5), torch.rand(3, 5) + 0.5
    probe.set_standardization(mean, std)
    x = torch.randn(7, 3, 5)
    out = probe(x)
    for layer in range(3):
        z = (x[:, layer] - mean[layer]) / std[layer]
        torch.testing.assert_close(out[:, layer], z @ probe.weight[layer] + probe.bias[layer])


def identity_probe_module(layers, class_names) -> LayerProbeModule:
    """A built module whose probes return their input: x [n, n_layers, C] -> logits = x (to feed chosen logits)."""
    module = LayerProbeModule()
    module._build({"layers": layers, "d_model": len(class_names), "class_names": class_names})
    with torch.no_grad():
        for probe in (module.probe, module.control_probe):
            probe.weight.copy_(torch.eye(len(class_names)).expand(len(layers), -1, -1))
    return module


def run_validation(module: LayerProbeModule, logits: torch.Tensor, y: torch.Tensor, sizes=None) -> dict:
    """Feed logits [n, n_layers, C] and labels [n] through validation_step in batches; the epoch's metrics."""
    for chunk in torch.split(torch.arange(len(y)), sizes or [len(y)]):
        module.validation_step({"x": logits[chunk], "y": y[chunk], "y_control": y[chunk]}, 0)
    module.on_validation_epoch_end()
    return module.last_metrics["val"]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_per_layer_metrics_equal_sklearn():
    torch.manual_seed(1)
    module = identity_probe_module(layers=[3, 8], class_names=["a", "b"])
    logits = torch.randn(50, 2, 2)
    y = torch.randint(0, 2, (50,))
    metrics = run_validation(module, logits, y, sizes=[20, 30])  # two "batches"
    for slot in range(2):
        probs = logits[:, slot].double().softmax(-1).numpy()
        # float64 scores of float32 logits: the only rounding is float64's (~1e-16 per operation)
        assert float(metrics["acc"][slot]) == pytest.approx(accuracy_score(y, probs.argmax(-1)), abs=1e-12)
        assert float(metrics["auroc"][slot]) == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)
    assert metrics["absent_classes"] == []


def _planted(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, d, generator=g)
    x[:, 1, 0] += 2.0 * (2 * y - 1)  # layer 1: informative
    x[:, 2] = x[:, 2] * 50 + 7  # layer 2: informative at a very different scale
    x[:, 2, 3] += 100.0 * (2 * y - 1)
    return x, y


def test_train_layer_probes_finds_planted_signal_like_sklearn():
    x, y = _planted()
    ours = train_layer_probes(x, y, num_classes=2, max_epochs=40, seed=0)
    dm = TensorProbeDataModule(x, y, 2, seed=0)
    train, val = dm.splits["train"], dm.splits["val"]
    reference = []
    for layer in range(3):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[train, layer], y[train])
        reference.append(clf.score(x[val, layer], y[val]))
    assert ours.shape == (3,)
    assert float(ours[0]) < 0.65 and reference[0] < 0.65  # no signal: near chance
    assert float(ours[1]) > 0.9 and float(ours[2]) > 0.9
    np.testing.assert_allclose(ours.numpy(), reference, atol=0.06)


def test_control_task_labels_are_per_type_with_the_task_distribution():
    labels = torch.tensor([0] * 3000 + [1] * 1000)
    types = (torch.arange(4000) // 2).tolist()  # pairs share a type: 2000 types
    train = torch.ones(4000, dtype=torch.bool)
    control = control_task_labels(labels, types, train, seed=3)
    assert torch.equal(control[0::2], control[1::2])
    # each type's label is a draw from the train distribution (25% ones): 4 binomial sd over 2000 types = 0.039
    assert abs(control[0::2].float().mean() - 0.25) < 4 * (0.25 * 0.75 / 2000) ** 0.5
    assert torch.equal(control, control_task_labels(labels, types, train, seed=3))
    assert not torch.equal(control, control_task_labels(labels, types, train, seed=4))


def test_tensor_datamodule_rejects_bad_shapes():
    with pytest.raises(UserError, match="n_layers"):
        TensorProbeDataModule(torch.zeros(10, 4), torch.zeros(10), 2)
