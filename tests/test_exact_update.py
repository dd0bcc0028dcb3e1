"""The exact update, once per backend: after a call, s and w equal bit for bit Algorithm 1's decoupled EMA applied
to the call's own losses, ``w = b1 * s_old + (1 - b1) * loss`` then ``s = b2 * s_old + (1 - b2) * loss``, each
product rounded to fp32 before the sum (no FMA), ``1 - b`` rounded once; ids outside the meta-batch unchanged
(docs/architecture.md §3). Checked against the update written out by hand in numpy's fp32, which shares no code
with any backend (the reference included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from es_kernels import EvolvedState, MixupTargets

BETAS = [(0.2, 0.9), (0.2, 0.8), (0.0, 0.0), (1.0, 1.0), (0.37, 0.61), (0.9999, 0.1234)]


def seeded_state(num_samples: int, betas=(0.2, 0.9), seed: int = 0) -> EvolvedState:
    """Distinct prior s and w, so a backend that reads the new s, or w, where the old s belongs is caught."""
    state = EvolvedState(num_samples, *betas)
    generator = torch.Generator().manual_seed(seed)
    state.score.copy_(torch.rand(num_samples, generator=generator) + 0.05)
    state.weight.copy_(torch.rand(num_samples, generator=generator))
    return state


def algorithm_1_by_hand(score, weight, ids, losses, beta1, beta2):
    """The update in numpy fp32, one sample at a time."""
    score, weight = score.numpy().copy(), weight.numpy().copy()
    one = np.float32
    for i, loss in zip(ids.tolist(), losses.float().tolist(), strict=True):
        old = score[i]
        weight[i] = one(one(beta1) * old) + one(one(1.0 - beta1) * one(loss))
        score[i] = one(one(beta2) * old) + one(one(1.0 - beta2) * one(loss))
    return torch.from_numpy(score), torch.from_numpy(weight)


@pytest.mark.parametrize("betas", BETAS)
def test_given_losses_update_the_state_as_algorithm_1_by_hand(backend, betas):
    state = seeded_state(50, betas)
    ids = torch.tensor([49, 0, 7, 13, 21, 33, 8])
    losses = torch.rand(7, generator=torch.Generator().manual_seed(4)) * 5
    expected = algorithm_1_by_hand(state.score, state.weight, ids, losses, *betas)
    backend.select(state, ids, 3, losses=losses)
    assert torch.equal(state.score, expected[0])
    assert torch.equal(state.weight, expected[1])


@pytest.mark.parametrize("betas", [(0.2, 0.9), (0.9999, 0.1234)])
def test_many_steps_stay_bit_exact_with_algorithm_1_by_hand(backend, betas):
    n, batch = 500, 48
    steps = 3 if backend.interpreted else 30
    generator = torch.Generator().manual_seed(0)
    state = EvolvedState(n, *betas)
    expected = state.score.clone(), state.weight.clone()
    for _ in range(steps):
        ids = torch.randperm(n, generator=generator)[:batch]
        losses = torch.rand(batch, generator=generator) * torch.rand(1, generator=generator) * 10
        backend.select(state, ids, 12, losses=losses, check_values=False)
        expected = algorithm_1_by_hand(*expected, ids, losses, *betas)
    assert torch.equal(state.score, expected[0]) and torch.equal(state.weight, expected[1])


@pytest.mark.parametrize("form", ["hard", "soft", "mixup"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_from_computed_losses_is_the_update_of_the_returned_losses(backend, form, dtype):
    generator = torch.Generator().manual_seed(2)
    state = seeded_state(30)
    before = state.score.clone(), state.weight.clone()
    ids = torch.tensor([5, 29, 11, 2])
    logits = torch.randn(4, 11, generator=generator).to(dtype)
    labels = torch.tensor([1, 0, 10, 4])
    targets = {
        "hard": labels,
        "soft": torch.rand(4, 11, generator=generator).softmax(dim=1),
        "mixup": MixupTargets(labels, labels.flip(0), 0.3),
    }[form]
    _, losses = backend.select(state, ids, 2, logits=logits, targets=targets, return_losses=True)
    expected = algorithm_1_by_hand(*before, ids, losses, state.beta1, state.beta2)
    assert torch.equal(state.score, expected[0]) and torch.equal(state.weight, expected[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_given_losses_of_another_dtype_are_rounded_to_fp32_first(backend, dtype):
    state = seeded_state(10)
    ids = torch.tensor([4, 1, 8])
    losses = torch.tensor([0.1, 2.5, 7.3], dtype=dtype)
    expected = algorithm_1_by_hand(state.score, state.weight, ids, losses.float(), state.beta1, state.beta2)
    _, returned = backend.select(state, ids, 1, losses=losses, return_losses=True)
    assert returned.dtype == torch.float32 and torch.equal(returned, losses.float())
    assert torch.equal(state.score, expected[0]) and torch.equal(state.weight, expected[1])


def test_strided_ids_and_losses(backend):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randperm(96, generator=generator)[:48][::2]
    losses = torch.rand(48, generator=generator)[::2]
    assert not ids.is_contiguous() and not losses.is_contiguous()
    state = seeded_state(96)
    expected = algorithm_1_by_hand(state.score, state.weight, ids, losses, 0.2, 0.9)
    backend.select(state, ids, 6, losses=losses)
    assert torch.equal(state.score, expected[0]) and torch.equal(state.weight, expected[1])


def test_the_update_bumps_the_version_counters(backend):
    """Autograd and torch.compile see an in-place write only through the tensors' version counters."""
    state = EvolvedState(10)
    versions = state.score._version, state.weight._version
    backend.select(state, torch.arange(4), 2, losses=torch.rand(4))
    assert state.score._version > versions[0] and state.weight._version > versions[1]
