"""What correct means, in one importable place: loss tolerances per logits dtype and the exact laws of a draw.

``python -m es_kernels.selfcheck`` and the test suite both judge a backend by these, so a tolerance or a law is
changed once for both (as torchao keeps its testing utilities in the package). Needs only torch; the chi-square
test imports scipy (the ``test`` extra) when it is called.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

# Per-sample losses from logits of each dtype, against the fp32 reference computed from the *same* (already
# rounded) logits: the kernels accumulate in fp32, so the gap is summation order only.
LOSS_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-4, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1e-4, "atol": 1e-4},
}

# A correct sampler fails a single chi-square test with this probability; small enough never to flake in CI.
CHI_SQUARE_ALPHA = 1e-4

# A correct sampler's frequency leaves p +- this many standard errors about once in 10^8 tries per item.
FREQUENCY_STANDARD_ERRORS = 6.0


def exact_subset_probabilities(weights: list[float], k: int) -> dict[tuple[int, ...], float]:
    """P(the drawn set is S) for every k-subset S under successive sampling ∝ weights, by enumerating orders.

    Zero weights are drawn only once every positive weight is taken, lowest position first (docs/architecture.md §3).
    """
    probabilities: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(len(weights)), k):
        probability, remaining = 1.0, list(range(len(weights)))
        for item in order:
            total = sum(weights[i] for i in remaining)
            if total > 0:
                probability *= weights[item] / total
            elif item != min(remaining):
                probability = 0.0
            remaining.remove(item)
        subset = tuple(sorted(order))
        probabilities[subset] = probabilities.get(subset, 0.0) + probability
    return probabilities


def inclusion_probabilities(weights: list[float], k: int) -> list[float]:
    """P(item i is drawn) under successive sampling, from the exact subset law."""
    inclusion = [0.0] * len(weights)
    for subset, probability in exact_subset_probabilities(weights, k).items():
        for item in subset:
            inclusion[item] += probability
    return inclusion


def frequency_bound(probability: float, draws: int) -> float:
    """How far a correct sampler's inclusion frequency over ``draws`` may stray from ``probability``."""
    return FREQUENCY_STANDARD_ERRORS * math.sqrt(probability * (1 - probability) / draws)


def subset_chi_square_pvalue(draw: Callable[[], torch.Tensor], weights: list[float], k: int, draws: int) -> float:
    """p-value of a chi-square goodness-of-fit test of ``draws`` calls of ``draw()`` (each returning k ascending
    positions) against the exact law over k-subsets. Subsets of probability 0 must never be drawn."""
    from scipy import stats

    law = exact_subset_probabilities(weights, k)
    counts = dict.fromkeys(law, 0)
    for _ in range(draws):
        subset = tuple(draw().tolist())
        if subset not in counts:
            raise AssertionError(f"drew {subset}, which is not a k-subset")
        counts[subset] += 1
    impossible = [s for s, p in law.items() if p == 0.0 and counts[s] > 0]
    if impossible:
        raise AssertionError(f"drew subsets of probability 0: {impossible}")
    possible = [s for s, p in law.items() if p > 0.0]
    observed = [counts[s] for s in possible]
    expected = [law[s] * draws for s in possible]
    return float(stats.chisquare(observed, expected).pvalue)
