"""Heads for self-training, and the linear probe that scores features against a truth.

The head maps an embedding to k logits: linear, or an MLP with one hidden layer whose
activations are the re-embedding used by DeepCluster-style rounds (Caron et al., "Deep
Clustering for Unsupervised Learning of Visual Features", ECCV 2018). The probe is
softmax regression fitted on one split of (features, class) and scored on another.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def make_head(dim: int, k: int, kind: str = "mlp", hidden: int = 256) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Linear(dim, k))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, k))
    raise ValueError(f"head must be linear or mlp, got {kind!r}")


def head_features(head: nn.Module, x: np.ndarray, batch: int = 65536) -> np.ndarray:
    """The head's representation of x (n, d): the hidden layer for an MLP, else logits."""
    body = head[:-1] if len(head) > 1 else head
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out.append(body(torch.from_numpy(np.asarray(x[start : start + batch], np.float32))))
    return torch.cat(out).numpy()


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    steps: int = 300,
    seed: int = 0,
) -> float:
    """Accuracy on (test_x, test_y) of softmax regression fitted on the train split.

    Features are standardised with the train split's statistics; full-batch L-BFGS.
    """
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xt = torch.from_numpy(((train_x - mean) / std).astype(np.float32))
    xs = torch.from_numpy(((test_x - mean) / std).astype(np.float32))
    classes = int(max(train_y.max(), test_y.max())) + 1
    model = nn.Linear(xt.shape[1], classes)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    yt = torch.from_numpy(np.asarray(train_y, np.int64))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt) + 1e-4 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = model(xs).argmax(1).numpy()
    return float((pred == np.asarray(test_y)).mean())
