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


def test_per_layer_metrics_equal_sklearn():
    torch.manual_seed(1)
    module = LayerProbeModule()
    module._build(layers=[3, 8], d_model=4, class_names=["a", "b"])
    logits = torch.randn(50, 2, 2)
    y = torch.randint(0, 2, (50,))
    for chunk in torch.split(torch.arange(50), [20, 30]):  # two "batches"
        module.metrics["val"]["acc"].update(logits[chunk], y[chunk, None].expand(-1, 2))
        module.metrics["val"]["auroc"].update(logits[chunk].softmax(-1), y[chunk, None].expand(-1, 2))
    acc = torch.stack(list(module.metrics["val"]["acc"].compute()))
    auroc = torch.stack(list(module.metrics["val"]["auroc"].compute()))
    for slot in range(2):
        assert float(acc[slot]) == pytest.approx(accuracy_score(y, logits[:, slot].argmax(-1)), abs=1e-6)
        assert float(auroc[slot]) == pytest.approx(roc_auc_score(y, logits[:, slot].softmax(-1)[:, 1]), abs=1e-6)


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


def test_control_task_labels_are_per_group_with_the_task_distribution():
    labels = torch.tensor([0] * 300 + [1] * 100)
    groups = torch.arange(400) // 2  # pairs share a group
    train = torch.ones(400, dtype=torch.bool)
    control = control_task_labels(labels, groups, train, seed=3)
    assert torch.equal(control[0::2], control[1::2])
    assert 0.15 < control.float().mean() < 0.35  # ~25% ones, like the task
    assert torch.equal(control, control_task_labels(labels, groups, train, seed=3))
    assert not torch.equal(control, control_task_labels(labels, groups, train, seed=4))


def test_tensor_datamodule_rejects_bad_shapes():
    with pytest.raises(UserError, match="n_layers"):
        TensorProbeDataModule(torch.zeros(10, 4), torch.zeros(10), 2)
