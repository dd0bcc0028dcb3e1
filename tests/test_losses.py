"""Per-sample losses, once per backend: fp32 cross-entropy whatever the logits' dtype, label smoothing as
``torch.nn.functional.cross_entropy``, hard labels, soft targets and mixup, against cross-entropy computed in fp64
(by hand on small cases, by the reference on the same rounded logits elsewhere) (docs/architecture.md §3).
The per-sequence losses of language models are in test_sequence.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from es_kernels import EvolvedState, MixupTargets, reference
from es_kernels.testing import LOSS_TOLERANCES


def cross_entropy_by_hand(logits, label, smoothing=0.0):
    logits = [float(x) for x in logits]
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    return (1 - smoothing) * (lse - logits[label]) + smoothing * (lse - sum(logits) / len(logits))


def make_targets(form: str, batch: int, classes: int, generator: torch.Generator):
    labels = torch.randint(0, classes, (batch,), generator=generator)
    if form == "hard":
        return labels
    if form == "soft":
        return torch.rand(batch, classes, generator=generator).softmax(dim=1)
    return MixupTargets(labels, torch.randint(0, classes, (batch,), generator=generator), 0.3)


def losses_of(backend, logits, targets, smoothing=0.0, **kwargs):
    batch = logits.shape[0]
    _, losses = backend.select(
        EvolvedState(batch + 3), torch.arange(batch), 1, logits=logits, targets=targets,
        label_smoothing=smoothing, return_losses=True, **kwargs,
    )  # fmt: skip
    assert losses.dtype == torch.float32 and losses.shape == (batch,)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("form", ["hard", "soft", "mixup"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (5, 1025), (33, 1000), (64, 10)], ids=str)
def test_losses_match_the_reference_on_the_same_rounded_logits(backend, dtype, form, smoothing, shape):
    batch, classes = shape
    generator = torch.Generator().manual_seed(batch * 1000 + classes)
    logits = (torch.randn(batch, classes, generator=generator) * 4).to(dtype)
    targets = make_targets(form, batch, classes, generator)
    expected = reference.per_sample_cross_entropy(logits, targets, smoothing)  # fp64 logits: rounded to fp32 first
    tolerance = LOSS_TOLERANCES.get(dtype, LOSS_TOLERANCES[torch.float32])
    torch.testing.assert_close(losses_of(backend, logits, targets, smoothing), expected.float(), **tolerance)


def test_confident_rows_keep_their_small_loss(backend):
    """lse - x_y cancels for a confidently right row; (max - x_y) + log(sum) keeps the tiny loss."""
    logits = torch.tensor([[40.0, 0.0, -3.0], [0.0, 25.0, 1.0]])
    labels = torch.tensor([0, 1])
    expected = reference.per_sample_cross_entropy(logits.double(), labels).float()
    torch.testing.assert_close(losses_of(backend, logits, labels), expected, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("form", ["soft", "hard"])
def test_large_common_offset_does_not_cancel_the_sums(backend, form):
    """Soft targets and smoothing need sum(t * x) and sum(x); kept relative to the row's max, an offset of 1e4
    (fp32 ulp 1e-3) shared by a row's logits cannot cancel them."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 70, generator=generator) * 3 + torch.tensor([[0.0], [1e3], [1e4], [-1e4]])
    targets = make_targets(form, 4, 70, generator)
    double_targets = targets.double() if form == "soft" else targets
    expected = reference.per_sample_cross_entropy(logits.double(), double_targets, 0.1).float()
    torch.testing.assert_close(losses_of(backend, logits, targets, 0.1), expected, rtol=2e-6, atol=0.0)


def test_extreme_and_masked_logits(backend):
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 257, generator=generator) * 80  # exp underflows for most columns
    logits[3] = 0.0  # a flat row
    logits[4, 5] = 1e4  # one dominant logit
    logits[5, :100] = float("-inf")  # a masked block of the vocabulary (value checks off: -inf is legal then)
    labels = torch.randint(100, 257, (6,), generator=generator)
    labels[4] = 5
    expected = reference.per_sample_cross_entropy(logits.double(), labels, 0.0).float()
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(losses_of(backend, logits, labels, check_values=False), expected, rtol=1e-5, atol=1e-4)


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
        expected = reference.per_sample_cross_entropy(logits.contiguous(), targets)
        torch.testing.assert_close(losses_of(backend, logits, targets), expected, **LOSS_TOLERANCES[torch.float32])
