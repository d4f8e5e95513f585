"""Per-layer scores of linear probes from their logits: accuracy, balanced accuracy, macro AUROC.

Plain torch, float64, no Lightning: `lightning_modules.probes.LayerProbeModule` calls these at the end of an
evaluation epoch on every row of the split; tests pin them against scikit-learn.
"""

from __future__ import annotations

import torch


def layer_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of rows whose argmax class is y, per layer: logits [n, n_layers, C], y [n] -> [n_layers] float64."""
    return (logits.argmax(-1) == y.reshape(-1, 1)).double().mean(0)


def layer_balanced_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present in y of the recall (share of that class's rows predicted as it), per layer:
    logits [n, n_layers, C], y [n] -> [n_layers] float64. Classes absent from y are left out (as scikit-learn's
    balanced_accuracy_score does), also when the probe predicts them."""
    pred, y = logits.argmax(-1), y.reshape(-1)  # [n, n_layers], [n] (a one-row split may arrive 0-dim)
    recalls = [(pred[y == k] == k).double().mean(0) for k in torch.unique(y).tolist()]  # each [n_layers]
    return torch.stack(recalls).mean(0)


def present_classes(y: torch.Tensor, num_classes: int) -> list[int]:
    """Classes with at least one positive and one negative row in y [n]."""
    counts = torch.bincount(y.reshape(-1), minlength=num_classes)
    return [k for k in range(num_classes) if 0 < int(counts[k]) < y.numel()]


def binary_auroc(score: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AUROC = P(score of a positive > score of a negative) + P(tie) / 2, from average ranks (Mann-Whitney U).
    score [n] float64, positive [n] bool with both values present -> 0-dim float64."""
    _, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    average_rank = (counts.cumsum(0) - (counts - 1) / 2).double()  # 1-based mean rank of each distinct score
    n_pos = int(positive.sum())
    n_neg = len(score) - n_pos
    return (average_rank[inverse][positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def layer_macro_auroc(logits: torch.Tensor, y: torch.Tensor, present: list[int]) -> torch.Tensor:
    """Macro one-vs-rest AUROC over the `present` classes, per layer: logits [n, n_layers, C], y [n] ->
    [n_layers] float64 (NaN with fewer than 2 present classes). Scores are the softmax over the present
    classes' logits (the probe's probabilities restricted to them and renormalised), as scikit-learn's
    roc_auc_score(y, p, multi_class="ovr", labels=present) needs; each class's AUROC is that of its score. With two
    present classes both AUROCs equal that of the logit margin z_b - z_a, which is used (exact, no softmax ties)."""
    y = y.reshape(-1)
    if len(present) < 2:
        return torch.full((logits.shape[1],), float("nan"), dtype=torch.float64)
    if len(present) == 2:  # the logit margin ranks rows like either class's probability, without saturating at 1.0
        margin = logits[..., present[1]].double() - logits[..., present[0]].double()  # [n, n_layers]
        return torch.stack([binary_auroc(margin[:, layer], y == present[1]) for layer in range(logits.shape[1])])
    probs = logits[..., present].double().softmax(-1)  # [n, n_layers, P]
    per_class = [
        torch.stack([binary_auroc(probs[:, layer, j], y == k) for layer in range(logits.shape[1])])
        for j, k in enumerate(present)
    ]  # fmt: skip
    return torch.stack(per_class).mean(0)
