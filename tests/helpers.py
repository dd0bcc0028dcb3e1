"""Shared test tools: loss tolerances per logits dtype, exact successive-sampling laws, the chi-square check."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from scipy import stats

# Per-sample losses from logits of each dtype, against the fp32 reference computed from the *same* (already
# rounded) logits: the kernels accumulate in fp32, so the gap is summation order only.
LOSS_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-4, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1e-4, "atol": 1e-4},
}

# A correct sampler fails a single chi-square test with this probability; small enough never to flake in CI.
CHI_SQUARE_ALPHA = 1e-4


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


def subset_chi_square_pvalue(draw: Callable[[], torch.Tensor], weights: list[float], k: int, draws: int) -> float:
    """p-value of a chi-square goodness-of-fit test of ``draws`` calls of ``draw()`` (each returning k ascending
    positions) against the exact law over k-subsets. Subsets with probability 0 must never be drawn."""
    law = exact_subset_probabilities(weights, k)
    counts = dict.fromkeys(law, 0)
    for _ in range(draws):
        subset = tuple(draw().tolist())
        assert subset in counts, f"drew {subset}, which is not a k-subset"
        counts[subset] += 1
    impossible = [s for s, p in law.items() if p == 0.0 and counts[s] > 0]
    assert not impossible, f"drew subsets of probability 0: {impossible}"
    possible = [s for s, p in law.items() if p > 0.0]
    observed = [counts[s] for s in possible]
    expected = [law[s] * draws for s in possible]
    return float(stats.chisquare(observed, expected).pvalue)


def extension_unavailable_reason(device: str = "cpu") -> str | None:
    """Why the C++ extension cannot run on ``device`` (None if it can). With ES_KERNELS_REQUIRE_EXTENSION=1 (CI)
    an unavailable extension is an error, so its tests cannot be skipped silently."""
    from es_kernels._build import env_flag
    from es_kernels.extension import unavailable_reason

    reason = unavailable_reason(torch.device(device))
    if reason is not None and env_flag("ES_KERNELS_REQUIRE_EXTENSION"):
        raise RuntimeError(f"ES_KERNELS_REQUIRE_EXTENSION=1 but the extension is unavailable: {reason}")
    return reason
