"""Selection policies: each new method's epoch plan by hand, exact step counts, exact resume, 2-rank merge."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiprocess_harness import launch

from es_kernels import EvolvedSampler, EvolvedState, EvolvedTraining
from es_kernels.policies import POLICIES, InfoBatchPolicy, KakurenboPolicy, UCBPolicy, make_policy

# Every method that plans its epochs from the training forward's losses, read from the registry so a new one is run.
SET_LEVEL = [name for name, make in POLICIES.items() if make().observes_training_forward]


def bound(policy, n: int, epochs: int) -> tuple[EvolvedState, object]:
    state = EvolvedState(n)
    policy.bind(state, epochs)
    return state, policy


def plan(policy, state, epoch: int, seed: int = 0):
    return policy.plan_epoch(state, epoch, torch.Generator().manual_seed(seed))


def sampler_plan(policy, state, epoch: int) -> tuple[list[int], torch.Tensor | None, float]:
    """What the sampler makes of the policy's plan for ``epoch``: sorted ids, loss weights, learning-rate scale."""
    sampler = EvolvedSampler(state, policy.num_epochs, planner=policy)
    sampler.set_epoch(epoch)
    return sorted(sampler), sampler.loss_weights, sampler.lr_scale


def sampler_sizes(policy, state) -> list[int]:
    sampler = EvolvedSampler(state, policy.num_epochs, planner=policy)
    return [sampler.epoch_size(e) for e in range(policy.num_epochs)]


# ----------------------------------------------------------------------------------------- plans by hand


def test_infobatch_prunes_half_of_the_lower_half_and_doubles_the_rest():
    state, policy = bound(InfoBatchPolicy(prune_ratio=0.5, delta=0.875), n=8, epochs=8)
    state.sample_buffer("infobatch_loss").copy_(torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4]))
    # Epoch 0 has seen no loss (the sampler prunes no plan there); round(0.125 * 8) = 1 last epoch is not pruned.
    assert sampler_sizes(policy, state) == [8, 6, 6, 6, 6, 6, 6, 8]
    for epoch in (0, 7):
        assert sampler_plan(policy, state, epoch) == (list(range(8)), None, 1.0)
    full = plan(policy, state, 7)
    assert full.ids.tolist() == list(range(8)) and full.loss_weights is None and full.lr_scale == 1.0
    candidates, others = {1, 3, 5, 7}, {0, 2, 4, 6}  # the 4 lowest losses: 0.1, 0.2, 0.3, 0.4
    left_out_pairs = set()
    for seed in range(40):
        epoch_plan = plan(policy, state, 3, seed)
        kept = set(epoch_plan.ids.tolist())
        left_out = candidates - kept
        assert others <= kept and len(left_out) == 2 and len(kept) == 6
        expected = torch.ones(8)
        expected[list(candidates)] = 2.0  # 1 / (1 - r)
        expected[list(left_out)] = 0.0
        assert torch.equal(epoch_plan.loss_weights, expected)
        left_out_pairs.add(tuple(sorted(left_out)))
    assert len(left_out_pairs) == 6  # every pair of candidates can be the pruned one: the draw is uniform-ish


def test_infobatch_weight_stays_unbiased_when_r_times_m_is_not_whole():
    state, policy = bound(InfoBatchPolicy(prune_ratio=0.3), n=10, epochs=8)  # m = 5, P = round(1.5) = 2
    state.sample_buffer("infobatch_loss").copy_(torch.arange(10, dtype=torch.float32))
    epoch_plan = plan(policy, state, 1)
    assert epoch_plan.ids.numel() == 8 == policy.epoch_size(1)
    kept_candidates = [i for i in epoch_plan.ids.tolist() if i < 5]
    assert len(kept_candidates) == 3
    assert epoch_plan.loss_weights[kept_candidates].tolist() == pytest.approx([5 / 3] * 3)


def test_kakurenbo_hides_the_lowest_losses_and_moves_back_wrong_or_unsure_ones():
    state, policy = bound(KakurenboPolicy(prune_ratio=0.3, confidence=0.7), n=10, epochs=5)
    losses = torch.tensor([0.05, 0.01, 0.9, 0.02, 0.5, 0.03, 0.04, 0.8, 0.6, 0.7])
    correct = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1, 1, 1], dtype=torch.float32)  # id 3: low loss, predicted wrongly
    confidence = torch.tensor([0.9, 0.95, 0.3, 0.8, 0.8, 0.6, 0.99, 0.9, 0.9, 0.9])  # id 5 below tau = 0.7
    state.sample_buffer("kakurenbo_loss").copy_(losses)
    state.sample_buffer("kakurenbo_correct").copy_(correct)
    state.sample_buffer("kakurenbo_confidence").copy_(confidence)
    assert sampler_sizes(policy, state)[0] == 10 and sampler_plan(policy, state, 0) == (list(range(10)), None, 1.0)
    epoch_plan = plan(policy, state, 2)
    # By loss: 1 (0.01), 3 (0.02, wrong: moved back), 5 (0.03, unsure: moved back), 6 (0.04), 0 (0.05): q = 3 hidden.
    assert sorted(set(range(10)) - set(epoch_plan.ids.tolist())) == [0, 1, 6]
    assert epoch_plan.lr_scale == pytest.approx(10 / 7)  # 1 / (1 - F), F = 3/10
    assert epoch_plan.loss_weights is None


def test_ucb_keeps_the_largest_upper_bounds_from_hand_computed_emas():
    state, policy = bound(UCBPolicy(prune_ratio=0.5, beta=0.8, c=1.0), n=4, epochs=3)
    visits = [torch.tensor([1.0, 2.0, 3.0, 0.5]), torch.tensor([3.0, 2.0, 1.0, 0.5])]
    for losses in visits:
        policy.observe(state, torch.arange(4), losses)
    # First visit sets m = l, d = 0; second: d = 0.2 |l - m|, m = 0.8 m + 0.2 l.
    mean = [1.4, 2.0, 2.6, 0.5]
    deviation = [0.4, 0.0, 0.4, 0.0]
    assert state.sample_buffer("ucb_mean").tolist() == pytest.approx(mean)
    assert state.sample_buffer("ucb_deviation").tolist() == pytest.approx(deviation)
    # Bounds 1.8, 2.0, 3.0, 0.5: keep the 2 largest.
    assert plan(policy, state, 1).ids.tolist() == [1, 2]
    assert sampler_sizes(policy, state)[0] == 4 and sampler_plan(policy, state, 0)[0] == [0, 1, 2, 3]


def test_ucb_exploration_bonus_keeps_an_uncertain_sample_that_its_mean_alone_would_drop():
    # Sample 0's mean (1.0) is below samples 1 and 2, but its deviation (1.0) lifts its bound m + c*d to 2.0 above
    # both: it is kept. Ranking by the mean alone (c = 0) or by m - c*d (0.0) would keep [1, 2] instead.
    state, policy = bound(UCBPolicy(prune_ratio=0.5, beta=0.8, c=1.0), n=4, epochs=3)
    for losses in (torch.tensor([0.0, 1.5, 1.8, 0.1]), torch.tensor([5.0, 1.5, 1.8, 0.1])):
        policy.observe(state, torch.arange(4), losses)
    assert state.sample_buffer("ucb_mean").tolist() == pytest.approx([1.0, 1.5, 1.8, 0.1])
    assert state.sample_buffer("ucb_deviation").tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert plan(policy, state, 1).ids.tolist() == [0, 2]


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (InfoBatchPolicy, {"prune_ratio": 1.0}, "prune_ratio"),
        (InfoBatchPolicy, {"prune_ratio": -0.1}, "prune_ratio"),
        (InfoBatchPolicy, {"delta": 0.0}, "delta"),
        (InfoBatchPolicy, {"delta": 1.5}, "delta"),
        (KakurenboPolicy, {"prune_ratio": 1.0}, "prune_ratio"),
        (KakurenboPolicy, {"confidence": 0.0}, "confidence"),
        (KakurenboPolicy, {"confidence": 1.2}, "confidence"),
        (UCBPolicy, {"prune_ratio": 1.0}, "prune_ratio"),
        (UCBPolicy, {"c": -1.0}, "c"),
        (UCBPolicy, {"beta": 1.1}, "beta"),
        (UCBPolicy, {"beta": -0.1}, "beta"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_setting(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_settings_a_method_does_not_take_are_refused():
    with pytest.raises(TypeError, match="infobatch"):
        EvolvedTraining("infobatch", 10, 2, beta1=0.3)
    with pytest.raises(ValueError, match="sync='step'"):
        EvolvedTraining("ucb", 10, 2, sync="step")
    assert make_policy("infobatch", prune_ratio=0.2).prune_ratio == 0.2


# ----------------------------------------------------------------------------------------- the training loop

N, EPOCHS, BATCH = 50, 6, 8


def tables():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(N, 5, generator=generator)
    y = torch.randint(0, 3, (N,), generator=generator)
    return x, y


def run(training, model, optimizer, scheduler, epochs, *, stop_at=None):
    """A plain loop; returns the (epoch, ids, weights, lr) of every step. ``stop_at=(epoch, step)`` stops after it."""
    x, y = tables()
    steps = []
    for epoch in epochs:
        training.set_epoch(epoch)
        shard = list(training.sampler)
        for step, first in enumerate(range(0, len(shard), BATCH)):
            ids = torch.tensor(shard[first : first + BATCH])
            batch = training.select(model, ids, x[ids], y[ids])
            logits = model(batch.inputs)
            losses = F.cross_entropy(logits, batch.targets, reduction="none")
            training.observe(batch, losses, outputs=logits)
            optimizer.zero_grad()
            batch.mean_loss(losses).backward()
            with training.scaled_lr(optimizer):
                steps.append((epoch, batch.indices.tolist(), batch.loss_weights, optimizer.param_groups[0]["lr"]))
                optimizer.step()
            scheduler.step()  # OneCycleLR raises if stepped past total_steps
            if stop_at == (epoch, step):
                return steps
    return steps


def setup(method, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training = EvolvedTraining(method, N, EPOCHS, seed=seed, anneal_start=0.2, anneal_end=0.2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=training.total_steps(BATCH))
    return training, model, optimizer, scheduler


@pytest.mark.parametrize("method", list(POLICIES))
def test_step_counts_are_exact_for_every_method(method):
    training, model, optimizer, scheduler = setup(method)
    steps = run(training, model, optimizer, scheduler, range(EPOCHS))
    assert len(steps) == training.total_steps(BATCH)
    per_epoch = [sum(1 for s in steps if s[0] == e) for e in range(EPOCHS)]
    assert per_epoch == [training.sampler.steps_per_epoch(BATCH, epoch=e) for e in range(EPOCHS)]


@pytest.mark.parametrize("method", SET_LEVEL)
def test_set_level_methods_prune_and_weight_in_the_loop(method):
    training, model, optimizer, scheduler = setup(method)
    steps = run(training, model, optimizer, scheduler, range(EPOCHS))
    trained = {e: [i for s in steps if s[0] == e for i in s[1]] for e in range(EPOCHS)}
    assert sorted(trained[0]) == list(range(N))  # nothing pruned before any loss was seen
    assert len(trained[2]) < N and len(set(trained[2])) == len(trained[2])
    assert training.scored_samples == 0 and training.trained_samples == sum(map(len, trained.values()))
    if method == "infobatch":
        # m = 25 candidates, P = round(12.5) = 13 left out: kept candidates weigh 25 / 12.
        weights = torch.cat([s[2] for s in steps if s[0] == 2])
        assert sorted(set(weights.tolist())) == pytest.approx([1.0, 25 / 12]) and int((weights > 1).sum()) == 12
    if method == "kakurenbo":
        lrs = {e: [s[3] for s in steps if s[0] == e] for e in (0, 2)}
        assert training.policy.epoch_size(2) == N - 15  # q = round(0.3 * 50)
        assert lrs[2][0] > 0  # the scaled lr is applied inside the step ...
        assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]  # ... and put back after it


@pytest.mark.parametrize("method", SET_LEVEL)
def test_resume_mid_epoch_is_exact(method):
    whole = setup(method)
    reference = run(*whole, range(EPOCHS))

    first = setup(method)
    before = run(*first, range(EPOCHS), stop_at=(2, 1))
    training, model, optimizer, scheduler = first
    buffer = io.BytesIO()
    torch.save(
        {
            "training": training.state_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = setup(method, seed=0)
    training, model, optimizer, scheduler = resumed
    training.load_state_dict(saved["training"])
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    after = run(*resumed, range(2, EPOCHS))
    combined = before + after
    assert [(e, ids) for e, ids, _, _ in combined] == [(e, ids) for e, ids, _, _ in reference]
    for (_, _, w1, lr1), (_, _, w2, lr2) in zip(combined, reference, strict=True):
        assert lr1 == lr2 and (w1 is None) == (w2 is None) and (w1 is None or torch.equal(w1, w2))
    for name in whole[0].state.sample_buffer_names:
        assert torch.equal(resumed[0].state.sample_buffer(name), whole[0].state.sample_buffer(name))


def test_a_checkpoint_of_another_method_is_refused_before_loading():
    ucb = EvolvedTraining("ucb", N, EPOCHS)
    state = ucb.state.state_dict()
    other = EvolvedState(N)
    with pytest.raises(ValueError, match="sample_buffers"):
        other.load_state_dict(state)
    broken = dict(state, sample_buffers={"ucb_mean": torch.zeros(N), "ucb_deviation": torch.full((N,), math.nan)})
    before = ucb.state.sample_buffer("ucb_mean").clone()
    with pytest.raises(ValueError, match="NaN"):
        ucb.state.load_state_dict(broken)
    assert torch.equal(ucb.state.sample_buffer("ucb_mean"), before)


# ----------------------------------------------------------------------------------------- 2 ranks vs 1 process


def _visit_all(method: str) -> dict[str, torch.Tensor]:
    """Every epoch of ``method`` with per-id logits and losses from fixed tables, so the state is a pure function of
    which ids were visited (no batch-size-dependent rounding); returns the merged buffers, ``s``, ``w`` and the
    scored marks."""
    training, _, _, _ = setup(method)
    generator = torch.Generator().manual_seed(7)
    logits_table = torch.randn(N, 3, generator=generator) * 3
    labels = torch.randint(0, 3, (N,), generator=generator)
    loss_table = F.cross_entropy(logits_table, labels, reduction="none")
    for epoch in range(EPOCHS):
        training.set_epoch(epoch)
        shard = list(training.sampler)
        for first in range(0, len(shard), BATCH):
            ids = torch.tensor(shard[first : first + BATCH])
            batch = training.select(torch.nn.Identity(), ids, logits_table[ids], labels[ids])
            training.observe(batch, loss_table[batch.indices], outputs=batch.inputs)
    state = training.state
    state.sync_epoch()
    merged = {name: state.sample_buffer(name).clone() for name in state.sample_buffer_names}
    return {**merged, "score": state.score.clone(), "weight": state.weight.clone(), "scored": state.scored.clone()}


# ESWP too: its plans keep the samples not scored yet, so ranks that merged other marks would plan other epochs.
MERGED_METHODS = [*SET_LEVEL, "eswp"]


def _distributed_job(rank: int) -> dict:
    torch.set_num_threads(1)
    return {method: _visit_all(method) for method in MERGED_METHODS}


@pytest.mark.multiprocess
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_gloo_ranks_hold_the_single_process_state(tmp_path: Path):
    ranks = launch(_distributed_job, tmp_path)
    for method in MERGED_METHODS:
        single = _visit_all(method)  # plans are drawn from the merged state, so one process sees the same plans
        assert set(single) == set(ranks[0][method])
        for name, value in single.items():
            assert torch.equal(ranks[0][method][name], ranks[1][method][name]), (method, name)
            assert torch.equal(ranks[0][method][name], value), (method, name)


# ----------------------------------------------------------------------------------------- the es-compare command


def test_compare_command_runs_a_tiny_configuration(tmp_path: Path, capsys):
    from es_kernels.train import compare

    argv = ["--methods", "baseline", "es", "infobatch", "kakurenbo", "--seeds", "0", "--epochs", "2"]
    argv += ["--width", "2", "--pretrain-epochs", "0", "--no-progress", "--threads", "1"]
    rows = compare.run([*argv, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    assert "| " + " | ".join(compare.TABLE_COLUMNS) + " |" in printed
    assert [row["method"] for row in rows] == ["baseline", "es", "infobatch", "kakurenbo"]
    assert rows[1]["backprop_samples"] < rows[0]["backprop_samples"]  # ES back-propagates k of B rows
    assert (tmp_path / "out" / "results.json").exists()


def test_compare_help_lists_every_option_with_its_default(capsys):
    from es_kernels.train import compare

    with pytest.raises(SystemExit) as exit_info:
        compare.run(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--methods", "--seeds", "--epochs", "--full", "--noise", "--no-progress", "--out", "--cache-dir"):
        assert option in text
    assert text.count("default") >= 13
