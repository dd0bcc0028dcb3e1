"""evolved_select / evolved_prune on the reference backend: losses, sampling law, determinism, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from es_kernels import (
    BackendUnavailableError,
    EvolvedState,
    MixupTargets,
    backend_status,
    evolved_prune,
    evolved_select,
    last_backend,
)
from es_kernels.testing import CHI_SQUARE_ALPHA, inclusion_probabilities, subset_chi_square_pvalue


def fixed_weight_state(weights: list[float]) -> EvolvedState:
    """With beta1 = 0 a visit sets w = loss exactly, so passing the weights as losses fixes the law."""
    return EvolvedState(len(weights), beta1=0.0, beta2=0.5)


def cross_entropy_by_hand(logits, label, smoothing=0.0):
    logits = [float(x) for x in logits]
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    nll = lse - logits[label]
    uniform = lse - sum(logits) / len(logits)
    return (1 - smoothing) * nll + smoothing * uniform


# ----------------------------------------------------------------------------------------- per-sample losses


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_hard_label_losses_match_the_formula(smoothing):
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 6, 3, 3, 1])
    state = EvolvedState(10)
    _, losses = evolved_select(
        state, torch.arange(5), 2, logits=logits, targets=labels, label_smoothing=smoothing, return_losses=True
    )
    expected = [cross_entropy_by_hand(logits[i], labels[i], smoothing) for i in range(5)]
    assert losses.dtype == torch.float32
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert state.score[:5].tolist() == pytest.approx([0.9 * 0.1 + 0.1 * x for x in expected], rel=1e-5)


def test_soft_and_mixup_targets():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, generator=gen)
    y_a, y_b, lam = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 4, 3, 2]), 0.3
    soft = torch.zeros(4, 6)
    soft[torch.arange(4), y_a] += lam
    soft[torch.arange(4), y_b] += 1 - lam
    state = EvolvedState(4)
    _, soft_losses = evolved_select(state, torch.arange(4), 1, logits=logits, targets=soft, return_losses=True)
    _, mix_losses = evolved_select(
        state, torch.arange(4), 1, logits=logits, targets=(y_a, y_b, lam), return_losses=True
    )
    expected = [
        lam * cross_entropy_by_hand(logits[i], y_a[i]) + (1 - lam) * cross_entropy_by_hand(logits[i], y_b[i])
        for i in range(4)
    ]
    assert soft_losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert mix_losses.tolist() == pytest.approx(expected, rel=1e-5)
    _, named = evolved_select(
        state, torch.arange(4), 1, logits=logits, targets=MixupTargets(y_a, y_b, lam), return_losses=True
    )
    assert torch.equal(named, mix_losses)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_fp32_losses(dtype):
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(2)).to(dtype)
    labels = torch.tensor([1, 2, 10])
    _, losses = evolved_select(EvolvedState(3), torch.arange(3), 3, logits=logits, targets=labels, return_losses=True)
    expected = [cross_entropy_by_hand(logits[i].float(), labels[i]) for i in range(3)]
    assert losses.dtype == torch.float32
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------- the sampling law


# The oracle itself, and whatever auto runs here (the extension where it is built; CI requires it).
BACKENDS = ["torch", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_law_matches_exact_successive_sampling(backend):
    weights = [0.1, 0.5, 1.0, 2.0, 0.3, 4.0]
    state = fixed_weight_state(weights)
    generator = torch.Generator().manual_seed(7)
    ids, losses = torch.arange(6), torch.tensor(weights)

    def draw():
        return evolved_select(state, ids, 3, losses=losses, generator=generator, backend=backend)

    assert subset_chi_square_pvalue(draw, weights, 3, draws=20_000) > CHI_SQUARE_ALPHA


@pytest.mark.parametrize("backend", BACKENDS)
def test_inclusion_frequencies_match_exact_probabilities(backend):
    weights = [1.0, 2.0, 3.0, 6.0, 0.5, 0.25]
    state = fixed_weight_state(weights)
    generator = torch.Generator().manual_seed(3)
    counts = torch.zeros(6)
    draws = 20_000
    for _ in range(draws):
        chosen = evolved_select(
            state, torch.arange(6), 3, losses=torch.tensor(weights), generator=generator, backend=backend
        )
        counts[chosen] += 1
    exact = torch.tensor(inclusion_probabilities(weights, 3))
    # Binomial standard error of each frequency is at most 0.0036; 5 sigma never flakes.
    assert torch.allclose(counts / draws, exact, atol=0.018)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_only_when_fewer_than_k_positive(backend):
    state = fixed_weight_state([0.0] * 6)
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0, 0.0])
    for _ in range(200):
        chosen = evolved_select(state, torch.arange(6), 2, losses=weights, generator=generator, backend=backend)
        assert chosen.tolist() == [1, 3]
    for _ in range(200):
        chosen = evolved_select(state, torch.arange(6), 4, losses=weights, generator=generator, backend=backend)
        assert chosen.tolist() == [0, 1, 2, 3]  # ties among zeros go to the lower positions


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_law_by_chi_square(backend):
    weights = [0.0, 1.0, 0.0, 2.0, 0.0, 0.5]
    state = fixed_weight_state(weights)
    generator = torch.Generator().manual_seed(11)

    def draw():
        return evolved_select(
            state, torch.arange(6), 2, losses=torch.tensor(weights), generator=generator, backend=backend
        )

    assert subset_chi_square_pvalue(draw, weights, 2, draws=20_000) > CHI_SQUARE_ALPHA


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruning_follows_the_same_law(backend):
    weights = [0.2, 1.0, 0.0, 3.0, 0.7, 1.5]
    state = fixed_weight_state(weights)
    state.observe(torch.arange(6), torch.tensor(weights))
    generator = torch.Generator().manual_seed(5)

    def draw():
        return evolved_prune(state, 3, generator=generator, backend=backend)

    assert subset_chi_square_pvalue(draw, weights, 3, draws=20_000) > CHI_SQUARE_ALPHA


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruning_by_score(backend):
    state = EvolvedState(4, beta1=1.0, beta2=0.0)
    state.observe(torch.arange(4), torch.tensor([0.0, 0.0, 5.0, 1.0]))  # s = loss, w unchanged (uniform)
    kept = evolved_prune(state, 2, by="score", generator=torch.Generator().manual_seed(0), backend=backend)
    assert kept.tolist() == [2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruning_handles_more_than_2_pow_24_samples(backend):
    n = 2**24 + 5
    state = EvolvedState(n, beta1=0.0)
    state.weight.zero_()
    state.weight[[3, n - 1, n - 3]] = 1.0
    kept = evolved_prune(state, 3, generator=torch.Generator().manual_seed(0), backend=backend)
    assert kept.tolist() == [3, n - 3, n - 1]


# ----------------------------------------------------------------------------------------- determinism, RNG


def test_same_seed_same_selection_and_global_rng_untouched():
    def run(seed):
        state = EvolvedState(50)
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for step in range(10):
            ids = torch.arange(step * 5, step * 5 + 5)
            chosen.append(evolved_select(state, ids, 2, losses=torch.rand(5, generator=generator), generator=generator))
        return torch.stack(chosen), state.weight.clone()

    global_before = torch.get_rng_state()
    first, second, other = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), global_before)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_default_generator_follows_manual_seed():
    def draw():
        torch.manual_seed(123)
        return evolved_select(EvolvedState(8), torch.arange(8), 3, losses=torch.arange(1.0, 9.0))

    assert torch.equal(draw(), draw())


def test_output_is_ascending_int64_of_length_k():
    state = EvolvedState(100)
    chosen = evolved_select(state, torch.arange(40, 72), 8, losses=torch.rand(32))
    assert chosen.dtype == torch.int64 and chosen.numel() == 8
    assert torch.equal(chosen, chosen.sort().values) and chosen.unique().numel() == 8
    assert chosen.min() >= 0 and chosen.max() < 32


def test_k_equal_b_takes_everything():
    chosen = evolved_select(EvolvedState(5), torch.tensor([4, 0, 2]), 3, losses=torch.rand(3))
    assert chosen.tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------------------- backends


def test_reference_backend_reported_and_unavailable_backend_explained():
    evolved_select(EvolvedState(4), torch.arange(4), 1, losses=torch.rand(4), backend="torch")
    assert last_backend() == "torch"
    status = backend_status("cpu")
    assert status["torch"] == "available"
    with pytest.raises(ValueError, match="backend"):
        evolved_select(EvolvedState(4), torch.arange(4), 1, losses=torch.rand(4), backend="cuda-magic")
    if status["triton"] != "available":
        with pytest.raises(BackendUnavailableError, match="triton"):
            evolved_select(EvolvedState(4), torch.arange(4), 1, losses=torch.rand(4), backend="triton")


def test_auto_on_cpu_runs_and_reports_a_backend():
    evolved_select(EvolvedState(4), torch.arange(4), 1, losses=torch.rand(4))
    assert last_backend() in ("extension", "torch")


# ----------------------------------------------------------------------------------------- bad input

LOGITS = torch.randn(4, 5)
LABELS = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    "args, kwargs, error, name",
    [
        ((torch.arange(4), 0), {"losses": torch.rand(4)}, ValueError, "k"),
        ((torch.arange(4), 5), {"losses": torch.rand(4)}, ValueError, "k"),
        ((torch.arange(4), 1.5), {"losses": torch.rand(4)}, TypeError, "k"),
        ((torch.arange(4), True), {"losses": torch.rand(4)}, TypeError, "k"),
        ((torch.tensor([0, 1, 2, 10]), 1), {"losses": torch.rand(4)}, ValueError, "indices"),
        ((torch.tensor([0, 1, 1, 3]), 1), {"losses": torch.rand(4)}, ValueError, "indices"),
        ((torch.arange(4).float(), 1), {"losses": torch.rand(4)}, TypeError, "indices"),
        ((torch.arange(4), 1), {"losses": torch.rand(5)}, ValueError, "losses"),
        ((torch.arange(4), 1), {"losses": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, ValueError, "losses"),
        ((torch.arange(4), 1), {"losses": torch.tensor([1.0, -1.0, 1.0, 1.0])}, ValueError, "losses"),
        ((torch.arange(4), 1), {}, ValueError, "logits"),
        ((torch.arange(4), 1), {"logits": LOGITS}, ValueError, "targets"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": LABELS, "losses": torch.rand(4)}, ValueError, "losses"),
        ((torch.arange(4), 1), {"logits": LOGITS[:3], "targets": LABELS}, ValueError, "logits"),
        ((torch.arange(4), 1), {"logits": LOGITS[:, :1], "targets": LABELS}, ValueError, "logits"),
        ((torch.arange(4), 1), {"logits": LOGITS.long(), "targets": LABELS}, TypeError, "logits"),
        ((torch.arange(4), 1), {"logits": LOGITS.double().log(), "targets": LABELS}, ValueError, "logits"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": torch.tensor([0, 1, 2, 5])}, ValueError, "targets"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": torch.tensor([0, 1, 2, -1])}, ValueError, "targets"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": LABELS[:3]}, ValueError, "targets"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": torch.rand(4, 4)}, ValueError, "targets"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": -torch.rand(4, 5)}, ValueError, "targets"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": (LABELS, LABELS, 1.5)}, ValueError, "lam"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": (LABELS, LABELS + 9, 0.5)}, ValueError, "y_b"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": (LABELS, LABELS)}, ValueError, "mixup"),
        ((torch.arange(4), 1), {"logits": LOGITS, "targets": LABELS, "label_smoothing": 1.2}, ValueError, "label_"),
        ((torch.arange(4), 1), {"losses": torch.rand(4), "generator": 3}, TypeError, "generator"),
    ],
)
def test_bad_input_names_the_argument_and_leaves_state_unchanged(args, kwargs, error, name):
    state = EvolvedState(8)
    state.observe(torch.tensor([0, 5]), torch.tensor([1.0, 2.0]))
    before = state.state_dict()
    with pytest.raises(error, match=name):
        evolved_select(state, *args, **kwargs)
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])


@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto: the extension where it is built
def test_logits_overflowing_to_inf_loss_are_refused_before_the_update(backend):
    state = EvolvedState(2)
    before = state.state_dict()
    huge = torch.tensor([[3e38, -3e38], [0.0, 1.0]])
    with pytest.raises(ValueError, match="losses computed from logits"):
        evolved_select(state, torch.arange(2), 1, logits=huge, targets=torch.tensor([1, 0]), backend=backend)
    assert torch.equal(state.weight, before["weight"])


def test_state_argument_and_prune_arguments_are_checked():
    with pytest.raises(TypeError, match="state"):
        evolved_select(object(), torch.arange(2), 1, losses=torch.rand(2))
    state = EvolvedState(4)
    with pytest.raises(ValueError, match="keep"):
        evolved_prune(state, 5)
    with pytest.raises(ValueError, match="by"):
        evolved_prune(state, 2, by="loss")


@pytest.mark.parametrize("argument", ["indices", "losses", "logits", "targets"])
def test_tensors_on_another_device_are_refused_by_name(argument):
    """The meta device stands in for a GPU: the check compares devices before reading any value."""
    state = EvolvedState(8)
    tensors = {"indices": torch.arange(4), "logits": LOGITS, "targets": LABELS, "losses": torch.rand(4)}
    tensors[argument] = tensors[argument].to("meta")
    scored = (
        {"losses": tensors["losses"]}
        if argument == "losses"
        else {"logits": tensors["logits"], "targets": tensors["targets"]}
    )
    with pytest.raises(ValueError, match=f"{argument} is on meta"):
        evolved_select(state, tensors["indices"], 1, **scored)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_nan_and_negative_weights_are_never_preferred_with_checks_off(backend):
    state = fixed_weight_state([0.0] * 6)
    generator = torch.Generator().manual_seed(0)
    losses = torch.tensor([1.0, 1.0, float("nan"), 1.0, -5.0, 1.0])
    for _ in range(50):
        chosen = evolved_select(
            state, torch.arange(6), 2, losses=losses, generator=generator, check_values=False, backend=backend
        )
        assert not {2, 4} & set(chosen.tolist())
    kept = evolved_prune(state, 4, generator=generator, backend=backend)
    assert kept.tolist() == [0, 1, 3, 5]
