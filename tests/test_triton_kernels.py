"""Triton device functions under the interpreter (tests/conftest.py sets it up): the final radix selection against a
stable sort (up to B = 65,536), subnormal weights, and the row loss / pruning keys on both sides of the
unmasked-block split.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from es_kernels import EvolvedState, evolved_select, reference
from es_kernels.triton import kernels, launch
from es_kernels.triton.kernels import tl

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@kernels._jit
def top_k_kernel(keys_ptr, batch, k, positions_ptr, BLOCK_B: tl.constexpr):
    kernels.select_top_k(keys_ptr, batch, k, positions_ptr, BLOCK_B)


def top_k_positions(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Run select_top_k alone (one program) on fp32 race keys packed as the fused kernel packs them."""
    bits = keys.view(torch.int32).to(torch.int64)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    positions = torch.arange(len(keys), dtype=torch.int64)
    packed = (monotone << 32) | (4294967295 - positions)
    out = torch.full((k,), -1, dtype=torch.int64)
    top_k_kernel[(1,)](packed, len(keys), k, out, BLOCK_B=launch.BLOCK_B)
    return out


def stable_top_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.sort(keys, descending=True, stable=True).indices[:k]).values


def race_like_keys(batch: int, seed: int) -> torch.Tensor:
    """fp32 keys as the race makes them (log w - log E: shared sign/exponent bits), with exact ties and -inf."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(batch, generator=generator) + 0.05
    weights[torch.rand(batch, generator=generator) < 0.1] = 0.0
    keys = reference.sampling.race_keys(weights, generator, torch.float32)
    duplicated = torch.randint(0, batch, (batch // 10,), generator=generator)
    keys[duplicated] = keys[duplicated.flip(0)]  # exact ties among finite keys
    return keys


@pytest.mark.parametrize(("batch", "k"), [(1, 1), (5, 5), (1000, 1), (1000, 333), (3000, 2999), (3000, 1500)])
def test_radix_selection_equals_a_stable_sort(batch, k):
    keys = race_like_keys(batch, seed=batch + k)
    assert torch.equal(top_k_positions(keys, k), stable_top_k(keys, k))


def test_radix_selection_of_all_equal_keys_takes_the_lowest_positions():
    assert top_k_positions(torch.full((2500,), -1.5), 7).tolist() == list(range(7))
    assert top_k_positions(torch.full((2500,), float("-inf")), 3).tolist() == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 16384, 65535])
def test_radix_selection_at_the_largest_meta_batch(k):
    keys = race_like_keys(65536, seed=k)
    assert torch.equal(top_k_positions(keys, k), stable_top_k(keys, k))


def test_subnormal_weights_get_key_minus_infinity():
    values = torch.tensor([1e-40, 2.0**-126, 0.0, 1.0, 2.0**-149])
    keys = launch.prune_keys(values, torch.tensor([5], dtype=torch.int64))
    assert torch.isneginf(keys).tolist() == [True, False, True, False, True]


def test_fused_select_treats_a_subnormal_weight_as_zero():
    state = EvolvedState(3, beta1=0.5, beta2=0.5)
    state.score.zero_()
    losses = torch.tensor([0.0, 2e-40, 2.0**-124])  # weights 0, 1e-40 (subnormal), 2**-125
    chosen = evolved_select(state, torch.arange(3), 2, losses=losses, backend="triton")
    assert chosen.tolist() == [0, 2]


@pytest.mark.parametrize("classes", [launch.BLOCK_C_BY_ITEMSIZE[4], 2 * launch.BLOCK_C_BY_ITEMSIZE[4] + 5, 7])
def test_row_loss_on_both_sides_of_the_unmasked_blocks(classes):
    generator = torch.Generator().manual_seed(classes)
    logits = 100.0 + 3 * torch.randn(3, classes, generator=generator)
    soft = torch.softmax(torch.randn(3, classes, generator=generator), 1)
    for targets in (torch.randint(0, classes, (3,), generator=generator), soft):
        _, losses = evolved_select(EvolvedState(3), torch.arange(3), 1, logits=logits, targets=targets,
                                   label_smoothing=0.1, backend="triton", return_losses=True)  # fmt: skip
        x = logits.double()
        t = targets.double() if targets.is_floating_point() else torch.nn.functional.one_hot(targets, classes).double()
        lse = torch.logsumexp(x, 1)
        expected = 0.9 * (t * (lse[:, None] - x)).sum(1) + 0.1 * (lse - x.mean(1))
        np.testing.assert_allclose(losses.double(), expected, rtol=2e-6)


@pytest.mark.parametrize("n", [launch.PRUNE_BLOCK, 2 * launch.PRUNE_BLOCK + 3])
def test_prune_keys_on_both_sides_of_the_unmasked_blocks(n):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n)) + 0.01
    seed = torch.tensor([11], dtype=torch.int64)
    keys = launch.prune_keys(values, seed)
    # Keys depend on (seed, i) only: the tail's keys equal those of the same positions in a longer launch.
    longer = launch.prune_keys(torch.cat([values, torch.ones(launch.PRUNE_BLOCK)]), seed)
    assert torch.equal(keys, longer[:n]) and torch.isfinite(keys).all()


@kernels._jit
def fold_kernel(values_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """log-sum-exp of n values three ways: folded one by one (lse_combine), reduced per lane then merged
    (lse_reduce), and in two halves merged with lse_combine."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(values_ptr + offsets, mask=offsets < n, other=float("-inf"))
    lane_max = tl.full([BLOCK], kernels.MAX_START, tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    lane_max, lane_sum = kernels.lse_combine(lane_max, lane_sum, x, 1.0)
    folded_max, folded_sum = kernels.lse_reduce(lane_max, lane_sum, 0)
    block_max, block_sum = kernels.lse_reduce(x, 1.0, 0)
    low = tl.where(offsets < n // 2, x, float("-inf"))
    high = tl.where(offsets >= n // 2, x, float("-inf"))
    low_max, low_sum = kernels.lse_reduce(low, 1.0, 0)
    high_max, high_sum = kernels.lse_reduce(high, 1.0, 0)
    merged_max, merged_sum = kernels.lse_combine(low_max, low_sum, high_max, high_sum)
    tl.store(out_ptr + 0, folded_max + tl.log(folded_sum))
    tl.store(out_ptr + 1, block_max + tl.log(block_sum))
    tl.store(out_ptr + 2, merged_max + tl.log(merged_sum))


@pytest.mark.parametrize(
    "values",
    [
        [0.5, -3.0, 80.0, 79.0, -1e4],
        [float("-inf"), 2.0, float("-inf"), -2.0],
        [float("-inf"), float("-inf"), 1e4 + 1.0, 1e4],
        [-50.0] * 7,
    ],
    ids=["mixed", "masked", "offset", "flat"],
)
def test_the_one_log_sum_exp_helper_in_every_form(values):
    values = torch.tensor(values)
    out = torch.empty(3)
    fold_kernel[(1,)](values, out, len(values), BLOCK=8)
    expected = torch.logsumexp(values.double(), 0).float().repeat(3)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0.0)


def test_a_nan_logit_gives_a_nan_log_sum_exp():
    out = torch.empty(3)
    fold_kernel[(1,)](torch.tensor([1.0, float("nan"), 2.0]), out, 3, BLOCK=4)
    assert out[0].isnan()
