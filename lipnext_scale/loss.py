"""Training losses: EMMA (LiResNet) and plain cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_pair_distances_from_unit_rows(weight: torch.Tensor) -> torch.Tensor:
    """‖w_i − w_j‖ for unit rows via the Gram matrix (C×C memory rather than C×C×W), differentiable."""
    gram = weight @ weight.t()
    return (2 - 2 * gram).clamp_min(1e-12).sqrt()


def emma_loss(
    logits: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor, eps: float, lipschitz: float = 1.0
) -> torch.Tensor:
    """Cross-entropy after raising each competing logit z_i by its worst case within an adaptive radius.

    Class i can gain at most ε_i·L·‖w_y − w_i‖ on the true class within radius ε_i; ε_i is the current
    margin's radius clipped to [0, ε] and detached (EMMA), so points far from robust are not over-pushed.
    `head_weight` holds the normalised head rows (C, W).
    """
    if eps == 0:  # the ε → 0 limit; dividing by ε·k would give 0/0 = NaN at a tie between logits
        return F.cross_entropy(logits, labels)
    k = lipschitz * head_pair_distances_from_unit_rows(head_weight)[labels]  # (B, C)
    margins = logits.gather(1, labels[:, None]) - logits
    fraction = (margins / (eps * k)).clamp(0, 1).detach()
    raise_by = fraction * eps * k
    raise_by = raise_by.scatter(1, labels[:, None], 0.0)
    return F.cross_entropy(logits + raise_by, labels)


def training_eps(target: float, ramp: tuple[float, float], progress: float) -> float:
    """ε ramped linearly from ramp[0]·target to ramp[1]·target over training (progress in [0, 1])."""
    start, end = ramp
    return target * (start + (end - start) * min(max(progress, 0.0), 1.0))


def classification_loss(
    kind: str, logits: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    if kind == "emma":
        return emma_loss(logits, labels, head_weight, eps)
    if kind == "ce":
        return F.cross_entropy(logits, labels)
    raise ValueError(f"unknown loss {kind!r}; allowed: emma, ce")
