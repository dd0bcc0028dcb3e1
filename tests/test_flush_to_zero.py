"""Weights below the smallest normal fp32 (2**-126) count as zero on every backend (GPU logf flushes subnormals).

The Triton backend's copy of this check runs under the interpreter in tests/test_triton_kernels.py.
"""

import pytest
import torch

from es_kernels import EvolvedState, backend_status, evolved_select, reference

SUBNORMAL = 1e-40  # a positive fp32 subnormal
SMALLEST_NORMAL = 2.0**-126


def subnormal_draw(backend):
    """k = 2 of [zero, subnormal, small normal] weights: the small normal, then the lower-position tie at -inf.
    Were the subnormal weight positive, it would beat the zero (position 0) instead."""
    state = EvolvedState(3, beta1=0.5, beta2=0.5)
    state.score.zero_()
    losses = torch.tensor([0.0, 2 * SUBNORMAL, 4 * SMALLEST_NORMAL])  # weights 0.5 * loss: 0, 1e-40, 2**-125
    chosen = evolved_select(state, torch.arange(3), 2, losses=losses, backend=backend)
    assert state.weight[1] == pytest.approx(SUBNORMAL, rel=1e-3) and state.weight[1] < SMALLEST_NORMAL
    return chosen.tolist()


def test_reference_keys_treat_subnormal_weights_as_zero():
    weights = torch.tensor([SUBNORMAL, SMALLEST_NORMAL, 0.0, -1.0, float("nan"), 1.0])
    for dtype in (torch.float32, torch.float64):
        keys = reference.sampling.race_keys(weights, torch.Generator().manual_seed(0), dtype)
        assert torch.isneginf(keys).tolist() == [True, False, True, True, True, False]


@pytest.mark.parametrize("backend", ["torch", "extension"])
def test_subnormal_weight_loses_like_a_zero(backend):
    reason = backend_status("cpu")[backend]
    if reason != "available":
        pytest.skip(reason)
    for _ in range(5):
        assert subnormal_draw(backend) == [0, 2]


@pytest.mark.parametrize("backend", ["torch", "extension"])
def test_prune_never_keeps_a_subnormal_weight_over_a_normal_one(backend):
    from es_kernels import evolved_prune

    if backend_status("cpu")[backend] != "available":
        pytest.skip(backend_status("cpu")[backend])
    state = EvolvedState(64)
    state.weight.fill_(SUBNORMAL)
    state.weight[::8] = SMALLEST_NORMAL  # 8 normal weights; keys of the rest are -inf, ties to the lowest ids
    kept = evolved_prune(state, 8, generator=torch.Generator().manual_seed(3), backend=backend)
    assert kept.tolist() == list(range(0, 64, 8))
