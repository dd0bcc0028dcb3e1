"""Weighted sampling without replacement by the exponential race (successive-sampling law, p ∝ w).

``key_i = log(w_i) - log(E_i)`` with ``E_i ~ Exp(1)``; the k largest keys are a draw of k items without
replacement where each next item is chosen with probability proportional to its weight among those left. Zero
weights get key -inf and are taken only when fewer than k weights are positive.

Weights below the smallest normal fp32 (2**-126, subnormals) count as zero on every backend: GPU ``logf`` flushes
subnormals to zero, so only this definition lets the backends agree.
"""

from __future__ import annotations

import torch

# Smallest uniform the race accepts: keeps E = -log1p(-u) strictly positive so no key becomes +inf.
_UNIFORM_FLOOR = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Smallest weight with a finite key: the smallest normal fp32. Subnormal weights count as zero (see above).
SMALLEST_WEIGHT = 2.0**-126


def race_keys(weights: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """One key per weight; larger keys win. ``dtype`` is float64 for meta-batches, float32 for pruning over n."""
    uniform = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=dtype)
    uniform.clamp_(min=_UNIFORM_FLOOR[dtype])
    exponential = torch.log1p(-uniform).neg_()
    weights = weights.to(dtype)
    keys = torch.log(weights) - torch.log(exponential)
    # NaN and negative weights (reachable only with value checks off) must never be preferred: sorts rank NaN first.
    return torch.where(weights >= SMALLEST_WEIGHT, keys, float("-inf"))


def race_select(weights: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Positions (ascending, int64) of k of the ``weights.numel()`` items, drawn without replacement ∝ weights.

    Ties (in practice only among zero weights) go to the lower position: a stable descending sort keeps order.
    """
    keys = race_keys(weights, generator, torch.float64)
    order = torch.sort(keys, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def prune_select(weights: torch.Tensor, keep: int, generator: torch.Generator | None) -> torch.Tensor:
    """Sample ids (ascending, int64) of ``keep`` of n samples drawn without replacement ∝ weights.

    Works for n far above 2**24, where ``torch.multinomial`` refuses; fp32 keys keep memory at about 12 bytes per
    sample for the keys and the top-k. Ties at the smallest kept key (in practice zero, NaN or negative weights,
    all keyed -inf) go to the lowest ids, as in ``race_select`` and the extension; ``torch.topk`` alone breaks them
    arbitrarily.
    """
    return largest_keys(race_keys(weights, generator, torch.float32), keep)


def largest_keys(keys: torch.Tensor, keep: int) -> torch.Tensor:
    """Ids (ascending, int64) of the ``keep`` largest keys, ties at the smallest kept key to the lowest ids: the
    pruning draw of every backend that computes its keys first (the reference and Triton).

    Costs two host syncs on a GPU (the ``nonzero`` calls; pruning runs once an epoch) and 8 bytes per key tied at
    the threshold, which is many only when most weights are zero and ``keep`` exceeds the positive ones.
    """
    if keep == 0:
        return torch.empty(0, dtype=torch.int64, device=keys.device)
    threshold = torch.topk(keys, keep, sorted=False).values.min()
    above = torch.nonzero(keys > threshold).squeeze(1)
    tied = torch.nonzero(keys == threshold).squeeze(1)[: keep - above.numel()]
    return torch.sort(torch.cat([above, tied])).values
