"""The Triton sequence-loss kernels under Triton's interpreter (tests/conftest.py sets it up), on CPU tensors,
against fp64 ``F.cross_entropy`` reduced per sequence. Shapes are small (the interpreter runs programs one by one
in numpy); the reference and C++ paths cover the large vocabularies in ``test_sequence.py``.
"""

from __future__ import annotations

import pytest
import torch
from test_sequence import fp64_logits, fp64_sequence_losses, shifted_targets

from es_kernels.testing import LOSS_TOLERANCES

pytestmark = pytest.mark.usefixtures("triton_interpreter")
IGNORE = -100


@pytest.fixture
def kernels():
    from es_kernels.triton import sequence_kernels

    return sequence_kernels


def assert_losses(actual, expected, dtype):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, **LOSS_TOLERANCES[dtype])


# The interpreter's cost is per program and per helper call: 3 x 33 tokens stand for long sequences.
TOKEN_SHAPES = [(1, 1, 2), (1, 7, 1000), (3, 7, 2), (3, 7, 1000), (3, 33, 2)]


@pytest.mark.parametrize("batch, time, vocab", TOKEN_SHAPES, ids=[f"B{b}-T{t}-V{v}" for b, t, v in TOKEN_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_token_losses_match_fp64(kernels, batch, time, vocab, dtype):
    generator = torch.Generator().manual_seed(batch * 1000 + time + vocab)
    logits = (torch.randn(batch, time + 1, vocab, generator=generator) * 3).to(dtype)[:, :-1]
    targets = shifted_targets(batch, time, vocab, generator)
    for reduction, smoothing in (("mean", 0.0), ("sum", 0.1)):
        actual = kernels.token_sequence_losses(logits, targets, IGNORE, reduction, smoothing)
        assert_losses(actual, fp64_sequence_losses(logits, targets, IGNORE, reduction, smoothing), dtype)


def test_token_losses_any_layout_and_fp64_logits(kernels):
    generator = torch.Generator().manual_seed(2)
    vocab_major = (torch.randn(37, 5, 3, generator=generator) * 3).permute(2, 1, 0)  # stride 1 along B
    targets = shifted_targets(3, 5, 37, generator)
    for logits in (vocab_major, vocab_major.double()):
        actual = kernels.token_sequence_losses(logits, targets, IGNORE, "mean", 0.1)
        # fp64 logits are computed in fp32, like every other dtype.
        assert_losses(actual, fp64_sequence_losses(logits.float(), targets, IGNORE, "mean", 0.1), torch.float32)


def test_token_losses_keep_precision_under_a_large_offset(kernels):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 300, generator=generator)
    targets = torch.randint(0, 300, (2, 6), generator=generator)
    expected = fp64_sequence_losses(logits, targets, IGNORE, "mean", 0.2)
    assert_losses(kernels.token_sequence_losses(logits + 1000.0, targets, IGNORE, "mean", 0.2), expected, torch.float32)


HIDDEN_SHAPES = [(1, 1, 2, 8), (3, 7, 1000, 96), (3, 7, 70, 8), (2, 40, 130, 8)]


@pytest.mark.parametrize(
    "batch, time, vocab, dim", HIDDEN_SHAPES, ids=[f"B{b}-T{t}-V{v}-D{d}" for b, t, v, d in HIDDEN_SHAPES]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_hidden_losses_match_fp64(kernels, batch, time, vocab, dim, dtype):
    generator = torch.Generator().manual_seed(batch + time + vocab + dim)
    hidden = torch.randn(batch, time + 1, dim, generator=generator).to(dtype)[:, :-1]
    weight = (torch.randn(vocab, dim, generator=generator) / dim**0.5 * 3).to(dtype)
    targets = shifted_targets(batch, time, vocab, generator)
    for reduction, smoothing in (("mean", 0.0), ("sum", 0.1)):
        actual = kernels.hidden_sequence_losses(hidden, weight, None, targets, IGNORE, reduction, smoothing)
        expected = fp64_sequence_losses(fp64_logits(hidden, weight), targets, IGNORE, reduction, smoothing)
        assert_losses(actual, expected, dtype)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_hidden_losses_bias_scale_softcap_and_any_layout(kernels, softcap):
    generator = torch.Generator().manual_seed(9)
    batch, time, vocab, dim = 3, 7, 200, 24
    hidden = torch.randn(dim, time, batch, generator=generator).permute(2, 1, 0)  # no unit stride along D
    weight = (torch.randn(dim, vocab, generator=generator) / dim**0.5 * 3).t()
    bias = torch.randn(vocab, generator=generator).bfloat16()  # the launcher widens the bias once
    targets = shifted_targets(batch, time, vocab, generator)
    actual = kernels.hidden_sequence_losses(hidden, weight, bias, targets, IGNORE, "mean", 0.1, 0.7, softcap)
    expected = fp64_sequence_losses(fp64_logits(hidden, weight, bias, 0.7, softcap), targets, IGNORE, "mean", 0.1)
    assert_losses(actual, expected, torch.float32)


def test_unchecked_bad_targets_give_nan_and_empty_batches_give_zeros(kernels):
    logits = torch.zeros(2, 2, 5)
    bad = torch.tensor([[0, 9], [1, 2]])
    losses = kernels.token_sequence_losses(logits, bad, IGNORE, "mean", 0.0)
    assert losses[0].isnan() and losses[1].isfinite()
    losses = kernels.hidden_sequence_losses(torch.zeros(2, 2, 4), torch.zeros(5, 4), None, bad, IGNORE, "mean")
    assert losses[0].isnan() and losses[1].isfinite()
    empty = kernels.token_sequence_losses(torch.zeros(3, 0, 5), torch.zeros(3, 0, dtype=torch.int64))
    assert torch.equal(empty, torch.zeros(3))


@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_evolved_select_with_triton_matches_fp64_and_the_reference_state(form, monkeypatch):
    from test_sequence import lm_batch, select_sequence

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend's availability reads it (restored after import above)

    from es_kernels import EvolvedState, last_backend
    from es_kernels.reference import ema_update_

    hidden, weight, bias, targets = lm_batch(3, 7, 70, 8, torch.float32, seed=4)
    indices = torch.tensor([6, 0, 3])
    state = EvolvedState(8, beta1=0.3, beta2=0.8)
    positions, losses = select_sequence(state, indices, 2, form, hidden, weight, bias, targets, "triton",
                                        sequence_reduction="sum", label_smoothing=0.1)  # fmt: skip
    assert last_backend() == "triton"
    logits = fp64_logits(hidden, weight, bias)
    assert_losses(losses, fp64_sequence_losses(logits, targets, IGNORE, "sum", 0.1), torch.float32)
    expected = EvolvedState(8, beta1=0.3, beta2=0.8)
    ema_update_(expected.score, expected.weight, indices, losses, 0.3, 0.8)
    assert torch.equal(state.score, expected.score) and torch.equal(state.weight, expected.weight)
    assert len(positions) == 2 and 1 not in positions.tolist()  # the all-ignored sequence has weight 0


@pytest.mark.parametrize("programs", [1, 40])
def test_hidden_losses_do_not_depend_on_the_vocabulary_splits(kernels, monkeypatch, programs):
    """One split (the whole vocabulary in one program) or one tile per split: the merge of the partials
    gives the fp64 losses either way, with a common offset of 1e3 (from the bias) that the logit sums must not
    lose to cancellation, a block of -inf bias (a masked vocabulary) and smoothing."""
    monkeypatch.setattr(kernels, "_CPU_PROGRAMS", programs)
    kernels._programs_target.cache_clear()
    generator = torch.Generator().manual_seed(programs)
    batch, time, vocab, dim = 2, 9, 300, 16
    hidden = torch.randn(batch, time, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) / dim**0.5 * 3
    bias = torch.full((vocab,), 1e3)
    targets = shifted_targets(batch, time, vocab, generator)
    tile = kernels.HIDDEN_CONFIGS[torch.float32, True].block_n
    tiles = -(-vocab // tile)
    splits, split_columns = kernels.vocabulary_splits(batch * time, vocab, kernels.HIDDEN_CONFIGS[torch.float32, True],
                                                      kernels._programs_target(hidden.device))  # fmt: skip
    assert (splits, split_columns) == ((1, tiles * tile) if programs == 1 else (tiles, tile))
    try:
        actual = kernels.hidden_sequence_losses(hidden, weight, bias, targets, IGNORE, "sum", 0.1)
        expected = fp64_sequence_losses(fp64_logits(hidden, weight, bias), targets, IGNORE, "sum", 0.1)
        assert_losses(actual, expected, torch.float32)
        masked = bias.clone()
        masked[64:200] = float("-inf")
        scored_targets = torch.where(targets.ge(64) & targets.lt(200), 3, targets)
        actual = kernels.hidden_sequence_losses(hidden, weight, masked, scored_targets, IGNORE, "mean", 0.0)
        expected = fp64_sequence_losses(fp64_logits(hidden, weight, masked), scored_targets, IGNORE, "mean", 0.0)
        assert torch.isfinite(expected).all()
        assert_losses(actual, expected, torch.float32)
    finally:
        kernels._programs_target.cache_clear()


def test_vocabulary_splits_fill_the_grid_without_empty_splits(kernels):
    config = kernels.HIDDEN_CONFIGS[torch.bfloat16, True]
    for tokens, vocab, programs in ((8192, 32000, 264), (16384, 128256, 264), (1, 2, 264), (100, 64, 1000)):
        splits, split_columns = kernels.vocabulary_splits(tokens, vocab, config, programs)
        token_blocks = -(-tokens // config.block_m)
        assert split_columns % config.block_n == 0 and (splits - 1) * split_columns < vocab <= splits * split_columns
        assert token_blocks * splits >= min(programs, token_blocks * -(-vocab // config.block_n))
