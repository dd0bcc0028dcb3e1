"""The C++ extension backend on CPU against the reference: losses, bit-exact state, the sampling law, pruning,
determinism, bad input; plus the just-in-time build and the nvcc compile of the CUDA sources (both ``slow``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import extension_unavailable_reason

from es_kernels import EvolvedState, MixupTargets, evolved_prune, evolved_select, last_backend, reference
from es_kernels.call import SelectCall
from es_kernels.testing import CHI_SQUARE_ALPHA, LOSS_TOLERANCES, inclusion_probabilities, subset_chi_square_pvalue

_REASON = extension_unavailable_reason("cpu")
needs_extension = pytest.mark.skipif(_REASON is not None, reason=f"extension unavailable: {_REASON}")


def make_targets(form: str, batch: int, classes: int, generator: torch.Generator):
    labels = torch.randint(0, classes, (batch,), generator=generator)
    if form == "hard":
        return labels
    if form == "soft":
        return torch.rand(batch, classes, generator=generator).softmax(dim=1)
    return MixupTargets(labels, torch.randint(0, classes, (batch,), generator=generator), 0.3)


def make_state(num_samples, betas=(0.2, 0.9)):
    state = EvolvedState(num_samples, *betas)
    state.observe(torch.arange(num_samples), torch.linspace(0.1, 3.0, num_samples))  # a non-trivial s_old
    return state


def run_both(logits, targets, k, *, smoothing=0.0, num_samples=None, indices=None):
    """The same call on the extension and on the reference. Returns both losses, and checks that the extension's
    state equals, bit for bit, the reference update applied with the extension's losses."""
    batch = logits.shape[0]
    num_samples = num_samples or batch + 7
    if indices is None:
        indices = torch.randperm(num_samples, generator=torch.Generator().manual_seed(batch))[:batch]
    ext_state, ref_state, replay = make_state(num_samples), make_state(num_samples), make_state(num_samples)
    _, ext_losses = evolved_select(
        ext_state, indices, k, logits=logits, targets=targets, label_smoothing=smoothing,
        return_losses=True, backend="extension",
    )  # fmt: skip
    assert last_backend() == "extension"
    _, ref_losses = evolved_select(
        ref_state, indices, k, logits=logits, targets=targets, label_smoothing=smoothing,
        return_losses=True, backend="torch",
    )  # fmt: skip
    reference.ema_update_(replay.score, replay.weight, indices, ext_losses, replay.beta1, replay.beta2)
    assert torch.equal(ext_state.score, replay.score) and torch.equal(ext_state.weight, replay.weight)
    return ext_losses, ref_losses


# ----------------------------------------------------------------------------------------- losses and state


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("form", ["hard", "soft", "mixup"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (33, 1000), (5, 1025), (64, 10)])
def test_losses_match_reference_and_state_is_bit_exact(dtype, form, smoothing, shape):
    batch, classes = shape
    generator = torch.Generator().manual_seed(batch * 1000 + classes)
    logits = (torch.randn(batch, classes, generator=generator) * 4).to(dtype)
    targets = make_targets(form, batch, classes, generator)
    ext, ref = run_both(logits, targets, max(1, batch // 4), smoothing=smoothing)
    assert ext.dtype == torch.float32 and ext.shape == (batch,)
    torch.testing.assert_close(ext, ref, **LOSS_TOLERANCES.get(dtype, LOSS_TOLERANCES[torch.float32]))


@needs_extension
@pytest.mark.parametrize("betas", [(0.2, 0.9), (0.2, 0.8), (0.0, 0.0), (1.0, 1.0), (0.3, 0.7), (0.9999, 0.1234)])
def test_update_is_bit_exact_with_the_reference(betas):
    """Given losses, the state after many steps equals the reference's bit for bit (no FMA, same rounding)."""
    n, batch = 500, 48
    generator = torch.Generator().manual_seed(0)
    ext_state, ref_state = EvolvedState(n, *betas), EvolvedState(n, *betas)
    for _ in range(30):
        ids = torch.randperm(n, generator=generator)[:batch]
        losses = torch.rand(batch, generator=generator) * torch.rand(1, generator=generator) * 10
        evolved_select(ext_state, ids, 12, losses=losses, backend="extension")
        evolved_select(ref_state, ids, 12, losses=losses, backend="torch")
    assert torch.equal(ext_state.score, ref_state.score)
    assert torch.equal(ext_state.weight, ref_state.weight)


@needs_extension
def test_state_from_logits_is_bit_exact_given_the_same_losses():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(40, 13, generator=generator)
    labels = torch.randint(0, 13, (40,), generator=generator)
    ext_state, ref_state = EvolvedState(60), EvolvedState(60)
    ids = torch.randperm(60, generator=generator)[:40]
    _, losses = evolved_select(ext_state, ids, 10, logits=logits, targets=labels, return_losses=True)
    assert last_backend() == "extension"  # auto picks the extension on CPU
    reference.ema_update_(ref_state.score, ref_state.weight, ids, losses, ref_state.beta1, ref_state.beta2)
    assert torch.equal(ext_state.score, ref_state.score) and torch.equal(ext_state.weight, ref_state.weight)


@needs_extension
def test_large_and_extreme_logits():
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(16, 257, generator=generator) * 80  # exp underflows for most columns
    logits[3] = 0.0  # a flat row
    logits[4, 5] = 1e4  # one dominant logit
    labels = torch.randint(0, 257, (16,), generator=generator)
    labels[4] = 5
    ext, ref = run_both(logits, labels, 4, smoothing=0.05)
    torch.testing.assert_close(ext, ref, rtol=1e-5, atol=1e-4)


@needs_extension
def test_non_contiguous_inputs():
    generator = torch.Generator().manual_seed(5)
    batch, classes = 24, 37
    wide = torch.randn(2 * batch, classes + 5, generator=generator)
    views = {
        "transposed": torch.randn(classes, batch, generator=generator).t(),
        "row_slice": wide[::2, :classes],
        "column_slice": wide[:batch, 3 : 3 + classes],
    }
    labels = torch.randint(0, classes, (2 * batch,), generator=generator)[::2]
    soft = torch.rand(classes, batch, generator=generator).t()
    indices = torch.randperm(4 * batch, generator=generator)[: 2 * batch][::2]
    for logits in views.values():
        assert not logits.is_contiguous()
        for targets in (labels, soft, MixupTargets(labels, labels.flip(0), 0.6)):
            ext, ref = run_both(logits, targets, 6, num_samples=4 * batch, indices=indices)
            torch.testing.assert_close(ext, ref, **LOSS_TOLERANCES[torch.float32])
    losses = torch.rand(2 * batch, generator=generator)[::2]
    ext_state, ref_state = EvolvedState(4 * batch), EvolvedState(4 * batch)
    evolved_select(ext_state, indices, 6, losses=losses, backend="extension")
    evolved_select(ref_state, indices, 6, losses=losses, backend="torch")
    assert torch.equal(ext_state.score, ref_state.score) and torch.equal(ext_state.weight, ref_state.weight)


# ----------------------------------------------------------------------------------------- the sampling law


def fixed_weight_state(weights):
    """beta1 = 0: a visit sets w = loss exactly, so passing the weights as losses fixes the law."""
    return EvolvedState(len(weights), beta1=0.0, beta2=0.5)


@needs_extension
@pytest.mark.parametrize(
    "weights, k",
    [([0.1, 0.5, 1.0, 2.0, 0.3, 4.0], 3), ([0.0, 1.0, 0.0, 2.0, 0.0, 0.5], 2), ([1.0, 1e-3, 30.0, 2.0, 5.0], 4)],
)
def test_selection_law_matches_exact_successive_sampling(weights, k):
    state = fixed_weight_state(weights)
    generator = torch.Generator().manual_seed(7)
    ids, losses = torch.arange(len(weights)), torch.tensor(weights)

    def draw():
        # Value checks do not change the law and dominate the time of a call this small.
        return evolved_select(
            state, ids, k, losses=losses, generator=generator, backend="extension", check_values=False
        )

    assert subset_chi_square_pvalue(draw, weights, k, draws=20_000) > CHI_SQUARE_ALPHA


@needs_extension
def test_inclusion_frequencies_in_a_larger_meta_batch():
    weights = torch.linspace(0.05, 2.0, 12).tolist()
    state = fixed_weight_state(weights)
    generator = torch.Generator().manual_seed(2)
    counts, draws = torch.zeros(12), 20_000
    losses = torch.tensor(weights)
    for _ in range(draws):
        chosen = evolved_select(
            state, torch.arange(12), 3, losses=losses, generator=generator, backend="extension", check_values=False
        )
        counts[chosen] += 1
    exact = torch.tensor(inclusion_probabilities(weights, 3))
    # Binomial standard error of each frequency is at most 0.0036; 5 sigma never flakes.
    assert (counts / draws - exact).abs().max() < 0.018


@needs_extension
def test_zero_weights_only_when_fewer_than_k_positive():
    state = fixed_weight_state([0.0] * 6)
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0, 0.0])
    for _ in range(100):
        assert evolved_select(state, torch.arange(6), 2, losses=weights, generator=generator).tolist() == [1, 3]
        assert evolved_select(state, torch.arange(6), 4, losses=weights, generator=generator).tolist() == [0, 1, 2, 3]


@needs_extension
def test_bad_values_are_never_preferred_with_checks_off():
    """check_values=False: NaN and negative weights lose to any positive weight, bad ids and labels are not
    touched (no out-of-bounds access); nothing raises."""
    state = fixed_weight_state([0.0] * 4)
    generator = torch.Generator().manual_seed(1)
    losses = torch.tensor([float("nan"), -1.0, 1e-6, 2.0])
    for _ in range(50):
        chosen = evolved_select(state, torch.arange(4), 2, losses=losses, generator=generator, check_values=False)
        assert chosen.tolist() == [2, 3]
    state = EvolvedState(4)
    before = state.state_dict()
    logits = torch.randn(3, 5)
    chosen, losses = evolved_select(
        state, torch.tensor([0, 7, -2]), 3, logits=logits, targets=torch.tensor([1, 9, -1]),
        check_values=False, return_losses=True, backend="extension",
    )  # fmt: skip
    assert chosen.tolist() == [0, 1, 2] and torch.isnan(losses[1:]).all()
    assert torch.equal(state.score[1:], before["score"][1:])


@needs_extension
def test_output_is_ascending_int64_and_k_equal_b_takes_all():
    state = EvolvedState(100)
    chosen = evolved_select(state, torch.arange(40, 72), 8, losses=torch.rand(32), backend="extension")
    assert chosen.dtype == torch.int64 and chosen.numel() == 8
    assert torch.equal(chosen, chosen.sort().values) and chosen.unique().numel() == 8
    assert chosen.min() >= 0 and chosen.max() < 32
    assert evolved_select(state, torch.arange(5), 5, losses=torch.rand(5), backend="extension").tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


@needs_extension
def test_version_counters_are_bumped():
    state = EvolvedState(10)
    versions = state.score._version, state.weight._version
    evolved_select(state, torch.arange(4), 2, losses=torch.rand(4), backend="extension")
    assert state.score._version > versions[0] and state.weight._version > versions[1]


# ----------------------------------------------------------------------------------------- determinism, RNG


@needs_extension
def test_same_seed_same_selection_and_global_rng_untouched():
    def run(seed):
        state = EvolvedState(50)
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for step in range(10):
            ids = torch.arange(step * 5, step * 5 + 5)
            losses = torch.rand(5, generator=generator)
            chosen.append(evolved_select(state, ids, 2, losses=losses, generator=generator, backend="extension"))
        return torch.stack(chosen)

    global_before = torch.get_rng_state()
    first, second, other = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), global_before)
    assert torch.equal(first, second) and not torch.equal(first, other)


@needs_extension
def test_default_generator_follows_manual_seed():
    def draw():
        torch.manual_seed(123)
        return [evolved_select(EvolvedState(64), torch.arange(64), 8, losses=torch.rand(64) + 0.5) for _ in range(3)]

    first, second = draw(), draw()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])  # the generator advances between calls


# ----------------------------------------------------------------------------------------- pruning


@needs_extension
@pytest.mark.parametrize("weights, keep", [([0.2, 1.0, 0.0, 3.0, 0.7, 1.5], 3), ([1.0, 1.0, 1.0, 1.0, 0.0], 2)])
def test_pruning_law(weights, keep):
    state = fixed_weight_state(weights)
    state.observe(torch.arange(len(weights)), torch.tensor(weights))
    generator = torch.Generator().manual_seed(5)

    def draw():
        return evolved_prune(state, keep, generator=generator, backend="extension")

    assert subset_chi_square_pvalue(draw, weights, keep, draws=20_000) > CHI_SQUARE_ALPHA


@needs_extension
def test_pruning_ties_and_edges():
    state = fixed_weight_state([0.0] * 7)
    state.weight.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, -1.0, float("nan")]))
    generator = torch.Generator().manual_seed(0)
    # Two positive weights: they are always kept, then the rest lowest id first (not-positive ties).
    assert evolved_prune(state, 4, generator=generator, backend="extension").tolist() == [0, 1, 2, 3]
    assert evolved_prune(state, 0, generator=generator, backend="extension").tolist() == []
    assert evolved_prune(state, 7, generator=generator, backend="extension").tolist() == list(range(7))


@needs_extension
def test_pruning_inclusion_at_scale_and_thread_independence():
    """n = 200k: kept ids are ascending and unique; inclusion of a heavy block matches the race; the result does
    not depend on the number of threads."""
    n, keep = 200_000, 50_000
    state = EvolvedState(n)
    state.weight.fill_(1.0)
    state.weight[:1000] = 1e6  # certain to be kept: 1000 heavy ids among 50k slots
    kept = evolved_prune(state, keep, generator=torch.Generator().manual_seed(3), backend="extension")
    assert kept.numel() == keep and bool((kept[1:] > kept[:-1]).all())
    assert bool((kept[:1000] == torch.arange(1000)).all())
    # The other 49k slots spread uniformly: the second half of the ids holds about half of them.
    second_half = int((kept >= n // 2).sum())
    assert abs(second_half - (keep - 1000) * (n // 2) / (n - 1000)) < 5 * (keep**0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = evolved_prune(state, keep, generator=torch.Generator().manual_seed(3), backend="extension")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, kept)


@needs_extension
def test_pruning_more_than_2_pow_24_samples():
    n = 2**24 + 5
    state = EvolvedState(n, beta1=0.0)
    state.weight.zero_()
    state.weight[[3, n - 1, n - 3]] = 1.0
    kept = evolved_prune(state, 3, generator=torch.Generator().manual_seed(0), backend="extension")
    assert kept.tolist() == [3, n - 3, n - 1]


# ----------------------------------------------------------------------------------------- bad input

LOGITS = torch.randn(4, 5)
LABELS = torch.tensor([0, 1, 2, 3])
BAD_CALLS = [
    ((torch.arange(4), 0), {"losses": torch.rand(4)}),
    ((torch.arange(4), 5), {"losses": torch.rand(4)}),
    ((torch.arange(4), 1.5), {"losses": torch.rand(4)}),
    ((torch.tensor([0, 1, 2, 10]), 1), {"losses": torch.rand(4)}),
    ((torch.tensor([0, 1, 1, 3]), 1), {"losses": torch.rand(4)}),
    ((torch.arange(4).float(), 1), {"losses": torch.rand(4)}),
    ((torch.arange(4), 1), {"losses": torch.rand(5)}),
    ((torch.arange(4), 1), {"losses": torch.tensor([1.0, float("nan"), 1.0, 1.0])}),
    ((torch.arange(4), 1), {"losses": torch.tensor([1.0, -1.0, 1.0, 1.0])}),
    ((torch.arange(4), 1), {}),
    ((torch.arange(4), 1), {"logits": LOGITS}),
    ((torch.arange(4), 1), {"logits": LOGITS[:3], "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": LOGITS[:, :1], "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": LOGITS.long(), "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": LOGITS.double().log(), "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": LOGITS, "targets": torch.tensor([0, 1, 2, 5])}),
    ((torch.arange(4), 1), {"logits": LOGITS, "targets": torch.rand(4, 4)}),
    ((torch.arange(4), 1), {"logits": LOGITS, "targets": -torch.rand(4, 5)}),
    ((torch.arange(4), 1), {"logits": LOGITS, "targets": (LABELS, LABELS, 1.5)}),
    ((torch.arange(4), 1), {"logits": LOGITS, "targets": (LABELS, LABELS + 9, 0.5)}),
    ((torch.arange(4), 1), {"logits": LOGITS, "targets": LABELS, "label_smoothing": 1.2}),
    ((torch.arange(4), 1), {"losses": torch.rand(4), "generator": 3}),
    ((torch.tensor([0, 1, 2, -3]), 1), {"logits": LOGITS, "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": LOGITS.index_fill(1, torch.tensor([2]), float("inf")), "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": LOGITS.index_fill(1, torch.tensor([4]), float("-inf")), "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": torch.randn(4, 37).log().bfloat16(), "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": torch.randn(4, 37).log().half().t().contiguous().t(), "targets": LABELS}),
    ((torch.arange(4), 1), {"logits": LOGITS, "targets": torch.tensor([0, 1, -2, 3])}),
    ((torch.arange(4), 1), {"logits": LOGITS, "targets": (LABELS - 1, LABELS, 0.5)}),
    (
        (torch.arange(4), 1),
        {"logits": LOGITS, "targets": torch.rand(4, 5).index_fill(0, torch.tensor([3]), float("nan"))},
    ),
]


@needs_extension
@pytest.mark.parametrize("args, kwargs", BAD_CALLS)
def test_bad_input_raises_the_reference_error_and_leaves_state_unchanged(args, kwargs):
    errors = {}
    for backend in ("torch", "extension"):
        state = EvolvedState(8)
        state.observe(torch.tensor([0, 5]), torch.tensor([1.0, 2.0]))
        before = state.state_dict()
        with pytest.raises((TypeError, ValueError)) as caught:
            evolved_select(state, *args, backend=backend, **kwargs)
        errors[backend] = (caught.type, str(caught.value))
        assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])
    assert errors["extension"] == errors["torch"]


@needs_extension
def test_cpu_value_checks_run_inside_the_extension(monkeypatch):
    """On CPU the extension checks ids, logits, labels and losses in its own pass: Python's value checks (whose
    reductions cost more than a small call) do not run, yet bad values are refused with the same errors."""
    from es_kernels import _checks

    def forbidden(*args, **kwargs):
        raise AssertionError("a Python value check ran")

    monkeypatch.setattr(_checks, "value_range", forbidden)
    monkeypatch.setattr(torch, "unique", forbidden)
    state = EvolvedState(8)
    evolved_select(state, torch.arange(4), 2, logits=LOGITS, targets=LABELS, backend="extension")
    evolved_select(state, torch.arange(4), 2, losses=torch.rand(4), backend="extension")
    with pytest.raises(ValueError, match="indices must not repeat"):
        evolved_select(state, torch.tensor([0, 1, 1, 3]), 2, logits=LOGITS, targets=LABELS, backend="extension")
    with pytest.raises(ValueError, match="logits must be finite"):
        nan_logits = LOGITS.index_fill(0, torch.tensor([1]), float("nan"))
        evolved_select(state, torch.arange(4), 2, logits=nan_logits, targets=LABELS, backend="extension")


@needs_extension
def test_overflowing_losses_refused_before_the_update_when_asked():
    """Finite logits can still give an inf loss; with check_losses the extension refuses it, as select.py's value
    checks do for the reference, and leaves the state untouched. Without it the call goes through (checks off)."""
    from es_kernels import extension

    huge = torch.tensor([[3e38, -3e38], [0.0, 1.0]])
    labels = torch.tensor([1, 0])
    state = EvolvedState(2)
    before = state.state_dict()
    call = SelectCall(state.score, state.weight, torch.arange(2), 1, 0.2, 0.9, logits=huge, labels_a=labels)
    with pytest.raises(ValueError, match="losses computed from logits must be finite"):
        extension.fused_select(dataclasses.replace(call, check_losses=True))
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])
    chosen, losses = extension.fused_select(call)
    assert torch.isinf(losses[0]) and chosen.tolist() == [0]  # an infinite weight wins the race


def _direct(score, weight, indices, k, beta1, beta2, logits=None, labels=None, losses=None, smoothing=0.0):
    seed = torch.zeros(1, dtype=torch.int64)
    return torch.ops.es_kernels_C.fused_select(
        score, weight, indices, seed, k, beta1, beta2, logits, labels, None, None, 1.0, losses, smoothing, False, False
    )


@needs_extension
def test_direct_calls_are_checked_in_cpp():
    """The es_kernels_C ops guard their own arguments (for callers that bypass select.py), naming them."""
    state = EvolvedState(8)
    seed = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="k must be in"):
        _direct(state.score, state.weight, torch.arange(4), 9, 0.2, 0.9, losses=torch.rand(4))
    with pytest.raises(TypeError, match="score must be float32"):
        _direct(state.score.double(), state.weight, torch.arange(4), 1, 0.2, 0.9, losses=torch.rand(4))
    with pytest.raises(ValueError, match="logits must have shape"):
        _direct(state.score, state.weight, torch.arange(4), 1, 0.2, 0.9, logits=torch.rand(3, 5), labels=LABELS)
    with pytest.raises(ValueError, match="beta1"):
        _direct(state.score, state.weight, torch.arange(4), 1, 1.5, 0.9, losses=torch.rand(4))
    with pytest.raises(ValueError, match="seed must have one element"):
        torch.ops.es_kernels_C.prune_select(torch.rand(5), torch.zeros(2, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="values must be"):
        torch.ops.es_kernels_C.prune_select(torch.rand(5).double(), seed, 2)
    with pytest.raises(ValueError, match="keep"):
        torch.ops.es_kernels_C.prune_select(torch.rand(5), seed, 6)


@needs_extension
def test_output_losses_never_alias_the_given_losses():
    """A custom op's output may not alias an input (and the CUDA kernel reads the given losses through
    __restrict__): given contiguous fp32 losses come back as a fresh tensor with the same values."""
    state = EvolvedState(8)
    given = torch.rand(4)
    _, losses, _ = _direct(state.score, state.weight, torch.arange(4), 2, 0.2, 0.9, losses=given)
    assert torch.equal(losses, given)
    assert losses.untyped_storage().data_ptr() != given.untyped_storage().data_ptr()


@needs_extension
def test_value_checks_report_a_code_before_any_write():
    """The kernel's value pass returns (code, value) and writes nothing; the message comes from _checks.py."""
    from es_kernels import _checks

    state = EvolvedState(8)
    before = state.score.clone(), state.weight.clone()
    seed = torch.zeros(1, dtype=torch.int64)
    arguments = (state.score, state.weight, torch.tensor([0, 9, 2]), seed, 2, 0.2, 0.9, None, None, None, None,
                 1.0, torch.rand(3), 0.0, True, False)  # fmt: skip
    _, _, status = torch.ops.es_kernels_C.fused_select(*arguments)
    assert status.tolist() == [_checks.ValueCheck.INDICES_OUT_OF_RANGE, 9]
    assert torch.equal(state.score, before[0]) and torch.equal(state.weight, before[1])
    message = _checks.value_check_message(*status.tolist(), num_samples=8, num_classes=0)
    assert message == "indices must be in [0, 8), got 9"
    with pytest.raises(ValueError, match=r"targets\[1\] \(y_b\) must hold class ids in \[0, 5\)"):
        evolved_select(state, torch.arange(4), 2, logits=LOGITS, targets=(LABELS, LABELS + 2, 0.5),
                       backend="extension")  # fmt: skip
    assert torch.equal(state.score, before[0]) and torch.equal(state.weight, before[1])
