"""The decoupled EMA update of Algorithm 1, in the exact fp32 rounding order every backend must reproduce."""

from __future__ import annotations

import torch


def ema_update_(
    score: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    losses: torch.Tensor,
    beta1: float,
    beta2: float,
) -> None:
    """``w[i] = b1*s_old[i] + (1-b1)*l`` then ``s[i] = b2*s_old[i] + (1-b2)*l``, in place, for ``i`` in indices.

    Each product is rounded to fp32 before the sum (no fused multiply-add), with ``1 - b`` computed in double and
    rounded once; kernels reproduce that order so states agree bit for bit.
    """
    score_old = score[indices]
    losses32 = losses.to(torch.float32)
    weight[indices] = score_old * beta1 + losses32 * (1.0 - beta1)
    score[indices] = score_old * beta2 + losses32 * (1.0 - beta2)
