"""EvolvedSampler: annealing schedule, pruning, shuffling, sharding, exact step counts, save/resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from es_kernels import EvolvedSampler, EvolvedState, evolved_prune, evolved_select, seeds
from es_kernels.testing import CHI_SQUARE_ALPHA, subset_chi_square_pvalue


def test_annealing_epochs_at_both_ends():
    sampler = EvolvedSampler(EvolvedState(10), 20, anneal_start=0.05, anneal_end=0.1)
    assert (sampler.anneal_start_epochs, sampler.anneal_end_epochs) == (1, 2)
    assert [sampler.is_selecting(e) for e in range(20)] == [False] + [True] * 17 + [False] * 2
    sampler.set_epoch(0)
    assert not sampler.selecting
    sampler.set_epoch(1)
    assert sampler.selecting


def test_paper_default_for_ten_epochs_anneals_one_epoch_each_end():
    sampler = EvolvedSampler(EvolvedState(10), 10)
    assert [sampler.is_selecting(e) for e in range(10)] == [False] + [True] * 8 + [False]


def test_pruning_keeps_round_of_one_minus_r_in_selecting_epochs_only():
    state = EvolvedState(101)
    sampler = EvolvedSampler(state, 10, prune_ratio=0.2)
    sampler.set_epoch(0)
    assert sorted(sampler) == list(range(101))  # annealing: everything
    sampler.set_epoch(3)
    ids = list(sampler)
    assert len(ids) == round(0.8 * 101) == len(set(ids))


@pytest.mark.parametrize(
    "fraction,epochs,expected",
    [(0.35, 90, 32), (0.05, 10, 1), (0.05, 30, 2), (0.25, 2, 1), (0.15, 10, 2), (0.0, 7, 0)],
)
def test_annealing_rounds_the_written_decimal_half_up(fraction, epochs, expected):
    # 0.35 * 90 is 31.4999... in binary floating point; the user wrote 31.5 epochs, which rounds up.
    sampler = EvolvedSampler(EvolvedState(4), epochs, anneal_start=fraction, anneal_end=0.0)
    assert sampler.anneal_start_epochs == expected


@pytest.mark.parametrize("prune_ratio,n,kept", [(0.5, 5, 3), (0.3, 5, 4), (0.7, 10, 3), (0.2, 1347, 1078)])
def test_kept_count_is_one_minus_r_times_n_half_up(prune_ratio, n, kept):
    assert EvolvedSampler(EvolvedState(n), 10, prune_ratio=prune_ratio).kept_samples == kept


def test_pruning_draws_from_the_weights_at_the_epoch_start():
    state = EvolvedState(10, beta1=0.0)
    state.observe(torch.arange(10), torch.tensor([0.0] * 5 + [1.0] * 5))
    sampler = EvolvedSampler(state, 3, prune_ratio=0.5, anneal_start=0.0, anneal_end=0.0)
    sampler.set_epoch(1)
    assert sorted(sampler) == [5, 6, 7, 8, 9]
    by_score = EvolvedState(10, beta1=1.0, beta2=0.0)  # s = loss, w stays uniform
    by_score.observe(torch.arange(10), torch.tensor([1.0] * 5 + [0.0] * 5))
    sampler_s = EvolvedSampler(by_score, 3, prune_ratio=0.5, prune_by="score", anneal_start=0.0, anneal_end=0.0)
    sampler_s.set_epoch(1)
    assert sorted(sampler_s) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------- never-scored samples


def visit_every_epoch(sampler: EvolvedSampler, losses: torch.Tensor, epochs: range, *, visits: int | None = None):
    """A loop that scores the ids of each epoch's plan (the first ``visits`` of them); returns every id seen."""
    seen: set[int] = set()
    for epoch in epochs:
        sampler.set_epoch(epoch)
        ids = list(sampler)[:visits]
        sampler.state.observe(torch.tensor(ids), losses[ids])
        seen.update(ids)
    return seen


def test_every_sample_is_visited_in_a_six_epoch_eswp_run():
    # 5% of 6 epochs anneals none: without the rule epoch 0 pruned 20% uniformly from w = 1/n, and those samples,
    # never scored, stayed at 1/n against weights ~1 and were practically never drawn again.
    n = 128
    state = EvolvedState(n, beta1=0.2, beta2=0.8)
    sampler = EvolvedSampler(state, 6, prune_ratio=0.2, seed=4)
    assert sampler.anneal_start_epochs == 0 and sampler.is_selecting(0)
    losses = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5
    assert visit_every_epoch(sampler, losses, range(6)) == set(range(n))
    assert [sampler.epoch_size(e) for e in range(6)] == [128] + [102] * 5  # epoch 0 whole: known before training
    assert bool(state.scored.all())


def test_a_pruning_epoch_keeps_every_sample_not_scored_yet():
    n, keep = 20, 10
    losses = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5
    state = EvolvedState(n)
    sampler = EvolvedSampler(state, 4, prune_ratio=0.5, anneal_start=0.0, anneal_end=0.0, seed=2)
    visit_every_epoch(sampler, losses, range(1), visits=15)  # a loop that stopped early: 5 ids never scored
    unscored = set((~state.scored).nonzero().squeeze(1).tolist())
    assert len(unscored) == 5
    sampler.set_epoch(1)
    kept = list(sampler)
    assert len(kept) == keep and unscored <= set(kept)
    # More unscored samples than an epoch keeps: those kept are all unscored ones.
    fresh = EvolvedState(n)
    early = EvolvedSampler(fresh, 4, prune_ratio=0.5, anneal_start=0.0, anneal_end=0.0, seed=2)
    visit_every_epoch(early, losses, range(1), visits=5)
    early.set_epoch(1)
    kept = list(early)
    assert len(kept) == keep and not fresh.scored[kept].any()


def test_with_every_sample_scored_the_pruning_draw_is_evolved_prune_itself():
    state = EvolvedState(30, beta1=0.0)
    state.observe(torch.arange(30), torch.rand(30, generator=torch.Generator().manual_seed(5)))
    for seed in range(5):
        sampler = EvolvedSampler(state, 3, prune_ratio=0.4, anneal_start=0.0, anneal_end=0.0, seed=seed)
        sampler.set_epoch(2)
        generator = torch.Generator().manual_seed(seeds.epoch_seed(seed, 2, 0))
        assert sorted(sampler) == evolved_prune(state, 18, generator=generator).tolist()


def test_the_scored_samples_are_pruned_by_the_exact_law():
    # 7 samples, 1 and 4 never scored: a plan of round(0.5 * 7) = 4 ids keeps both and draws 2 of the 5 scored ones
    # by successive sampling ∝ w.
    scored_ids, weights = [0, 2, 3, 5, 6], [0.5, 1.0, 2.0, 3.0, 4.0]
    state = EvolvedState(7, beta1=0.0)
    state.observe(torch.tensor(scored_ids), torch.tensor(weights))  # w = loss
    draws = iter(range(10**6))

    def draw() -> torch.Tensor:
        sampler = EvolvedSampler(state, 2, prune_ratio=0.5, anneal_start=0.0, anneal_end=0.0, seed=next(draws))
        sampler.set_epoch(1)
        kept = sorted(sampler)
        assert len(kept) == 4 and {1, 4} <= set(kept)
        return torch.tensor([scored_ids.index(i) for i in kept if i not in (1, 4)])

    assert subset_chi_square_pvalue(draw, weights, 2, draws=3000) > CHI_SQUARE_ALPHA


def test_the_scored_marks_are_saved_resumed_and_made_by_every_update():
    state = EvolvedState(6)
    state.observe(torch.tensor([1, 3]), torch.tensor([0.5, 0.5]))
    saved = state.state_dict()
    assert saved["scored"].tolist() == [False, True, False, True, False, False]
    resumed = EvolvedState(6)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.scored, state.scored)
    # A visit that leaves the values where they were (uniform sampling, beta1 = beta2 = 1) still scores the sample.
    uniform = EvolvedState(6, beta1=1.0, beta2=1.0)
    evolved_select(uniform, torch.tensor([0, 5]), 1, losses=torch.tensor([2.0, 3.0]))
    assert uniform.scored.tolist() == [True, False, False, False, False, True]
    with pytest.raises(ValueError, match="scored"):
        resumed.load_state_dict(dict(saved, scored=saved["scored"][:3]))
    assert torch.equal(resumed.scored, state.scored)  # a rejected dict changes nothing
    old = {key: value for key, value in saved.items() if key != "scored"}
    resumed.load_state_dict(old)  # a checkpoint from before the marks: every sample may be pruned, as it was then
    assert bool(resumed.scored.all())


def test_shuffle_differs_between_epochs_and_is_seeded():
    def order(seed, epoch):
        sampler = EvolvedSampler(EvolvedState(50), 5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)
    unshuffled = EvolvedSampler(EvolvedState(7), 5, shuffle=False)
    assert list(unshuffled) == list(range(7))


@pytest.mark.parametrize("n, replicas, prune", [(10, 3, 0.0), (101, 4, 0.2), (8, 2, 0.0), (5, 5, 0.0)])
def test_shards_have_equal_length_and_cover_the_plan_once(n, replicas, prune):
    shards = []
    for rank in range(replicas):
        sampler = EvolvedSampler(
            EvolvedState(n), 3, prune_ratio=prune, anneal_start=0, anneal_end=0, num_replicas=replicas, rank=rank
        )
        sampler.set_epoch(1)  # epoch 0 prunes nothing
        shard = list(sampler)
        real = [i for p, i in enumerate(shard) if not sampler.is_padding(p)]
        shards.append((shard, real))
    assert len({len(shard) for shard, _ in shards}) == 1
    real_ids = [i for _, real in shards for i in real]
    assert len(real_ids) == len(set(real_ids)) == round((1 - prune) * n)  # nothing lost, nothing doubled
    padding = [i for shard, real in shards for i in shard[len(real) :]]
    assert set(padding) <= set(real_ids) and len(padding) < replicas


@pytest.mark.parametrize("batch_size, drop_last", [(32, False), (32, True), (7, False), (1000, False)])
def test_step_counts_are_exact(batch_size, drop_last):
    n, epochs = 203, 10
    sampler = EvolvedSampler(EvolvedState(n), epochs, prune_ratio=0.3, num_replicas=2, rank=1)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    seen = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        steps = sum(1 for _ in loader)
        assert steps == sampler.steps_per_epoch(batch_size, drop_last=drop_last) == len(loader)
        seen += steps
    assert seen == sampler.total_steps(batch_size, drop_last=drop_last)


def test_onecycle_never_overruns_with_total_steps():
    n, epochs, batch = 100, 6, 16
    sampler = EvolvedSampler(EvolvedState(n), epochs, prune_ratio=0.5, anneal_start=0.2, anneal_end=0.2)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=sampler.total_steps(batch))
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for _ in loader:
            optimizer.step()
            scheduler.step()  # raises ValueError if stepped past total_steps
    assert scheduler.last_epoch == sampler.total_steps(batch)


def test_resume_mid_epoch_yields_the_rest_of_the_same_plan():
    state = EvolvedState(40)
    sampler = EvolvedSampler(state, 4, prune_ratio=0.25, anneal_start=0, anneal_end=0, seed=3)
    sampler.set_epoch(2)
    plan = list(sampler)
    sampler.advance(12)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    state.observe(torch.arange(40), torch.rand(40))  # the state moves on; the saved plan must not
    buffer.seek(0)
    resumed = EvolvedSampler(state, 4, prune_ratio=0.25, anneal_start=0, anneal_end=0, seed=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.set_epoch(2)  # the loop's own set_epoch call on resume keeps the position
    assert list(resumed) == plan[12:]
    assert len(resumed) == len(plan) - 12
    resumed.set_epoch(3)
    assert len(list(resumed)) == 30


def test_load_state_dict_checks_layout():
    sampler = EvolvedSampler(EvolvedState(10), 2, num_replicas=2, rank=0)
    other = EvolvedSampler(EvolvedState(10), 2, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="rank"):
        sampler.load_state_dict(other.state_dict())


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"num_epochs": 0}, ValueError, "num_epochs"),
        ({"num_epochs": 2.0}, TypeError, "num_epochs"),
        ({"prune_ratio": 1.0}, ValueError, "prune_ratio"),
        ({"prune_ratio": -0.1}, ValueError, "prune_ratio"),
        ({"prune_by": "loss"}, ValueError, "prune_by"),
        ({"anneal_start": 1.5}, ValueError, "anneal_start"),
        ({"anneal_start": 0.6, "anneal_end": 0.6}, ValueError, "anneal_start"),
        ({"num_replicas": 2, "rank": 2}, ValueError, "rank"),
        ({"num_replicas": 0, "rank": 0}, ValueError, "num_replicas"),
        ({"num_replicas": 20, "rank": 0, "prune_ratio": 0.5}, ValueError, "prune_ratio"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, error, name):
    args = {"num_epochs": 5, **kwargs}
    with pytest.raises(error, match=name):
        EvolvedSampler(EvolvedState(20), **args)


def test_bad_runtime_arguments():
    sampler = EvolvedSampler(EvolvedState(20), 5)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(5)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.steps_per_epoch(0)
    with pytest.raises(ValueError, match="count"):
        sampler.advance(21)


def test_load_state_dict_refuses_missing_keys_and_foreign_ids():
    sampler = EvolvedSampler(EvolvedState(10), 2)
    list(sampler)
    saved = sampler.state_dict()
    with pytest.raises(ValueError, match="missing"):
        sampler.load_state_dict({"epoch": 0})
    bad = dict(saved, shard=saved["shard"] + 100)
    with pytest.raises(ValueError, match="shard"):
        sampler.load_state_dict(bad)
    with pytest.raises(TypeError, match="shard"):
        sampler.load_state_dict(dict(saved, shard=saved["shard"].float()))


def test_shuffle_stream_differs_from_the_prune_stream():
    state = EvolvedState(64)
    sampler = EvolvedSampler(state, 3, prune_ratio=0.5, anneal_start=0, anneal_end=0, seed=5)
    prune_draw = sampler._epoch_generator(torch.device("cpu"), purpose=0).get_state()
    shuffle_draw = sampler._epoch_generator(torch.device("cpu"), purpose=1).get_state()
    assert not torch.equal(prune_draw, shuffle_draw)


def test_a_forgotten_set_epoch_raises_instead_of_training_on_nothing():
    # The new-user trial: without set_epoch the helper's position sits at the end and epochs 1.. yielded no batch.
    n, batch = 20, 8
    sampler = EvolvedSampler(EvolvedState(n), 4)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, sampler=sampler)
    assert sum(1 for _ in loader) == 3
    sampler.advance(n)  # what EvolvedTraining does per step
    with pytest.raises(RuntimeError, match=r"set_epoch"):
        sum(1 for _ in loader)
    sampler.set_epoch(1)
    assert sum(1 for _ in loader) == 3


def test_a_second_full_pass_over_one_epoch_raises_but_a_partial_pass_does_not():
    sampler = EvolvedSampler(EvolvedState(10), 3)
    next(iter(sampler))  # peeking at a batch (shape inference) is no pass
    assert len(list(sampler)) == 10  # the position never advanced (no helper): the whole epoch
    with pytest.raises(RuntimeError, match=r"epoch 0 was already iterated"):
        list(sampler)
    sampler.set_epoch(0)  # the same epoch again is a resume, not a new epoch: still refused
    with pytest.raises(RuntimeError, match=r"set_epoch"):
        list(sampler)


def test_resume_at_the_end_of_an_epoch_iterates_nothing_then_continues():
    state = EvolvedState(12)
    sampler = EvolvedSampler(state, 3, seed=1)
    sampler.set_epoch(1)
    list(sampler)
    sampler.advance(12)
    saved = sampler.state_dict()
    resumed = EvolvedSampler(state, 3, seed=1)
    resumed.load_state_dict(saved)
    resumed.set_epoch(1)  # `for epoch in range(saved_epoch, E)`: the finished epoch yields nothing, no error
    assert list(resumed) == []
    resumed.set_epoch(2)
    assert len(list(resumed)) == 12


@pytest.mark.parametrize("accumulation", [1, 3, 4, 100])
def test_total_steps_with_gradient_accumulation_counts_each_epochs_last_partial_group(accumulation):
    n, epochs, batch = 203, 10, 16
    sampler = EvolvedSampler(EvolvedState(n), epochs, prune_ratio=0.3)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, sampler=sampler)
    optimizer_steps = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for step, _ in enumerate(loader):
            # The accumulation loop: step every `accumulation` batches and at the epoch's last batch.
            if (step + 1) % accumulation == 0 or step + 1 == len(loader):
                optimizer_steps += 1
    assert sampler.total_steps(batch, gradient_accumulation_steps=accumulation) == optimizer_steps
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        sampler.total_steps(batch, gradient_accumulation_steps=0)
