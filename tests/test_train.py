"""EvolvedTraining, the data utilities, and the digits demo."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from es_kernels import EvolvedTraining, IndexedDataset, corrupt_labels
from es_kernels.train import digits

N, CLASSES, EPOCHS, BATCH = 96, 4, 6, 16


def toy_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 5, generator=generator)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return x, y


def make_run(method="es", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"anneal_start": 0.2, "anneal_end": 0.2, **kwargs}
    training = EvolvedTraining(method, N, EPOCHS, seed=seed, **kwargs)
    x, y = toy_data()
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, sampler=training.sampler)
    return model, optimizer, training, loader


def run_steps(model, optimizer, training, loader, start_epoch, stop_after=None, log=None):
    """The README loop; stops after ``stop_after`` steps in total (None: to the end). Logs trained ids."""
    steps = 0
    for epoch in range(start_epoch, EPOCHS):
        training.set_epoch(epoch)
        for indices, inputs, targets in loader:
            batch = training.select(model, indices, inputs, targets)
            losses = F.cross_entropy(model(batch.inputs), batch.targets, reduction="none")
            training.observe(batch, losses)
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
            if log is not None:
                log.append((epoch, batch.indices.tolist()))
            steps += 1
            if stop_after is not None and steps == stop_after:
                return epoch
    return EPOCHS


def test_es_selects_k_rows_in_selecting_epochs_and_all_rows_in_annealing():
    model, optimizer, training, loader = make_run()
    log = []
    run_steps(model, optimizer, training, loader, 0, log=log)
    for epoch, ids in log:
        expected = BATCH if epoch in (0, EPOCHS - 1) else training.num_selected(BATCH)
        assert len(ids) == expected
    assert training.trained_samples == sum(len(ids) for _, ids in log)
    assert training.scored_samples == 4 * N  # 4 selecting epochs of N rows


def test_every_sample_is_visited_in_a_six_epoch_eswp_run():
    # The paper's 5% annealing covers none of 6 epochs. Epoch 0 used to prune 20% uniformly from w = 1/n; never
    # scored, those samples kept 1/n against scored weights ~1 and were practically never drawn again.
    model, optimizer, training, loader = make_run("eswp", anneal_start=0.05, anneal_end=0.05)
    assert training.sampler.is_selecting(0)
    visited: set[int] = set()
    for epoch in range(EPOCHS):
        training.set_epoch(epoch)
        for indices, inputs, targets in loader:
            visited.update(indices.tolist())  # the meta-batch: every row is scored by select
            batch = training.select(model, indices, inputs, targets)
            optimizer.zero_grad()
            F.cross_entropy(model(batch.inputs), batch.targets).backward()
            optimizer.step()
    assert visited == set(range(N))
    assert bool(training.state.scored.all())
    assert training.scored_samples == N + 5 * round(0.8 * N)  # epoch 0 whole, then pruned epochs


def test_selected_rows_keep_their_inputs_and_targets_together():
    model, _, training, loader = make_run()
    training.set_epoch(2)
    x, y = toy_data()
    for indices, inputs, targets in loader:
        batch = training.select(model, indices, inputs, targets)
        assert torch.equal(batch.inputs, x[batch.indices]) and torch.equal(batch.targets, y[batch.indices])


def test_annealing_epochs_update_the_state_from_training_losses():
    model, optimizer, training, loader = make_run()
    before = training.state.weight.clone()
    run_steps(model, optimizer, training, loader, 0, stop_after=N // BATCH)  # epoch 0 is annealing
    assert not torch.equal(training.state.weight, before)
    assert (training.state.weight != before).sum() == N  # every sample seen once in the full epoch


def test_baseline_trains_every_row_through_the_same_loop_and_keeps_no_state():
    model, optimizer, training, loader = make_run("baseline")
    before = training.state.weight.clone()
    log = []
    run_steps(model, optimizer, training, loader, 0, log=log)
    assert all(len(ids) == BATCH for _, ids in log)
    assert training.trained_samples == EPOCHS * N and training.scored_samples == 0
    assert torch.equal(training.state.weight, before)


def test_scoring_forward_in_eval_mode_leaves_batchnorm_and_mode_alone():
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, CLASSES))
    training = EvolvedTraining("es", N, EPOCHS, anneal_start=0, anneal_end=0)
    x, y = toy_data()
    running_mean = model[1].running_mean.clone()
    model.train()
    training.select(model, torch.arange(BATCH), x[:BATCH], y[:BATCH])
    assert model.training
    assert torch.equal(model[1].running_mean, running_mean)
    train_mode = EvolvedTraining("es", N, EPOCHS, anneal_start=0, anneal_end=0, scoring_mode="train")
    train_mode.select(model, torch.arange(BATCH), x[:BATCH], y[:BATCH])
    assert not torch.equal(model[1].running_mean, running_mean)


def test_loss_fn_for_other_tasks():
    training = EvolvedTraining("loss", N, EPOCHS, anneal_start=0, anneal_end=0, select_ratio=0.5)
    model = torch.nn.Linear(5, 1)
    x = torch.randn(BATCH, 5)
    target = torch.randn(BATCH, 1)
    batch = training.select(model, torch.arange(BATCH), x, target, loss_fn=lambda out, t: ((out - t) ** 2).squeeze(1))
    assert batch.indices.numel() == BATCH // 2
    expected = ((model(x) - target) ** 2).squeeze(1).detach()
    assert torch.allclose(training.state.weight[:BATCH], expected)  # b1 = 0: w is the loss itself


def test_resume_mid_epoch_gives_the_same_run():
    model, optimizer, training, loader = make_run("eswp")
    full_log = []
    run_steps(model, optimizer, training, loader, 0, log=full_log)
    reference_state = training.state.state_dict()

    model, optimizer, training, loader = make_run("eswp")
    first_log = []
    stopped_epoch = run_steps(model, optimizer, training, loader, 0, stop_after=13, log=first_log)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "es": training.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model, optimizer, training, loader = make_run("eswp", seed=0)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    training.load_state_dict(saved["es"])
    rest_log = []
    run_steps(model, optimizer, training, loader, stopped_epoch, log=rest_log)
    assert first_log + rest_log == full_log
    assert torch.equal(training.state.score, reference_state["score"])
    assert torch.equal(training.state.weight, reference_state["weight"])


def test_padding_rows_are_dropped_so_no_sample_updates_twice():
    n = 10  # 2 ranks, 10 ids: no padding; 3 ranks: 2 padded positions
    trainings = [
        EvolvedTraining("es", n, 3, anneal_start=0, anneal_end=0, num_replicas=3, rank=r, sync="off") for r in range(3)
    ]
    model = torch.nn.Linear(5, CLASSES)
    x, y = torch.randn(n, 5), torch.randint(0, CLASSES, (n,))
    seen = []
    for training in trainings:
        training.set_epoch(0)
        shard = torch.tensor(list(training.sampler))
        batch = training.select(model, shard, x[shard], y[shard])
        seen += training.state.weight.ne(0.1).nonzero().flatten().tolist()  # ids this rank's state updated
        assert batch.indices.numel() <= training.num_selected(shard.numel())
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"method": "magic"}, ValueError, "method"),
        ({"select_ratio": 0.0}, ValueError, "select_ratio"),
        ({"select_ratio": 1.5}, ValueError, "select_ratio"),
        ({"scoring_mode": "test"}, ValueError, "scoring_mode"),
        ({"prune_ratio": 1.0}, ValueError, "prune_ratio"),
        ({"beta1": 2.0}, ValueError, "beta1"),
        ({"num_epochs": 0}, ValueError, "num_epochs"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, error, name):
    args = {"method": "es", "num_samples": N, "num_epochs": EPOCHS, **kwargs}
    with pytest.raises(error, match=name):
        EvolvedTraining(**args)


# ----------------------------------------------------------------------------------------- data utilities


def test_indexed_dataset_puts_the_id_first():
    dataset = IndexedDataset(TensorDataset(torch.arange(5) * 10, torch.arange(5)))
    assert dataset[3][0] == 3 and dataset[3][1].item() == 30 and len(dataset) == 5
    assert IndexedDataset([7, 8])[1] == (1, 8)


@pytest.mark.parametrize("mode", ["uniform", "flip"])
def test_label_noise_changes_exactly_the_rate_and_is_seeded(mode):
    labels = torch.arange(1000) % 10
    noisy, mask = corrupt_labels(labels, 0.4, num_classes=10, mode=mode, seed=3)
    assert mask.sum() == 400
    assert torch.equal(noisy != labels, mask)  # every corrupted label really changed, no other did
    if mode == "flip":
        assert torch.equal(noisy[mask], (labels[mask] + 1) % 10)
    else:
        assert len(set(noisy[mask].tolist())) == 10
    again, _ = corrupt_labels(labels, 0.4, num_classes=10, mode=mode, seed=3)
    assert torch.equal(noisy, again)


def test_label_noise_bad_input():
    with pytest.raises(ValueError, match="rate"):
        corrupt_labels(torch.zeros(4, dtype=torch.long), 1.5, num_classes=3)
    with pytest.raises(ValueError, match="mode"):
        corrupt_labels(torch.zeros(4, dtype=torch.long), 0.1, num_classes=3, mode="pair")
    with pytest.raises(ValueError, match="labels"):
        corrupt_labels(torch.tensor([0, 5]), 0.1, num_classes=3)


# ----------------------------------------------------------------------------------------- the digits demo


@pytest.mark.slow  # a training run (Liger's convergence tests are opt-in the same way)
def test_digits_demo_writes_results(tmp_path):
    out = tmp_path / "results.json"
    rows = digits.run(["--methods", "baseline", "es", "--seeds", "0", "--epochs", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [row["method"] for row in saved["summary"]] == ["baseline", "es"] == [row["method"] for row in rows]
    baseline, es = saved["summary"]
    assert baseline["backprop_samples"] == 3 * 1347
    assert es["backprop_samples"] < baseline["backprop_samples"]
    assert len(saved["runs"][0]["curve"]) == 3


def test_digits_demo_rejects_bad_noise():
    with pytest.raises(SystemExit):
        digits.main(["--noise", "gaussian:0.2"])


def test_order_trains_the_k_largest_scoring_losses_and_updates_the_state():
    from es_kernels.reference import per_sample_cross_entropy

    model, _, training, loader = make_run("order", label_smoothing=0.1)
    training.set_epoch(2)  # a selecting epoch (annealing covers epochs 0-1 and 5 of 6)
    indices, inputs, targets = next(iter(loader))  # a DataLoader iterator draws its seed: read the RNG after
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        expected_losses = per_sample_cross_entropy(model.eval()(inputs), targets, 0.1)
    model.train()
    batch = training.select(model, indices, inputs, targets)
    k = training.num_selected(BATCH)
    top = set(expected_losses.topk(k).indices.tolist())
    assert batch.scored and set(batch.indices.tolist()) == {int(indices[i]) for i in top}
    assert torch.equal(batch.targets, targets[sorted(top)])
    # b1 = b2 = 0: the weight and score are the latest loss of each scored sample
    assert torch.allclose(training.state.weight[indices], expected_losses, rtol=1e-6, atol=0)
    assert torch.allclose(training.state.score[indices], expected_losses, rtol=1e-6, atol=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no draw at all, from any generator
    assert training.trained_samples == k and training.scored_samples == BATCH


def test_order_breaks_ties_to_the_lower_position():
    training = EvolvedTraining("order", N, EPOCHS, anneal_start=0.0, anneal_end=0.0)
    training.set_epoch(0)
    indices = torch.arange(BATCH).flip(0)  # ids need not be sorted; positions decide ties
    labels = torch.zeros(BATCH, dtype=torch.int64)
    batch = training.select(torch.nn.Identity(), indices, torch.zeros(BATCH, CLASSES), labels)
    k = training.num_selected(BATCH)
    assert batch.indices.tolist() == indices[:k].tolist()


def test_order_with_a_loss_fn_and_soft_targets():
    training = EvolvedTraining("order", N, EPOCHS, anneal_start=0.0, anneal_end=0.0)
    training.set_epoch(0)
    indices = torch.arange(8)
    losses = torch.tensor([0.5, 3.0, 0.1, 2.0, 2.0, 0.0, 1.0, 4.0])
    batch = training.select(torch.nn.Identity(), indices, losses, losses, loss_fn=lambda out, _: out)
    assert batch.indices.tolist() == [1, 7]  # k = round(0.25 * 8) = 2
    assert torch.equal(training.state.weight[indices], losses)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, CLASSES, generator=generator)
    soft = torch.rand(8, CLASSES, generator=generator).softmax(dim=1)
    batch = training.select(torch.nn.Identity(), indices + 8, logits, soft)
    expected = -(soft * logits.log_softmax(dim=1)).sum(dim=1)
    assert set(batch.indices.tolist()) == set((expected.topk(2).indices + 8).tolist())


@pytest.mark.slow
def test_es_beats_the_baseline_under_40_percent_label_noise(tmp_path):
    """The demo's default setting (uniform 40% noise, 40 epochs, 3 seeds): ES's mean clean test accuracy is higher.

    The README's results table holds the measured figures (ES won on every seed there).
    """
    rows = digits.run(["--methods", "baseline", "es", "--out", str(tmp_path / "r.json")])
    baseline, es = rows
    assert es["test_accuracy_mean"] > baseline["test_accuracy_mean"]


def test_select_accepts_mixup_form_targets():
    training = EvolvedTraining("es", N, EPOCHS, anneal_start=0, anneal_end=0, select_ratio=0.5)
    x, y = toy_data()
    model = torch.nn.Linear(5, CLASSES)
    targets = (y[:BATCH], y[BATCH : 2 * BATCH], 0.7)
    batch = training.select(model, torch.arange(BATCH), x[:BATCH], targets)
    y_a, y_b, lam = batch.targets
    assert lam == 0.7 and torch.equal(y_a, y[batch.indices]) and torch.equal(y_b, y[batch.indices + BATCH])


def test_a_raising_select_moves_nothing():
    model, _, training, loader = make_run()
    training.set_epoch(2)
    indices, inputs, targets = next(iter(loader))
    before = training.state_dict()
    with pytest.raises(ValueError, match="targets"):
        training.select(model, indices, inputs, targets + CLASSES)
    assert training.sampler.position == 0 and training.scored_samples == 0
    assert torch.equal(training.state.weight, before["state"]["weight"])
    training.select(model, indices, inputs, targets)  # the retry succeeds and only now moves the position
    assert training.sampler.position == BATCH


def test_order_method_checks_its_targets_like_the_others():
    model, _, training, loader = make_run("order")
    training.set_epoch(2)
    indices, inputs, targets = next(iter(loader))
    with pytest.raises(ValueError, match="targets"):
        training.select(model, indices, inputs, targets + CLASSES)


def test_load_state_dict_is_all_or_nothing():
    _, _, training, _ = make_run()
    training.state.observe(torch.arange(4), torch.ones(4))
    saved = training.state_dict()
    _, _, other, _ = make_run()
    broken = other.state_dict()
    broken["sampler"]["rank"] = 1  # the state part is fine, the sampler part fails after it
    with pytest.raises(ValueError, match="rank"):
        training.load_state_dict(broken)
    assert torch.equal(training.state.weight, saved["state"]["weight"])


def test_check_values_off_skips_the_checks():
    model, _, training, loader = make_run(check_values=False)
    assert training.check_values is False
    training.set_epoch(2)
    indices, inputs, targets = next(iter(loader))
    batch = training.select(model, indices, inputs, targets)
    assert batch.indices.numel() == training.num_selected(BATCH)


@pytest.mark.parametrize("epoch", [0, 2])  # annealing and selecting: the same check in both
def test_observe_checks_the_losses_shape_in_every_epoch(epoch):
    model, _, training, loader = make_run()
    training.set_epoch(epoch)
    indices, inputs, targets = next(iter(loader))
    batch = training.select(model, indices, inputs, targets)
    scalar = F.cross_entropy(model(batch.inputs), batch.targets)  # reduction="mean": the classic slip
    with pytest.raises(ValueError, match=r"losses must be per-sample.*reduction='none'"):
        training.observe(batch, scalar)


def test_selecting_the_same_batch_twice_in_an_epoch_is_refused():
    model, _, training, loader = make_run()
    training.set_epoch(2)
    indices, inputs, targets = next(iter(loader))
    training.select(model, indices, inputs, targets)
    weight = training.state.weight.clone()
    first = ", ".join(str(i) for i in indices[:8].tolist())
    named = rf"ids \[{first}, \.\.\. \({BATCH} in all\)\] were already visited in epoch 2"
    with pytest.raises(ValueError, match=named):
        training.select(model, indices, inputs, targets)
    assert torch.equal(training.state.weight, weight)


def test_resume_keeps_the_visit_marks_of_the_epoch():
    model, optimizer, training, loader = make_run()
    run_steps(model, optimizer, training, loader, 0, stop_after=8)  # into selecting epoch 1
    saved = training.state_dict()
    _, _, resumed, _ = make_run()
    resumed.load_state_dict(saved)
    resumed.set_epoch(resumed.sampler.epoch)
    done = resumed.sampler.state_dict()["shard"][: resumed.sampler.position]
    x, y = toy_data()
    with pytest.raises(ValueError, match="already visited"):
        resumed.select(model, done[:BATCH], x[done[:BATCH]], y[done[:BATCH]])


def test_a_hand_built_schedule_is_reported():
    # The trial: E * len(loader) for OneCycle under ESWP planned more steps than the run takes.
    _, optimizer, training, loader = make_run("eswp")
    by_hand = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=EPOCHS * len(loader))
    with pytest.warns(UserWarning, match=rf"plans {EPOCHS * len(loader)} steps .* takes {training.total_steps(BATCH)}"):
        assert not training.check_scheduler(by_hand, BATCH)
    right = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=training.total_steps(BATCH))
    assert training.check_scheduler(right, BATCH)
    with pytest.raises(TypeError, match="scheduler"):
        training.check_scheduler(torch.optim.lr_scheduler.StepLR(optimizer, 3), BATCH)


def test_a_loop_that_disagrees_with_the_planned_steps_is_reported_at_the_epoch_boundary():
    model, optimizer, training, loader = make_run("eswp")
    training.total_steps(2 * BATCH)  # planned with another batch size than the DataLoader's
    with pytest.warns(UserWarning, match=r"epoch 0 took 6 DataLoader steps, but total_steps\(32"):
        run_steps(model, optimizer, training, loader, 0, stop_after=N // BATCH + 1)
    import warnings

    model, optimizer, training, loader = make_run("eswp")
    training.total_steps(BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_steps(model, optimizer, training, loader, 0)


def test_score_annealing_updates_the_state_from_the_unmixed_rows():
    # Mixup: the training forward's losses belong to mixtures; with score_annealing the state gets the scoring
    # forward's losses of the original rows, and observe (fed mixed losses) changes nothing.
    model, _, training, loader = make_run("es", beta1=0.0, score_annealing=True)
    training.set_epoch(0)  # annealing
    indices, inputs, targets = next(iter(loader))
    batch = training.select(model, indices, inputs, targets)
    assert batch.scored and torch.equal(batch.indices, indices)
    with torch.no_grad():
        clean = F.cross_entropy(model.eval()(inputs), targets, reduction="none")
    assert torch.allclose(training.state.weight[indices], clean, rtol=1e-5, atol=1e-6)  # b1 = 0: w is the loss
    mixed = 0.5 * inputs + 0.5 * inputs.flip(0)
    training.observe(batch, F.cross_entropy(model(mixed), targets, reduction="none"))
    assert torch.allclose(training.state.weight[indices], clean, rtol=1e-5, atol=1e-6)
    assert training.trained_samples == BATCH and training.scored_samples == BATCH


def test_digits_says_when_its_timings_are_not_trustworthy(monkeypatch, tmp_path, capsys):
    from es_kernels import _timing

    def instant(method, data, args, seed, progress):
        return {"method": method, "seed": seed, "test_accuracy": 0.9, "seconds": 1.0, "backprop_samples": 1,
                "scored_samples": 1, "curve": []}  # fmt: skip

    monkeypatch.setattr(digits, "train_one", instant)
    monkeypatch.setattr(_timing, "LOAD_SOURCE", lambda: (40.0, 40.0, 40.0))
    digits.main(["--seeds", "0", "--epochs", "1", "--out", str(tmp_path / "r.json")])
    assert "warning: the timings above are not trustworthy (machine loaded" in capsys.readouterr().out
    monkeypatch.setattr(_timing, "LOAD_SOURCE", lambda: (0.0, 0.0, 0.0))
    digits.main(["--seeds", "0", "--epochs", "1", "--out", str(tmp_path / "r.json")])
    assert "not trustworthy" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, expected",
    [("none", None), ("uniform:0.4", ("uniform", 0.4)), ("flip:0", ("flip", 0.0))],
)
def test_noise_option_parses_every_accepted_form(text, expected):
    from es_kernels.train.data import parse_label_noise

    assert parse_label_noise(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus", "MODE:RATE"),
        ("uniform:", "MODE:RATE"),
        ("flip:x", "rate must be a number"),
        ("uniform:1", r"\[0, 1\)"),
    ],
)
def test_noise_option_refuses_bad_text_on_every_command(text, message):
    import argparse

    from es_kernels.train import compare
    from es_kernels.train.vit import cli

    for parser, option in (
        (digits.build_parser(), "--noise"),
        (compare.build_parser(), "--noise"),
        (cli.build_parser(), "--label-noise"),
    ):
        action = next(a for a in parser._actions if option in a.option_strings)
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            action.type(text)
