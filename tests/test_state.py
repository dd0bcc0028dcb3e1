"""EvolvedState: Algorithm 1's update by hand, save/load, and bad input leaving the state untouched."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from es_kernels import EvolvedState, evolved_select


def algorithm1_by_hand(num_samples, beta1, beta2, visits):
    """Plain-Python Algorithm 1 state after a list of (ids, losses) visits, in fp32 like the library."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731 - rounding to fp32
    s = [f32(1.0 / num_samples)] * num_samples
    w = list(s)
    for ids, losses in visits:
        for i, loss in zip(ids, losses, strict=True):
            old = s[i]
            w[i] = f32(f32(old * f32(beta1)) + f32(f32(loss) * f32(1.0 - beta1)))
            s[i] = f32(f32(old * f32(beta2)) + f32(f32(loss) * f32(1.0 - beta2)))
    return s, w


@pytest.mark.parametrize("betas", [(0.2, 0.9), (0.2, 0.8), (0.0, 0.0), (1.0, 1.0), (0.37, 0.61)])
def test_state_follows_algorithm1_over_random_steps(betas):
    rng = random.Random(1234)
    n = 17
    state = EvolvedState(n, *betas)
    visits = []
    for step in range(40):
        ids = rng.sample(range(n), rng.randint(1, 8))  # repeated visits of a sample across steps
        losses = [rng.uniform(0.0, 5.0) for _ in ids]
        idx, loss_t = torch.tensor(ids), torch.tensor(losses, dtype=torch.float32)
        if step % 3 == 0:
            state.observe(idx, loss_t)  # update-only step (annealing)
        else:
            evolved_select(state, idx, max(1, len(ids) // 2), losses=loss_t, backend="torch")
        visits.append((ids, loss_t.tolist()))
    s, w = algorithm1_by_hand(n, *betas, visits)
    assert state.score.tolist() == s
    assert state.weight.tolist() == w


def test_initial_state_is_uniform_and_only_visited_samples_change():
    state = EvolvedState(8)
    assert torch.equal(state.score, torch.full((8,), 0.125))
    assert torch.equal(state.weight, torch.full((8,), 0.125))
    state.observe(torch.tensor([2, 5]), torch.tensor([1.0, 3.0]))
    untouched = [0, 1, 3, 4, 6, 7]
    assert torch.equal(state.score[untouched], torch.full((6,), 0.125))
    assert state.weight[2].item() == pytest.approx(0.2 * 0.125 + 0.8 * 1.0)
    assert state.score[5].item() == pytest.approx(0.9 * 0.125 + 0.1 * 3.0)


def test_uniform_betas_keep_weights_constant():
    state = EvolvedState(5, beta1=1.0, beta2=1.0)
    state.observe(torch.arange(5), torch.tensor([9.0, 0.0, 3.0, 1.0, 2.0]))
    assert torch.equal(state.weight, torch.full((5,), 0.2))


def test_state_dict_round_trip_with_weights_only_load():
    state = EvolvedState(6, beta1=0.3, beta2=0.7)
    state.observe(torch.tensor([0, 4]), torch.tensor([2.0, 0.5]))
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = EvolvedState(6)
    score_buffer = restored.score
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.score, state.score) and torch.equal(restored.weight, state.weight)
    assert (restored.beta1, restored.beta2) == (0.3, 0.7)
    assert restored.score is score_buffer  # loaded in place: captured graphs keep pointing at live buffers


def test_state_dict_is_a_snapshot():
    state = EvolvedState(3)
    saved = state.state_dict()
    state.observe(torch.tensor([1]), torch.tensor([4.0]))
    assert saved["score"][1].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"num_samples": 4, "beta1": 1.5}, ValueError, "beta1"),
        ({"num_samples": 4, "beta2": -0.1}, ValueError, "beta2"),
        ({"num_samples": 4, "beta1": "0.2"}, TypeError, "beta1"),
    ],
)
def test_bad_construction_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        EvolvedState(**kwargs)


@pytest.mark.parametrize(
    "indices, losses, error, name",
    [
        (torch.tensor([0, 1]), torch.tensor([1.0]), ValueError, "losses"),
        (torch.tensor([0, 9]), torch.tensor([1.0, 1.0]), ValueError, "indices"),
        (torch.tensor([-1, 1]), torch.tensor([1.0, 1.0]), ValueError, "indices"),
        (torch.tensor([1, 1]), torch.tensor([1.0, 1.0]), ValueError, "indices"),
        (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), TypeError, "indices"),
        (torch.tensor([[0, 1]]), torch.tensor([1.0, 1.0]), ValueError, "indices"),
        (torch.tensor([0, 1]), torch.tensor([1, 2]), TypeError, "losses"),
        (torch.tensor([0, 1]), torch.tensor([float("nan"), 1.0]), ValueError, "losses"),
        (torch.tensor([0, 1]), torch.tensor([float("inf"), 1.0]), ValueError, "losses"),
        (torch.tensor([0, 1]), torch.tensor([-0.5, 1.0]), ValueError, "losses"),
        ([0, 1], torch.tensor([1.0, 1.0]), TypeError, "indices"),
    ],
)
def test_bad_observe_raises_and_leaves_state_unchanged(indices, losses, error, name):
    state = EvolvedState(4)
    state.observe(torch.tensor([0, 2]), torch.tensor([1.5, 0.25]))
    before = state.state_dict()
    with pytest.raises(error, match=name):
        state.observe(indices, losses)
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])


def test_load_state_dict_rejects_other_dataset_and_keeps_state():
    state = EvolvedState(4)
    before = state.state_dict()
    with pytest.raises(ValueError, match="score"):
        state.load_state_dict(EvolvedState(5).state_dict())
    with pytest.raises(ValueError, match="missing"):
        state.load_state_dict({"score": before["score"]})
    assert torch.equal(state.score, before["score"])


def test_load_state_dict_refuses_nan_or_negative_values():
    state = EvolvedState(3)
    saved = state.state_dict()
    for bad in (torch.tensor([0.1, float("nan"), 0.1]), torch.tensor([0.1, -1.0, 0.1])):
        with pytest.raises(ValueError, match="weight"):
            state.load_state_dict(dict(saved, weight=bad))
    assert torch.equal(state.weight, saved["weight"])


def test_visits_are_not_checked_before_an_epoch_begins():
    # The op alone, no epoch notion: the same ids every step is a plain loop's right.
    state = EvolvedState(6, 0.0, 0.0)
    for _ in range(3):
        evolved_select(state, torch.arange(6), 2, losses=torch.ones(6), backend="torch")
        state.observe(torch.arange(6), torch.ones(6))


@pytest.mark.parametrize("second", ["select", "observe"])
def test_a_second_visit_in_one_epoch_is_refused_with_its_ids_and_changes_nothing(second):
    state = EvolvedState(8, 0.0, 0.0)
    state.begin_epoch(0)
    evolved_select(state, torch.tensor([1, 4, 6]), 1, losses=torch.tensor([1.0, 2.0, 3.0]), backend="torch")
    before = state.state_dict()
    with pytest.raises(ValueError, match=r"ids \[4, 6\] were already visited in epoch 0"):
        if second == "select":
            evolved_select(state, torch.tensor([0, 4, 6]), 1, losses=torch.ones(3), backend="torch")
        else:
            state.observe(torch.tensor([0, 4, 6]), torch.ones(3))
    after = state.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in ("score", "weight", "visited"))
    state.observe(torch.tensor([0, 2]), torch.ones(2))  # unvisited ids still go through
    state.begin_epoch(1)  # a new epoch clears the marks
    state.observe(torch.tensor([4, 6]), torch.ones(2))


def test_a_raising_select_marks_nothing():
    state = EvolvedState(5)
    state.begin_epoch(0)
    with pytest.raises(ValueError, match="losses"):
        evolved_select(state, torch.tensor([1, 2]), 1, losses=torch.tensor([1.0, float("nan")]))
    evolved_select(state, torch.tensor([1, 2]), 1, losses=torch.tensor([1.0, 2.0]))  # the retry is no revisit


def test_revisits_with_value_checks_off_are_counted_and_reported_at_the_next_epoch():
    state = EvolvedState(5)
    state.begin_epoch(3)
    for _ in range(2):
        evolved_select(state, torch.tensor([0, 1]), 1, losses=torch.ones(2), check_values=False)
    with pytest.warns(UserWarning, match=r"2 sample visit\(s\) of epoch 3 repeated"):
        state.begin_epoch(4)
    evolved_select(state, torch.tensor([0, 1]), 1, losses=torch.ones(2), check_values=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state.begin_epoch(5)  # one visit each in epoch 4: nothing to report


def test_visit_marks_resume_mid_epoch():
    state = EvolvedState(6)
    state.begin_epoch(2)
    state.observe(torch.tensor([3]), torch.ones(1))
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    resumed = EvolvedState(6)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.begin_epoch(2)  # the resumed loop's set_epoch of the same epoch keeps the marks
    with pytest.raises(ValueError, match=r"ids \[3\]"):
        resumed.observe(torch.tensor([3]), torch.ones(1))
    resumed.observe(torch.tensor([4]), torch.ones(1))
    with pytest.raises(ValueError, match="visited"):
        resumed.load_state_dict(dict(state.state_dict(), visited=torch.zeros(5, dtype=torch.bool)))


def _checkpoint_in_the_saved_format() -> dict:
    """Every key a checkpoint of this library holds, spelled out as the format has always written them (the two
    snapshot keys only in a distributed run saved between merges)."""
    return {
        "score": torch.tensor([0.5, 0.25, 0.125]),
        "weight": torch.tensor([1.0, 0.5, 0.0]),
        "beta1": 0.3,
        "beta2": 0.7,
        "scored": torch.tensor([True, True, False]),
        "visit_epoch": 4,
        "visited": torch.tensor([False, True, False]),
        "sync_snapshot": torch.tensor([[0.5, 0.25, 1 / 3], [1.0, 0.5, 1 / 3]]),
        "sample_buffers": {"latest": torch.tensor([2.0, math.inf, 0.5])},
        "sample_buffers_snapshot": torch.tensor([[2.0, math.inf, math.inf]]),
    }


def test_a_checkpoint_in_the_saved_format_loads_in_place_and_resumes():
    saved = _checkpoint_in_the_saved_format()
    state = EvolvedState(3)
    latest = state.register_sample_buffer("latest", math.inf)
    score, weight = state.score, state.weight
    state.load_state_dict(saved)
    assert state.score is score and state.weight is weight and state.sample_buffer("latest") is latest
    assert torch.equal(state.score, saved["score"]) and torch.equal(state.weight, saved["weight"])
    assert torch.equal(latest, saved["sample_buffers"]["latest"])
    assert (state.beta1, state.beta2) == (0.3, 0.7) and torch.equal(state.scored, saved["scored"])
    assert state.sample_buffer_names == ("latest",)
    # One process: the merge base has nobody to agree with, so it is not written back.
    again = state.state_dict()
    assert sorted(again) == sorted(set(saved) - {"sync_snapshot", "sample_buffers_snapshot"})
    assert torch.equal(again["sample_buffers"]["latest"], latest)
    state.begin_epoch(4)  # the same epoch: the loaded visit marks hold
    with pytest.raises(ValueError, match=r"ids \[1\]"):
        state.observe(torch.tensor([1]), torch.ones(1))


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("sync_snapshot", torch.tensor([[0.5, -1.0, 0.5], [1.0, 0.5, 0.5]]), ValueError),
        ("sync_snapshot", torch.ones(1, 3), ValueError),
        ("sample_buffers_snapshot", torch.tensor([[math.nan, 1.0, 1.0]]), ValueError),
        ("sample_buffers_snapshot", torch.ones(2, 3), ValueError),
        ("sample_buffers", {"latest": torch.ones(3, dtype=torch.float64)}, TypeError),
        ("sample_buffers", {"latest": torch.ones(4)}, ValueError),
        ("sample_buffers", {"latest": torch.tensor([1.0, -math.inf, 1.0])}, ValueError),
        ("sample_buffers", {"other": torch.ones(3)}, ValueError),
        ("weight", torch.ones(3, dtype=torch.float64), TypeError),
    ],
)
def test_a_bad_checkpoint_names_its_key_and_changes_nothing(key, value, error):
    state = EvolvedState(3)
    state.register_sample_buffer("latest", math.inf)
    state.observe(torch.tensor([2]), torch.tensor([0.75]))
    before = [state.score.clone(), state.weight.clone(), state.sample_buffer("latest").clone()]
    with pytest.raises(error, match=key):
        state.load_state_dict(dict(_checkpoint_in_the_saved_format(), **{key: value}))
    after = [state.score, state.weight, state.sample_buffer("latest")]
    assert all(map(torch.equal, after, before)) and (state.beta1, state.beta2) == (0.2, 0.9)
