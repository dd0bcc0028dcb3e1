"""One loop for every method: the README's first loop trains each method by name, and a loop that skips what a
method needs raises instead of training another method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from es_kernels import EvolvedSampler, EvolvedState, EvolvedTraining, IndexedDataset, evolved_select
from es_kernels.policies import POLICIES, EvolvedPolicy, InfoBatchPolicy
from es_kernels.train import METHODS

N, CLASSES, EPOCHS, BATCH = 64, 3, 5, 16


def setup(method, **settings):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=generator)
    y = torch.randint(0, CLASSES, (N,), generator=generator)
    model = torch.nn.Linear(5, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training = EvolvedTraining(method, N, EPOCHS, anneal_start=0.2, anneal_end=0.2, **settings)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, sampler=training.sampler)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=training.total_steps(BATCH))
    return model, optimizer, scheduler, training, loader


def steps(model, training, loader):
    """The part of every loop that is the same: (epoch, batch, logits, per-sample losses) per step."""
    for epoch in range(EPOCHS):
        training.set_epoch(epoch)
        for indices, inputs, targets in loader:
            batch = training.select(model, indices, inputs, targets)
            logits = model(batch.inputs)
            yield epoch, batch, logits, F.cross_entropy(logits, batch.targets, reduction="none")


def readme_loop(model, optimizer, scheduler, training, loader):
    """The README's first loop, but for the recording; returns one record per step."""
    records = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: records[-1].update(lr=opt.param_groups[0]["lr"]))
    for epoch, batch, logits, losses in steps(model, training, loader):
        loss = training.observe(batch, losses, outputs=logits)
        records.append(dict(epoch=epoch, loss=loss.item(), losses=losses.detach(), batch=batch))
        records[-1]["scheduled_lr"] = scheduler.get_last_lr()[0]
        records[-1]["lr_scale"] = training.lr_scale
        loss.backward()
        with training.scaled_lr(optimizer):
            optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return records


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_readme_loop_trains_every_method_as_it_defines(method):
    run = setup(method)
    records = readme_loop(*run)
    training = run[3]
    assert len(records) == training.total_steps(BATCH)
    for record in records:
        batch, losses = record["batch"], record["losses"]
        weights = torch.ones_like(losses) if batch.loss_weights is None else batch.loss_weights
        assert record["loss"] == pytest.approx((losses * weights).mean().item(), rel=1e-6)
        assert record["lr"] == pytest.approx(record["scheduled_lr"] * record["lr_scale"], rel=1e-12)
    weighted = [r for r in records if r["batch"].loss_weights is not None]
    scaled = [r for r in records if r["lr_scale"] != 1.0]
    # What each method defines shows in the loop: InfoBatch up-weights kept low-loss rows by 1/(1-r) = 2 in its
    # pruning epochs, KAKURENBO scales the learning rate by 1/(1-q/n) from epoch 1, and no other method does either.
    if method == "infobatch":
        assert weighted and all(r["epoch"] >= 1 for r in weighted)
        assert any((r["batch"].loss_weights == 2.0).any() for r in weighted)
    else:
        assert not weighted
    if method == "kakurenbo":
        hidden = round(0.3 * N)
        assert scaled and all(r["lr_scale"] == pytest.approx(N / (N - hidden)) for r in scaled)
        assert {r["epoch"] for r in scaled} == set(range(1, EPOCHS))
    else:
        assert not scaled


def old_loop(model, optimizer, training, loader, *, observe=True, outputs=False):
    """A loop written for ES alone: a plain mean, a plain optimizer step."""
    for _, batch, logits, losses in steps(model, training, loader):
        if observe:
            training.observe(batch, losses, **({"outputs": logits} if outputs else {}))
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", ["baseline", "es", "eswp", "loss", "order", "ucb"])
def test_a_loop_written_for_es_still_trains_methods_that_need_nothing_more(method):
    """Exactly as the README's loop does: the same parameters and the same state after every epoch."""

    class ConstantRate:  # the old loop keeps the optimizer's rate, so the README loop gets the same
        def get_last_lr(self):
            return [0.1]

        def step(self):
            pass

    old_model, old_optimizer, _, old_training, old_loader = setup(method)
    old_loop(old_model, old_optimizer, old_training, old_loader)
    model, optimizer, _, training, loader = setup(method)
    readme_loop(model, optimizer, ConstantRate(), training, loader)
    for old, new in zip(old_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(old, new)
    assert torch.equal(old_training.state.score, training.state.score)
    assert torch.equal(old_training.state.weight, training.state.weight)


def test_infobatch_in_a_loop_that_back_propagates_the_plain_mean_raises_naming_the_fix():
    model, optimizer, _, training, loader = setup("infobatch")
    with pytest.raises(RuntimeError, match=r"infobatch: this epoch's plan weights .* training.observe"):
        old_loop(model, optimizer, training, loader)


def test_kakurenbo_stepping_outside_scaled_lr_raises_before_the_step():
    model, optimizer, _, training, loader = setup("kakurenbo")
    with pytest.raises(RuntimeError, match=r"kakurenbo: .* training.scaled_lr\(optimizer\)"):
        old_loop(model, optimizer, training, loader, outputs=True)
    assert training.sampler.epoch == 1  # epoch 0 keeps every id at factor 1: the first scaled step is refused
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="scaled_lr"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_kakurenbo_without_outputs_raises_naming_the_argument():
    model, optimizer, _, training, loader = setup("kakurenbo")
    with pytest.raises(ValueError, match="outputs=logits"):
        old_loop(model, optimizer, training, loader)


@pytest.mark.parametrize("method", ["infobatch", "kakurenbo", "ucb", "es"])
def test_a_batch_trained_without_observe_raises_at_the_next_step(method):
    model, optimizer, _, training, loader = setup(method)
    with pytest.raises(RuntimeError, match=rf"{method}: the previous batch was trained without training.observe"):
        old_loop(model, optimizer, training, loader, observe=False)


def test_another_models_optimizer_is_left_alone_in_a_scaled_epoch():
    model, optimizer, scheduler, training, loader = setup("kakurenbo")
    readme_loop(model, optimizer, scheduler, training, loader)
    assert training.lr_scale != 1.0
    other = torch.nn.Linear(2, 2)
    other(torch.ones(1, 2)).sum().backward()
    torch.optim.SGD(other.parameters(), lr=0.1).step()


def readme_first_loop() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### The training helper") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_readme_code_itself_runs_every_method_by_name(method):
    # The README's block as written, on the CPU: only the device and the method's name are replaced.
    code = readme_first_loop()
    assert 'EvolvedTraining("es",' in code and code.count(".cuda()") == 2
    code = code.replace('EvolvedTraining("es",', f"EvolvedTraining({method!r},").replace(".cuda()", "")
    code = code.replace('device="cuda"', 'device="cpu"')
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(
        torch.randn(N, 5, generator=generator), torch.randint(0, CLASSES, (N,), generator=generator)
    )
    model = torch.nn.Linear(5, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    namespace = {"torch": torch, "dataset": dataset, "E": EPOCHS, "model": model, "optimizer": optimizer}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["training"].method == method
    assert namespace["training"].sampler.epoch == EPOCHS - 1 and len(namespace["training"].sampler) == 0


# ----------------------------------------------------------------------------------------- one policy interface


def test_every_method_is_one_policy_the_sampler_only_shuffles_and_shards():
    for method in METHODS:
        training = EvolvedTraining(method, N, EPOCHS)
        assert training.sampler.planner is training.policy
    default = EvolvedSampler(EvolvedState(N), EPOCHS, prune_ratio=0.25)
    assert isinstance(default.planner, EvolvedPolicy) and default.planner.prune_ratio == 0.25


def test_a_planner_beside_sampler_settings_or_unbound_is_refused_naming_the_argument():
    state = EvolvedState(N)
    with pytest.raises(ValueError, match="planner: bind it"):
        EvolvedSampler(state, EPOCHS, planner=InfoBatchPolicy())
    policy = InfoBatchPolicy()
    policy.bind(state, EPOCHS)
    with pytest.raises(ValueError, match="prune_ratio"):
        EvolvedSampler(state, EPOCHS, planner=policy, prune_ratio=0.2)
    with pytest.raises(ValueError, match="anneal_start"):
        EvolvedSampler(state, EPOCHS, planner=policy, anneal_start=0.4)
    with pytest.raises(TypeError, match="planner"):
        EvolvedSampler(state, EPOCHS, planner="infobatch")


def test_choose_is_the_batch_level_choice_of_each_policy():
    losses = torch.tensor([0.5, 3.0, 1.0, 3.0, 0.1, 2.0])
    ids = torch.arange(6)
    order = POLICIES["order"]()
    state = EvolvedState(6, beta1=0.0, beta2=0.0)
    rows, seen = order.choose(state, ids, 3, generator=torch.Generator().manual_seed(0), losses=losses)
    assert rows.tolist() == [1, 3, 5] and torch.equal(seen, losses)  # the 3 largest, ties by position
    race = POLICIES["es"]()
    state, twin = EvolvedState(6), EvolvedState(6)
    rows, _ = race.choose(state, ids, 2, generator=torch.Generator().manual_seed(0), losses=losses)
    # ES's choice is evolved_select's draw itself: the same rows and the same state from the same generator.
    expected = evolved_select(twin, ids, 2, losses=losses, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rows, expected) and torch.equal(state.weight, twin.weight)
    rows, seen = POLICIES["baseline"]().choose(EvolvedState(6), ids, 2, generator=torch.Generator())
    assert rows.tolist() == list(range(6)) and seen is None  # the baseline keeps every row


def test_a_methods_own_settings_are_given_by_name_without_subclassing():
    training = EvolvedTraining("kakurenbo", N, EPOCHS, settings={"confidence": 0.8}, prune_ratio=0.2)
    assert (training.policy.confidence, training.policy.prune_ratio) == (0.8, 0.2)
    assert EvolvedTraining("infobatch", N, EPOCHS, settings={"delta": 0.5}).policy.delta == 0.5
    assert EvolvedTraining("eswp", N, EPOCHS, settings={"prune_by": "score"}).sampler.prune_by == "score"
    with pytest.raises(TypeError, match="'infobatch' does not take"):
        EvolvedTraining("infobatch", N, EPOCHS, settings={"confidence": 0.8})
    with pytest.raises(ValueError, match="settings"):
        EvolvedTraining("infobatch", N, EPOCHS, settings={"prune_ratio": 0.1}, prune_ratio=0.2)
    with pytest.raises(ValueError, match="delta"):
        EvolvedTraining("infobatch", N, EPOCHS, settings={"delta": 0.0})
    with pytest.raises(TypeError, match="settings"):
        EvolvedTraining("infobatch", N, EPOCHS, settings=[("delta", 0.5)])
    with pytest.raises(ValueError, match="not beside a policy"):
        EvolvedTraining(InfoBatchPolicy(), N, EPOCHS, settings={"delta": 0.5})


def test_the_vit_recipe_takes_each_methods_own_settings(tmp_path):
    from es_kernels.train.vit import cli, config
    from es_kernels.train.vit.recipe import make_training
    from es_kernels.train.vit.runtime import Runtime

    argv = ["--data", str(tmp_path), "--method", "infobatch", "kakurenbo", "--method-settings", "infobatch:delta=0.5"]
    args = cli.parse_args([*argv, "kakurenbo:confidence=0.9"])
    config.check_arguments(args)
    runtime = Runtime(torch.device("cpu"), rank=0, world_size=1, distributed=False, owns_group=False, precision="fp32")
    assert make_training(args, "infobatch", N, runtime).policy.delta == 0.5
    assert make_training(args, "kakurenbo", N, runtime).policy.confidence == 0.9
    assert config.run_config(args, "infobatch", 1, "fp32")["method_settings"] == {"delta": 0.5}
    assert config.run_config(args, "kakurenbo", 1, "fp32")["method_settings"] == {"confidence": 0.9}
    with pytest.raises(config.ConfigError, match="--method-settings names \\['ucb'\\]"):
        config.check_arguments(cli.parse_args([*argv, "ucb:c=2"]))
    with pytest.raises(SystemExit):
        cli.parse_args([*argv, "nosuch:c=2"])
