"""Per-sample cross-entropy in fp32: the oracle every backend's loss is compared against."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MixupTargets(NamedTuple):
    """Targets of a mixed batch: ``lam * CE(y_a) + (1 - lam) * CE(y_b)`` per sample."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float


def per_sample_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor | MixupTargets,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """fp32 losses of shape (B,), whatever the logits' dtype.

    ``targets`` is int64 labels (B,), dense soft targets (B, C), or :class:`MixupTargets`. Label smoothing follows
    ``torch.nn.functional.cross_entropy``: mass ``label_smoothing / C`` moves to every class.
    """
    logits32 = logits.float()
    if isinstance(targets, MixupTargets):
        loss_a = F.cross_entropy(logits32, targets.y_a, reduction="none", label_smoothing=label_smoothing)
        loss_b = F.cross_entropy(logits32, targets.y_b, reduction="none", label_smoothing=label_smoothing)
        return targets.lam * loss_a + (1.0 - targets.lam) * loss_b
    if targets.is_floating_point():
        targets = targets.float()
    return F.cross_entropy(logits32, targets, reduction="none", label_smoothing=label_smoothing)
