"""Contract points that each kill a specific wrong implementation: a rejected load changes nothing, ranks draw from
distinct selection streams, k rounds, 1-D float targets, lam off the CPU. (The mixup weighting by hand is in
test_losses.py, on every backend.)"""

from __future__ import annotations

import pytest
import torch

from es_kernels import EvolvedState, EvolvedTraining, evolved_select, reference, seeds


def test_rejected_load_changes_nothing_not_even_the_betas():
    state = EvolvedState(6, beta1=0.2, beta2=0.9)
    before = state.state_dict()
    bad = {"score": torch.ones(5), "weight": torch.ones(6), "beta1": 0.5, "beta2": 0.5}
    with pytest.raises(ValueError, match="shape"):
        state.load_state_dict(bad)
    bad = {"score": torch.ones(6), "weight": torch.full((6,), float("nan")), "beta1": 0.5, "beta2": 0.5}
    with pytest.raises(ValueError, match="finite"):
        state.load_state_dict(bad)
    assert (state.beta1, state.beta2) == (0.2, 0.9)
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])


def test_ranks_draw_selection_from_distinct_streams():
    streams = [EvolvedTraining("es", 64, 4, seed=3, num_replicas=2, rank=rank).generator for rank in (0, 1)]
    first, second = (torch.rand(8, generator=generator) for generator in streams)
    assert not torch.equal(first, second)
    alone = EvolvedTraining("es", 64, 4, seed=3).generator
    assert torch.equal(torch.rand(8, generator=alone), first)  # rank 0 keeps the base seed
    assert seeds.rank_seed(3, 1) != seeds.rank_seed(3, 0) == 3
    assert len({seeds.epoch_seed(3, epoch, purpose) for epoch in range(3) for purpose in range(2)}) == 6


@pytest.mark.parametrize("batch, expected", [(6, 2), (11, 3), (14, 4), (2, 1), (1, 1), (8, 2)])
def test_num_selected_rounds_instead_of_truncating(batch, expected):
    """k = round(B / 4), at least 1: 1.5 -> 2, 2.75 -> 3 and 3.5 -> 4, where truncating gives 1, 2 and 3."""
    training = EvolvedTraining("es", 64, 4, seed=0, select_ratio=0.25)
    assert training.num_selected(batch) == expected


def test_one_dimensional_float_targets_are_named_as_class_ids():
    state = EvolvedState(8)
    with pytest.raises(TypeError, match="1-D targets must be integer class ids"):
        evolved_select(state, torch.arange(4), 2, logits=torch.randn(4, 3), targets=torch.tensor([0.0, 1, 2, 1]))


def test_lam_tensor_off_the_cpu_is_refused_when_value_checks_are_off():
    """Reading a device lam would synchronise the host, which check_values=False promises not to do."""
    state = EvolvedState(8)
    lam = torch.tensor(0.3, device="meta")
    labels = torch.tensor([0, 1, 2, 1])
    with pytest.raises(TypeError, match=r"targets\[2\] \(lam\) is a meta tensor"):
        evolved_select(state, torch.arange(4), 2, logits=torch.randn(4, 3), targets=(labels, labels, lam),
                       check_values=False, backend="torch")  # fmt: skip
    chosen = evolved_select(state, torch.arange(4), 2, logits=torch.randn(4, 3), targets=(labels, labels,
                            torch.tensor(0.3)), check_values=False, backend="torch")  # fmt: skip
    assert chosen.numel() == 2


def test_token_fields_are_refused_until_a_backend_implements_them():
    """The language models' token-level fields exist on the call; a backend that does not implement one must not
    silently ignore it."""
    import dataclasses

    from es_kernels.call import SelectCall

    state = EvolvedState(4)
    call = SelectCall(state.score, state.weight, torch.arange(2), 1, 0.2, 0.9, losses=torch.rand(2))
    assert call.token_fields_set() == []
    with_token = dataclasses.replace(call, ignore_index=-100)
    with pytest.raises(NotImplementedError, match="ignore_index"):
        with_token.op_arguments(torch.zeros(1, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="ignore_index"):
        reference.fused_select(with_token)
    assert torch.equal(state.score, torch.full((4,), 0.25))
