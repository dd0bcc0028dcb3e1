"""What is the C++ extension's own, beyond the per-property files that run once per backend (test_losses,
test_exact_update, test_sampling_law, test_bad_input, test_determinism): memory safety with checks off, pruning at
scale and its independence of the thread count, the value checks inside the kernels and their codes, and the
es_kernels_C ops called directly. Its build, JIT and nvcc tests are in test_build.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import extension_unavailable_reason

from es_kernels import EvolvedState, evolved_prune, evolved_select
from es_kernels.call import SelectCall

_REASON = extension_unavailable_reason("cpu")
needs_extension = pytest.mark.skipif(_REASON is not None, reason=f"extension unavailable: {_REASON}")
LOGITS = torch.randn(4, 5)
LABELS = torch.tensor([0, 1, 2, 3])


# ----------------------------------------------------------------------------------------- checks off


@needs_extension
def test_bad_ids_and_labels_with_checks_off_are_never_read_or_written():
    """check_values=False: bad ids and labels are not touched (no out-of-bounds access); nothing raises."""
    state = EvolvedState(4)
    before = state.state_dict()
    logits = torch.randn(3, 5)
    chosen, losses = evolved_select(
        state, torch.tensor([0, 7, -2]), 3, logits=logits, targets=torch.tensor([1, 9, -1]),
        check_values=False, return_losses=True, backend="extension",
    )  # fmt: skip
    assert chosen.tolist() == [0, 1, 2] and torch.isnan(losses[1:]).all()
    assert torch.equal(state.score[1:], before["score"][1:])


# ----------------------------------------------------------------------------------------- pruning


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


# ----------------------------------------------------------------------------------------- checks inside the kernels


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


# ----------------------------------------------------------------------------------------- CUDA against CPU

needs_cuda_extension = pytest.mark.skipif(
    not torch.cuda.is_available() or extension_unavailable_reason("cuda") is not None,
    reason="needs a GPU and the CUDA extension",
)


@needs_cuda_extension
@pytest.mark.parametrize("batch", [1, 64, 1000, 4096, 4097, 6000])
def test_cuda_schedules_draw_what_the_cpu_draws(batch):
    """Given losses, the CUDA select (one block with a bitonic top-k up to B = 4096, row kernel and radix sorts
    beyond) updates the state and picks the same positions as the CPU build for the same seed: the same Philox
    numbers, the same fp32 visit rule, the same fp64 keys. With every weight 0 all keys tie and the k lowest
    positions win on both."""
    n, k = 3 * batch, max(1, batch // 3)
    generator = torch.Generator().manual_seed(batch)
    indices = torch.randperm(n, generator=generator)[:batch]
    for losses in (torch.rand(batch, generator=generator) * 5, torch.zeros(batch)):
        seed = torch.randint(0, 2**62, (1,), generator=generator)
        results = {}
        for device in ("cpu", "cuda"):
            score, weight = torch.zeros(n, device=device), torch.zeros(n, device=device)
            positions, _, _ = torch.ops.es_kernels_C.fused_select(
                score, weight, indices.to(device), seed.to(device), k, 0.2, 0.9, None, None, None, None, 1.0,
                losses.to(device), 0.0, False, False,
            )  # fmt: skip
            results[device] = positions.cpu(), score.cpu(), weight.cpu()
        assert torch.equal(results["cpu"][0], results["cuda"][0])
        assert torch.equal(results["cpu"][1], results["cuda"][1]) and torch.equal(results["cpu"][2], results["cuda"][2])
    assert torch.equal(results["cuda"][0], torch.arange(k))


def _on(tensor, device):
    return None if tensor is None else tensor.to(device)


@needs_cuda_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, classes", [(2, 151936), (8, 50001), (600, 4099), (4200, 37)])
def test_cuda_losses_match_the_cpu_across_splits_and_alignments(batch, classes, dtype):
    """The CUDA loss pass (column splits for small B, vector loads after a scalar head on rows that are not 16-byte
    aligned, the one-block and the row-kernel schedules) against the CPU build, hard labels with smoothing and soft
    targets."""
    generator = torch.Generator().manual_seed(classes)
    logits = (torch.randn(batch, classes, generator=generator) * 4 + 100).to(dtype)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    soft = torch.rand(batch, classes, generator=generator).softmax(dim=1)
    seed = torch.zeros(1, dtype=torch.int64)
    for hard, soft_targets in ((labels, None), (None, soft)):
        losses = {}
        for device in ("cpu", "cuda"):
            state = EvolvedState(batch, device=device)
            _, losses[device], _ = torch.ops.es_kernels_C.fused_select(
                state.score, state.weight, torch.arange(batch, device=device), seed.to(device), 1, 0.2, 0.9,
                logits.to(device), _on(hard, device), None, _on(soft_targets, device), 1.0, None, 0.1, False, False,
            )  # fmt: skip
        torch.testing.assert_close(losses["cuda"].cpu(), losses["cpu"], rtol=1e-5, atol=1e-5)


@needs_cuda_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [50257, 32000])
def test_cuda_token_losses_match_the_cpu(vocab, dtype):
    """The CUDA token-logit pass (one pass, vector loads where a row is contiguous, the scalar schedule for a
    strided vocabulary; 15 tokens, so each row is split over ~13 blocks and merged by the reduction) against the
    CPU build, with ignored tokens and label smoothing."""
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(3, 5, vocab, generator=generator) * 3).to(dtype)
    targets = torch.randint(0, vocab, (3, 5), generator=generator)
    targets[0, 1] = -100
    for view in (logits, logits.transpose(1, 2).contiguous().transpose(1, 2)):
        expected = torch.ops.es_kernels_C.token_sequence_losses(view, targets, -100, "mean", 0.1)
        got = torch.ops.es_kernels_C.token_sequence_losses(view.cuda(), targets.cuda(), -100, "mean", 0.1)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
