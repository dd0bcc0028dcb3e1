"""Per-sample losses, once per backend: fp32 cross-entropy whatever the logits' dtype, label smoothing as
``torch.nn.functional.cross_entropy``, hard labels, soft targets and mixup, against cross-entropy computed in fp64
(by hand on small cases, ``F.cross_entropy`` in fp64 on the same rounded logits elsewhere; docs/architecture.md
§3). Every call also checks the state: s and w equal Algorithm 1 by hand applied to the returned losses. The
per-sequence losses of language models are in test_sequence.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_exact_update import algorithm_1_by_hand, seeded_state

from es_kernels import MixupTargets
from es_kernels.testing import LOSS_TOLERANCES


def cross_entropy_by_hand(logits, label, smoothing=0.0):
    logits = [float(x) for x in logits]
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    return (1 - smoothing) * (lse - logits[label]) + smoothing * (lse - sum(logits) / len(logits))


def fp64_cross_entropy(logits: torch.Tensor, targets, smoothing: float = 0.0) -> torch.Tensor:
    """The oracle: cross-entropy in fp64 of the logits as the kernels read them (fp64 logits rounded to fp32)."""
    logits = (logits.float() if logits.dtype == torch.float64 else logits).double()

    def ce(target):
        target = target.double() if target.is_floating_point() else target
        return F.cross_entropy(logits, target, reduction="none", label_smoothing=smoothing)

    if isinstance(targets, MixupTargets):
        return targets.lam * ce(targets.y_a) + (1.0 - targets.lam) * ce(targets.y_b)
    return ce(targets)


def make_targets(form: str, batch: int, classes: int, generator: torch.Generator):
    labels = torch.randint(0, classes, (batch,), generator=generator)
    if form == "hard":
        return labels
    if form == "soft":
        return torch.rand(batch, classes, generator=generator).softmax(dim=1)
    return MixupTargets(labels, torch.randint(0, classes, (batch,), generator=generator), 0.3)


def losses_of(backend, logits, targets, smoothing=0.0, **kwargs):
    """The backend's losses for a meta-batch of shuffled ids (k = B // 4), after checking that the call left s and
    w exactly as Algorithm 1 applied to those losses would."""
    batch = logits.shape[0]
    state = seeded_state(batch + 7)
    ids = torch.randperm(batch + 7, generator=torch.Generator().manual_seed(batch))[:batch]
    expected_score, expected_weight = state.score.clone(), state.weight.clone()
    _, losses = backend.select(
        state, ids, max(1, batch // 4), logits=logits, targets=targets, label_smoothing=smoothing,
        return_losses=True, **kwargs,
    )  # fmt: skip
    assert losses.dtype == torch.float32 and losses.shape == (batch,)
    expected = algorithm_1_by_hand(expected_score, expected_weight, ids, losses, state.beta1, state.beta2)
    assert torch.equal(state.score, expected[0]) and torch.equal(state.weight, expected[1])
    return losses


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_hard_labels_by_hand(backend, smoothing):
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 6, 3, 3, 1])
    expected = [cross_entropy_by_hand(logits[i], labels[i], smoothing) for i in range(5)]
    assert losses_of(backend, logits, labels, smoothing).tolist() == pytest.approx(expected, rel=1e-5)


def test_soft_and_mixup_targets_by_hand(backend):
    """lam weighs the CE against y_a, 1 - lam the CE against y_b; the same as the soft targets that mix them."""
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    y_a, y_b, lam = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 4, 3, 2]), 0.3
    soft = torch.zeros(4, 6)
    soft[torch.arange(4), y_a] += lam
    soft[torch.arange(4), y_b] += 1 - lam
    expected = [
        lam * cross_entropy_by_hand(logits[i], y_a[i]) + (1 - lam) * cross_entropy_by_hand(logits[i], y_b[i])
        for i in range(4)
    ]
    assert losses_of(backend, logits, soft).tolist() == pytest.approx(expected, rel=1e-5)
    mixed = losses_of(backend, logits, (y_a, y_b, lam))
    assert mixed.tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(losses_of(backend, logits, MixupTargets(y_a, y_b, lam)), mixed)


def loss_grid():
    """Every (dtype, form, smoothing, shape); the fast tier runs 12 of the 120 per backend, every dtype with every
    form, each smoothing and each shape at least once (and each dtype with both smoothings), the rest are slow."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    forms, smoothings = ["hard", "soft", "mixup"], [0.0, 0.1]
    shapes = [(1, 2), (7, 3), (5, 1025), (33, 1000), (64, 10)]
    pairs = [(dtype, form) for dtype in dtypes for form in forms]
    fast = {(dtype, form, smoothings[i % 2], shapes[i % 5]) for i, (dtype, form) in enumerate(pairs)}
    return [
        pytest.param(*case, id="-".join(map(str, case)), marks=() if case in fast else pytest.mark.slow)
        for case in ((d, f, s, shape) for d in dtypes for f in forms for s in smoothings for shape in shapes)
    ]


@pytest.mark.parametrize("dtype, form, smoothing, shape", loss_grid())
def test_losses_match_fp64_on_the_same_rounded_logits(backend, dtype, form, smoothing, shape):
    batch, classes = shape
    generator = torch.Generator().manual_seed(batch * 1000 + classes)
    logits = (torch.randn(batch, classes, generator=generator) * 4).to(dtype)
    targets = make_targets(form, batch, classes, generator)
    tolerance = LOSS_TOLERANCES.get(dtype, LOSS_TOLERANCES[torch.float32])
    expected = fp64_cross_entropy(logits, targets, smoothing)
    torch.testing.assert_close(losses_of(backend, logits, targets, smoothing).double(), expected, **tolerance)


def test_confident_rows_keep_their_small_loss(backend):
    """A confidently right row's loss is log(1 + x) for a small x: fp32 holds it to the rounding of 1 + x, i.e.
    within fp32's epsilon absolutely (a loss below ~6e-8 rounds to 0; 5e-11 here), never the error of lse - x_y
    taken at the magnitude of the logits."""
    logits = torch.tensor([[40.0, 0.0, -3.0], [0.0, 25.0, 1.0], [0.0, 9.0, 1.0], [-2.0, 3.0, 6.0]])
    labels = torch.tensor([0, 1, 1, 2])
    expected = fp64_cross_entropy(logits, labels)
    losses = losses_of(backend, logits, labels).double()
    torch.testing.assert_close(losses, expected, rtol=0.0, atol=torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("form", ["soft", "hard"])
def test_large_common_offset_does_not_cancel_the_sums(backend, form):
    """Soft targets and smoothing need sum(t * x) and sum(x); kept relative to the row's max, an offset of 1e4
    (fp32 ulp 1e-3) shared by a row's logits cannot cancel them."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 70, generator=generator) * 3 + torch.tensor([[0.0], [1e3], [1e4], [-1e4]])
    targets = make_targets(form, 4, 70, generator)
    expected = fp64_cross_entropy(logits, targets, 0.1)
    torch.testing.assert_close(losses_of(backend, logits, targets, 0.1).double(), expected, rtol=2e-6, atol=0.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.05])
def test_extreme_logits(backend, smoothing):
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 257, generator=generator) * 80  # exp underflows for most columns
    logits[3] = 0.0  # a flat row
    logits[4, 5] = 1e4  # one dominant logit
    labels = torch.randint(0, 257, (6,), generator=generator)
    labels[4] = 5
    expected = fp64_cross_entropy(logits, labels, smoothing)
    torch.testing.assert_close(losses_of(backend, logits, labels, smoothing).double(), expected, rtol=1e-5, atol=1e-4)


def test_a_masked_block_of_the_vocabulary(backend):
    """-inf logits (value checks off, where they are legal) add nothing to the log-sum-exp; smoothing would make
    the loss infinite, so there is none."""
    logits = torch.randn(4, 257, generator=torch.Generator().manual_seed(9)) * 3
    logits[1, :100] = float("-inf")
    logits[3, 50:200] = float("-inf")
    labels = torch.tensor([3, 150, 256, 10])
    expected = fp64_cross_entropy(logits, labels)
    assert torch.isfinite(expected).all()
    losses = losses_of(backend, logits, labels, check_values=False)
    torch.testing.assert_close(losses.double(), expected, **LOSS_TOLERANCES[torch.float32])


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "column_slice"])
def test_strided_logits_and_targets(backend, layout):
    generator = torch.Generator().manual_seed(5)
    batch, classes = 6, 37
    wide = torch.randn(2 * batch, classes + 5, generator=generator)
    logits = {
        "transposed": torch.randn(classes, batch, generator=generator).t(),
        "row_slice": wide[::2, :classes],
        "column_slice": wide[:batch, 3 : 3 + classes],
    }[layout]
    assert not logits.is_contiguous()
    labels = torch.randint(0, classes, (2 * batch,), generator=generator)[::2]
    soft = torch.rand(classes, batch, generator=generator).t()
    for targets in (labels, soft, MixupTargets(labels, labels.flip(0), 0.6)):
        expected = fp64_cross_entropy(logits, targets)
        losses = losses_of(backend, logits, targets)
        torch.testing.assert_close(losses.double(), expected, **LOSS_TOLERANCES[torch.float32])
