"""The one place random streams are derived from a user's base seed: per epoch, per purpose, per rank.

Two kinds of stream, each a fixed formula (changing one changes every run's draws):

* per-epoch streams, the same on every rank (the sampler's pruning and shuffling must agree across ranks):
  ``(base * EPOCH_STRIDE + epoch) * PURPOSES + purpose``;
* long-lived per-rank streams (the selection draws of a training run; augmentation): ``base + RANK_STRIDE * rank``,
  so rank 0 keeps ``base`` and ranks never share race noise.

The strides are primes far apart, which keeps the streams of nearby base seeds, epochs and ranks distinct.
"""

from __future__ import annotations

EPOCH_STRIDE = 1_000_003
RANK_STRIDE = 7_919_993
PURPOSE_PRUNE = 0
PURPOSE_SHUFFLE = 1
PURPOSES = 2


def epoch_seed(base: int, epoch: int, purpose: int) -> int:
    """Seed of the ``purpose`` stream of ``epoch``, identical on every rank."""
    if not 0 <= purpose < PURPOSES:
        raise ValueError(f"purpose must be in [0, {PURPOSES}), got {purpose}")
    return (base * EPOCH_STRIDE + epoch) * PURPOSES + purpose


def rank_seed(base: int, rank: int) -> int:
    """Seed of a rank's long-lived stream; distinct for every rank, ``base`` itself on rank 0."""
    return base + RANK_STRIDE * rank
