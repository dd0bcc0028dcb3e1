"""Per-sequence losses for language models: the reference, the C++ CPU ops
(``torch.ops.es_kernels_C.{token,hidden}_sequence_losses``) and the language-model form ``sequence_losses(...)``
then ``evolved_select(..., losses=...)`` against a plain fp64 computation, ``F.cross_entropy(..., reduction="none",
ignore_index=...)`` reduced per sequence; the state update (Algorithm 1 on those losses), the selection law, bad
input, and ``torch.compile``.

The Triton kernels are tested under the interpreter in ``test_sequence_triton.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import extension_unavailable_reason

from es_kernels import EvolvedState, evolved_select, sequence_losses
from es_kernels import select as select_module
from es_kernels.backends import Backend
from es_kernels.reference import ema_update_
from es_kernels.reference import sequence as reference
from es_kernels.testing import CHI_SQUARE_ALPHA, LOSS_TOLERANCES, subset_chi_square_pvalue

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------- the fp64 oracle


def fp64_sequence_losses(logits, targets, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0):
    """The straightforward computation: fp64 token cross-entropies, summed per sequence, over the scored count."""
    batch, time, vocab = logits.shape
    tokens = F.cross_entropy(
        logits.double().reshape(-1, vocab), targets.reshape(-1), reduction="none", ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    ).view(batch, time)  # fmt: skip
    total = tokens.sum(dim=1)
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum(dim=1).clamp(min=1)


def fp64_logits(hidden, weight, bias=None, logit_scale=1.0, logit_softcap=None):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    return z


def shifted_targets(batch, time, vocab, generator):
    """``labels[:, 1:]`` of (B, T + 1) labels: about a third ignored, the second sequence (if any) all ignored."""
    labels = torch.randint(0, vocab, (batch, time + 1), generator=generator)
    labels[torch.rand(batch, time + 1, generator=generator) < 0.3] = IGNORE
    if batch > 1:
        labels[1] = IGNORE
    return labels[:, 1:]


def assert_losses(actual, expected, dtype):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, **LOSS_TOLERANCES[dtype])


SHAPES = [(b, t, v) for b in (1, 3) for t in (1, 7, 129) for v in (2, 1000, 32769)]


# ----------------------------------------------------------------------------------------- the C++ ops


@pytest.fixture(scope="module")
def extension_ops():
    """The dispatcher ops of the extension (their CPU kernels); skipped where it is not built (CI requires it)."""
    reason = extension_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the extension is unavailable: {reason}")
    return torch.ops.es_kernels_C


@pytest.fixture(params=["reference", "cpp"])
def token_losses(request):
    if request.param == "reference":
        return reference.token_sequence_losses
    return request.getfixturevalue("extension_ops").token_sequence_losses


@pytest.fixture(params=["reference", "cpp"])
def hidden_losses(request):
    """(hidden, weight, bias, targets, ignore_index, reduction, smoothing, scale, softcap, token_block, vocab_chunk)
    -> (B,), for either implementation."""
    if request.param == "reference":
        return reference.hidden_sequence_losses
    return request.getfixturevalue("extension_ops").hidden_sequence_losses


# ----------------------------------------------------------------------------------------- token logits


@pytest.mark.parametrize("batch, time, vocab", SHAPES, ids=[f"B{b}-T{t}-V{v}" for b, t, v in SHAPES])
def test_token_losses_shifted_views_match_fp64(token_losses, batch, time, vocab):
    generator = torch.Generator().manual_seed(batch * 1000 + time * 10 + vocab)
    logits = torch.randn(batch, time + 1, vocab, generator=generator) * 3
    targets = shifted_targets(batch, time, vocab, generator)
    view = logits[:, :-1]  # the causal-LM shift, as views: no copy
    if batch > 1:  # (a single sequence's slice is contiguous by torch's rules)
        assert not view.is_contiguous() and not targets.is_contiguous()
    for reduction, smoothing in (("mean", 0.0), ("sum", 0.1)):
        actual = token_losses(view, targets, IGNORE, reduction, smoothing)
        assert_losses(actual, fp64_sequence_losses(view, targets, IGNORE, reduction, smoothing), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "vocab-major"])
def test_token_losses_dtypes_and_layouts(token_losses, dtype, layout):
    generator = torch.Generator().manual_seed(7)
    batch, time, vocab = 3, 7, 1000
    logits = (torch.randn(batch, time, vocab, generator=generator) * 4).to(dtype)
    if layout == "vocab-major":
        logits = logits.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # stride 1 along B, not V
    targets = shifted_targets(batch, time, vocab, generator)
    actual = token_losses(logits, targets, IGNORE, "mean", 0.1)
    # The oracle sees the same (already rounded) logits.
    assert_losses(actual, fp64_sequence_losses(logits, targets, IGNORE, "mean", 0.1), dtype)


def test_token_losses_other_ignore_index_and_empty_sequences(token_losses):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=generator)
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    targets[0] = 7  # with ignore_index=7, sequence 0 has no scored token
    targets[2, :4] = 7
    for reduction in ("mean", "sum"):
        actual = token_losses(logits, targets, 7, reduction, 0.0)
        assert actual[0].item() == 0.0
        assert_losses(actual, fp64_sequence_losses(logits, targets, 7, reduction), torch.float32)


def test_token_losses_keep_precision_under_a_large_offset(token_losses):
    # Statistics relative to the running max: a +1000 offset on every logit changes nothing, smoothing included.
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 300, generator=generator)
    targets = torch.randint(0, 300, (2, 6), generator=generator)
    expected = fp64_sequence_losses(logits, targets, IGNORE, "mean", 0.2)
    assert_losses(token_losses(logits + 1000.0, targets, IGNORE, "mean", 0.2), expected, torch.float32)


def test_confident_tokens_keep_their_small_loss(token_losses):
    # About 2.6e-3 each: lse - z_y taken in fp32 at 1006 (ulp 6e-5) would be off by percents, log(s) - (z_y - m) is
    # not.
    logits = torch.tensor([[[1006.0, 1000.0, 997.0], [1000.0, 1006.0, 997.0]]])
    targets = torch.tensor([[0, 1]])
    expected = fp64_sequence_losses(logits.double(), targets, IGNORE, "sum")
    torch.testing.assert_close(token_losses(logits, targets, IGNORE, "sum", 0.0).double(), expected, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------------------- hidden states + LM head


HIDDEN_SHAPES = [(b, t, v, d) for b, t in ((1, 1), (3, 7), (3, 129)) for v in (2, 1000, 32769) for d in (8, 96)]


@pytest.mark.parametrize(
    "batch, time, vocab, dim", HIDDEN_SHAPES, ids=[f"B{b}-T{t}-V{v}-D{d}" for b, t, v, d in HIDDEN_SHAPES]
)
def test_hidden_losses_match_fp64(hidden_losses, batch, time, vocab, dim):
    generator = torch.Generator().manual_seed(batch + time + vocab + dim)
    hidden = torch.randn(batch, time + 1, dim, generator=generator)[:, :-1]  # a view, as model outputs get sliced
    weight = torch.randn(vocab, dim, generator=generator) / dim**0.5 * 3
    targets = shifted_targets(batch, time, vocab, generator)
    # Small blocks and chunks make tokens of one sequence span blocks and the vocabulary span many chunks.
    chunkings = ((50, 4096), (7, 333)) if vocab <= 1000 else ((50, 4096),)
    for token_block, vocab_chunk in chunkings:
        for reduction, smoothing in (("mean", 0.0), ("sum", 0.1)):
            actual = hidden_losses(hidden, weight, None, targets, IGNORE, reduction, smoothing, 1.0, None,
                                   token_block, vocab_chunk)  # fmt: skip
            expected = fp64_sequence_losses(fp64_logits(hidden, weight), targets, IGNORE, reduction, smoothing)
            assert_losses(actual, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_hidden_losses_dtypes_bias_scale_softcap(hidden_losses, dtype, softcap):
    generator = torch.Generator().manual_seed(11)
    batch, time, vocab, dim = 3, 7, 1000, 96
    hidden = torch.randn(batch, time, dim, generator=generator).to(dtype)
    weight = (torch.randn(vocab, dim, generator=generator) / dim**0.5 * 3).to(dtype)
    bias = torch.randn(vocab, generator=generator).to(dtype)
    targets = shifted_targets(batch, time, vocab, generator)
    actual = hidden_losses(hidden, weight, bias, targets, IGNORE, "mean", 0.1, 0.7, softcap, 4, 300)
    # fp32 accumulation of the same rounded inputs: the gap to fp64 is summation order only.
    expected = fp64_sequence_losses(fp64_logits(hidden, weight, bias, 0.7, softcap), targets, IGNORE, "mean", 0.1)
    assert_losses(actual, expected, dtype)


def test_hidden_losses_equal_token_losses_of_the_materialised_logits(hidden_losses, token_losses):
    generator = torch.Generator().manual_seed(13)
    hidden = torch.randn(2, 9, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    targets = shifted_targets(2, 9, 50, generator)
    logits = hidden @ weight.t()
    fused = hidden_losses(hidden, weight, None, targets, IGNORE, "sum", 0.1, 1.0, None, 4, 8)
    torch.testing.assert_close(fused, token_losses(logits, targets, IGNORE, "sum", 0.1), rtol=1e-5, atol=1e-5)


def test_reference_hidden_path_never_allocates_the_logits():
    # Every allocation of the fused path is at most one chunk (plus the small per-token vectors): track the
    # largest tensor it creates with a dispatch mode.
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor._base is None:
                    self.largest = max(self.largest, tensor.numel() * tensor.element_size())
            return out

    generator = torch.Generator().manual_seed(17)
    batch, time, vocab, dim = 2, 64, 5000, 8
    hidden, weight = torch.randn(batch, time, dim, generator=generator), torch.randn(vocab, dim, generator=generator)
    targets = torch.randint(0, vocab, (batch, time), generator=generator)
    with LargestAllocation() as mode:
        reference.hidden_sequence_losses(hidden, weight, None, targets, token_block=32, vocab_chunk=512)
    assert mode.largest <= 32 * 512 * 4, mode.largest
    assert mode.largest < batch * time * vocab * 4 // 16


# ----------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_the_argument_named(token_losses, hidden_losses):
    logits = torch.zeros(2, 3, 5)
    targets = torch.zeros(2, 3, dtype=torch.int64)
    hidden, weight = torch.zeros(2, 3, 4), torch.zeros(5, 4)
    hidden_call = dict(bias=None, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0, logit_scale=1.0,
                       logit_softcap=None)  # fmt: skip

    def hidden_args(hidden=hidden, weight=weight, targets=targets, **changes):
        values = {**hidden_call, **changes}
        return (hidden, weight, values["bias"], targets, values["ignore_index"], values["reduction"],
                values["label_smoothing"], values["logit_scale"], values["logit_softcap"], 4, 8)  # fmt: skip

    with pytest.raises(ValueError, match="targets"):
        token_losses(logits, targets[:, :2], IGNORE, "mean", 0.0)
    with pytest.raises(TypeError, match="targets"):
        token_losses(logits, targets.int(), IGNORE, "mean", 0.0)
    with pytest.raises(ValueError, match="sequence_reduction"):
        token_losses(logits, targets, IGNORE, "max", 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        token_losses(logits, targets, IGNORE, "mean", 1.5)
    with pytest.raises((TypeError, ValueError), match="logits"):
        token_losses(logits[0], targets, IGNORE, "mean", 0.0)
    with pytest.raises(ValueError, match="lm_head_weight"):
        hidden_losses(*hidden_args(weight=torch.zeros(5, 3)))
    with pytest.raises(ValueError, match="lm_head_weight"):
        hidden_losses(*hidden_args(weight=weight.double()))
    with pytest.raises(ValueError, match="lm_head_bias"):
        hidden_losses(*hidden_args(bias=torch.zeros(4)))
    with pytest.raises(ValueError, match="targets"):
        hidden_losses(*hidden_args(targets=targets[:1]))
    with pytest.raises(ValueError, match="logit_softcap"):
        hidden_losses(*hidden_args(logit_softcap=0.0))
    with pytest.raises(ValueError, match="logit_scale"):
        hidden_losses(*hidden_args(logit_scale=-1.0))
    with pytest.raises((TypeError, ValueError), match="hidden_states"):
        hidden_losses(*hidden_args(hidden=torch.zeros(2, 3, 4, dtype=torch.int64)))


def test_reference_refuses_targets_outside_the_vocabulary():
    logits = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="targets"):
        reference.token_sequence_losses(logits, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="targets"):
        reference.token_sequence_losses(logits, torch.tensor([[-1, 0]]))
    # ignore_index itself is fine, whatever its value
    assert reference.token_sequence_losses(logits, torch.tensor([[-1, 0]]), ignore_index=-1).isfinite().all()


def test_cpp_gives_nan_not_garbage_for_unchecked_bad_targets(extension_ops):
    # Value checks are the caller's; without them a bad target must never read memory or look like a small loss.
    logits = torch.zeros(2, 2, 5)
    losses = extension_ops.token_sequence_losses(logits, torch.tensor([[0, 9], [1, 2]]), IGNORE, "mean", 0.0)
    assert losses[0].isnan() and losses[1].isfinite()
    hidden, weight = torch.zeros(2, 2, 4), torch.zeros(5, 4)
    losses = extension_ops.hidden_sequence_losses(hidden, weight, None, torch.tensor([[0, 9], [1, 2]]), IGNORE,
                                                  "mean", 0.0, 1.0, None, 3, 2)  # fmt: skip
    assert losses[0].isnan() and losses[1].isfinite()


# ----------------------------------------------------------------------------------------- Triton ahead of time


@pytest.mark.slow  # the full gate (python3 -m es_kernels.triton.aot) compiles the same variants
@pytest.mark.compile
def test_triton_variants_cover_user_launches_and_compile_without_spills():
    # In a fresh process without TRITON_INTERPRET: the binder and ptxas of compiled mode, no GPU needed. aot.py
    # takes these variants and probes with one line each (see sequence_kernels.aot_variants / probe_launches).
    pytest.importorskip("triton")
    script = """
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from es_kernels.triton import aot, sequence_kernels as sk

backend = make_backend(GPUTarget("cuda", 80, 32))
def missed(variants):
    checked = {aot._specialization(k, a, kw, backend) for _, k, a, kw in variants}
    return [n for n, k, a, kw in sk.probe_launches() if aot._specialization(k, a, kw, backend) not in checked]
assert missed(sk.aot_variants()) == [], missed(sk.aot_variants())
# The check can fail: without the any-layout forms, transposed and shifted views compile unchecked variants.
aligned_only = [v for v in sk.aot_variants() if "any-layout" not in v[0]]
assert any("transposed" in name for name in missed(aligned_only))
for name, kernel, args, kwargs in sk.aot_variants():
    if name == "sequence hidden_loss H,W=bf16 aligned bias=True softcap=True":
        for arch in (80, 90):
            result = aot.compile_variant(aot.Variant(name, kernel, args, kwargs), arch)
            assert result.error is None and result.spill_bytes == 0 and result.registers > 0, result
"""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


# ----------------------------------------------------------------------------------------- the language-model form


SELECT_BACKENDS = ["torch", "extension"]


def require_backend(backend):
    if backend == "extension":
        reason = extension_unavailable_reason()
        if reason is not None:
            pytest.skip(f"the extension is unavailable: {reason}")


def lm_batch(batch, time, vocab, dim, dtype, seed):
    """Shifted views as a causal-LM caller passes them: ``hidden[:, :-1]``, ``labels[:, 1:]``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, time + 1, dim, generator=generator).to(dtype)[:, :-1]
    weight = (torch.randn(vocab, dim, generator=generator) / dim**0.5 * 3).to(dtype)
    bias = torch.randn(vocab, generator=generator)
    return hidden, weight, bias, shifted_targets(batch, time, vocab, generator)


def sequence_source(form, hidden, weight, bias):
    """The keyword arguments of ``sequence_losses`` that give it the batch's logits (``form="logits"``) or the
    hidden states and the LM head (``form="hidden"``)."""
    if form == "logits":
        # (B, T, V) logits with a stride that is not the contiguous one: a vocabulary slice of wider logits.
        wide = torch.cat([(hidden @ weight.t()).float() + bias, torch.zeros(*hidden.shape[:2], 3)], dim=2)
        return {"logits": wide[:, :, : weight.shape[0]].to(hidden.dtype)}
    return {"hidden_states": hidden, "lm_head_weight": weight, "lm_head_bias": bias}


def select_sequence(state, indices, k, form, hidden, weight, bias, targets, backend, *, generator=None,
                    check_values=True, **options):  # fmt: skip
    """A language model's step: the per-sequence losses, then the per-sample select on them (``options`` are
    ``sequence_losses``'s)."""
    losses = sequence_losses(targets, **sequence_source(form, hidden, weight, bias), backend=backend,
                             check_values=check_values, **options)  # fmt: skip
    return evolved_select(state, indices, k, losses=losses, generator=generator, backend=backend,
                          return_losses=True, check_values=check_values)  # fmt: skip


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("reduction, smoothing", [("mean", 0.0), ("sum", 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_evolved_select_sequence_losses_match_fp64_and_state_follows_algorithm_1(
    backend, form, reduction, smoothing, dtype
):
    require_backend(backend)
    hidden, weight, bias, targets = lm_batch(3, 129, 1000, 96, dtype, seed=21)
    state = EvolvedState(10, beta1=0.3, beta2=0.8)
    indices = torch.tensor([7, 2, 5])
    positions, losses = select_sequence(
        state, indices, 2, form, hidden, weight, bias, targets, backend, sequence_reduction=reduction,
        label_smoothing=smoothing,
    )  # fmt: skip
    materialised = ((hidden @ weight.t()).float() + bias).to(dtype)  # what the logits form was given
    logits = materialised if form == "logits" else fp64_logits(hidden, weight, bias)
    assert_losses(losses, fp64_sequence_losses(logits, targets, IGNORE, reduction, smoothing), dtype)
    assert losses[1] == 0.0  # the sequence of only ignore_index
    # Algorithm 1 on the per-sequence losses, by the reference update: bit for bit, and only at the ids.
    expected = EvolvedState(10, beta1=0.3, beta2=0.8)
    ema_update_(expected.score, expected.weight, indices, losses, 0.3, 0.8)
    assert torch.equal(state.score, expected.score) and torch.equal(state.weight, expected.weight)
    assert positions.dtype == torch.int64 and positions.tolist() == sorted(set(positions.tolist()))
    assert len(positions) == 2 and 1 not in positions.tolist()  # a zero weight is never preferred


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_hidden_and_token_forms_agree_with_softcap_and_scale(backend):
    require_backend(backend)
    hidden, weight, bias, targets = lm_batch(2, 9, 70, 8, torch.float32, seed=3)
    logits = 20.0 * torch.tanh((hidden @ weight.t() + bias) * 0.5 / 20.0)
    _, fused = select_sequence(EvolvedState(4), torch.arange(2), 1, "hidden", hidden, weight, bias, targets, backend,
                               logit_scale=0.5, logit_softcap=20.0)  # fmt: skip
    materialised = sequence_losses(targets, logits=logits, backend=backend)
    torch.testing.assert_close(fused, materialised, rtol=1e-5, atol=1e-5)
    assert_losses(fused, fp64_sequence_losses(logits.double(), targets), torch.float32)


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_selection_law_on_sequence_losses_is_exact_successive_sampling(backend, form):
    require_backend(backend)
    hidden, weight, bias, _ = lm_batch(5, 6, 40, 8, torch.float32, seed=11)
    targets = torch.randint(0, 40, (5, 6), generator=torch.Generator().manual_seed(1))
    # beta1 = 0: a visit sets w to the sequence's loss, so the law is successive sampling ∝ the losses.
    state = EvolvedState(5, beta1=0.0, beta2=0.5)
    generator = torch.Generator().manual_seed(7)
    _, losses = select_sequence(state, torch.arange(5), 2, form, hidden, weight, bias, targets, backend)

    def draw():
        return select_sequence(state, torch.arange(5), 2, form, hidden, weight, bias, targets, backend,
                               generator=generator, check_values=False)[0]  # fmt: skip

    assert subset_chi_square_pvalue(draw, losses.tolist(), 2, draws=6_000) > CHI_SQUARE_ALPHA


def bad_sequence_calls():
    """(what, arguments of sequence_losses, error type, the argument the message names) for every listed case."""
    hidden, weight, bias, targets = lm_batch(3, 5, 11, 4, torch.float32, seed=5)
    logits = hidden @ weight.t()
    nan_hidden = hidden.clone()
    nan_hidden[2, 1, 0] = float("nan")
    out_of_range = targets.clone()
    out_of_range[0, 0] = 11
    negative = targets.clone()
    negative[2, 4] = -1
    nan_logits = logits.masked_fill((negative < 0).unsqueeze(2), float("nan"))
    h = {"hidden_states": hidden, "lm_head_weight": weight}
    return [
        ("B disagrees", {"logits": logits[:2], "targets": targets}, ValueError, "logits"),
        ("B disagrees (H)", {**h, "hidden_states": hidden[:2], "targets": targets}, ValueError, "hidden_states"),
        ("T disagrees", {"logits": logits, "targets": targets[:, :4]}, ValueError, "targets"),
        ("T disagrees (H)", {**h, "targets": targets[:, :4]}, ValueError, "targets"),
        ("D disagrees", {**h, "lm_head_weight": weight[:, :3], "targets": targets}, ValueError, "lm_head_weight"),
        ("V disagrees", {**h, "lm_head_bias": bias[:10], "targets": targets}, ValueError, "lm_head_bias"),
        ("target >= V", {"logits": logits, "targets": out_of_range}, ValueError, "targets"),
        ("target >= V (H)", {**h, "targets": out_of_range}, ValueError, "targets"),
        ("negative target", {**h, "targets": negative}, ValueError, "targets"),
        ("float targets", {"logits": logits, "targets": targets.float()}, TypeError, "targets"),
        ("int32 targets", {**h, "targets": targets.int()}, TypeError, "targets"),
        ("reduction", {"logits": logits, "targets": targets, "sequence_reduction": "max"}, ValueError,
         "sequence_reduction"),
        ("W dtype", {**h, "lm_head_weight": weight.double(), "targets": targets}, ValueError, "lm_head_weight"),
        ("W device", {**h, "lm_head_weight": weight.to("meta"), "targets": targets}, ValueError, "lm_head_weight"),
        ("NaN hidden", {**h, "hidden_states": nan_hidden, "targets": targets}, ValueError, "hidden_states"),
        ("NaN logits", {"logits": nan_logits, "targets": targets}, ValueError, "logits"),
        ("logits and H", {**h, "logits": logits, "targets": targets}, ValueError, "logits"),
        ("W without H", {"logits": logits, "lm_head_weight": weight, "targets": targets}, ValueError,
         "lm_head_weight"),
        ("softcap", {**h, "targets": targets, "logit_softcap": -1.0}, ValueError, "logit_softcap"),
        ("ignore_index", {**h, "targets": targets, "ignore_index": 1.5}, TypeError, "ignore_index"),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_bad_sequence_input_names_the_argument_and_runs_no_kernel(backend, monkeypatch):
    require_backend(backend)
    # sequence_losses raises before the backend's op runs, so no state can be reached: nothing was called.
    module = select_module._backend_module(Backend(backend))
    calls = []
    monkeypatch.setattr(module, "sequence_losses", lambda call: calls.append(call))
    for what, arguments, error, name in bad_sequence_calls():
        with pytest.raises(error, match=name):
            sequence_losses(backend=backend, **arguments)
        assert calls == [], what


def test_evolved_select_refuses_the_token_level_form_and_points_to_sequence_losses():
    """The language-model form is sequence_losses(...) then losses=: token logits or the removed token-level
    keywords given to evolved_select fail at the call, with the state untouched."""
    hidden, weight, bias, targets = lm_batch(3, 5, 11, 4, torch.float32, seed=5)
    state = EvolvedState(6)
    before = state.state_dict()
    with pytest.raises(ValueError, match=r"logits of shape \(B, T, V\).*sequence_losses.*losses="):
        evolved_select(state, torch.tensor([4, 0, 2]), 2, logits=hidden @ weight.t(), targets=targets)
    removed = {"hidden_states": hidden, "lm_head_weight": weight, "lm_head_bias": bias, "ignore_index": -100,
               "sequence_reduction": "sum", "logit_scale": 0.5, "logit_softcap": 20.0}  # fmt: skip
    for name, value in removed.items():
        with pytest.raises(TypeError, match=name):
            evolved_select(state, torch.tensor([4, 0, 2]), 2, targets=targets, **{name: value})
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])
    assert not state.scored.any()


@pytest.mark.slow  # inductor compiles the reference's chunked matmuls (minutes on 2 cores); aot_eager in test_ops
@pytest.mark.compile
@pytest.mark.parametrize("backend", SELECT_BACKENDS)
def test_compile_fullgraph_traces_the_hidden_state_path(backend):
    require_backend(backend)
    hidden, weight, bias, targets = lm_batch(3, 5, 50, 8, torch.float32, seed=8)
    indices = torch.tensor([1, 4, 0])

    # The default generator (the reference's draw cannot trace a torch.Generator argument), seeded before each call.
    def select(state):
        losses = sequence_losses(targets, hidden_states=hidden, lm_head_weight=weight, lm_head_bias=bias,
                                 backend=backend, check_values=False)  # fmt: skip
        return evolved_select(state, indices, 2, losses=losses, backend=backend, return_losses=True,
                              check_values=False)  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(select, fullgraph=True)
    eager_state, compiled_state = EvolvedState(6), EvolvedState(6)
    torch.manual_seed(3)
    eager = select(eager_state)
    torch.manual_seed(3)
    traced = compiled(compiled_state)
    torch.testing.assert_close(traced[1], eager[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(traced[0], eager[0])
    torch.testing.assert_close(compiled_state.weight, eager_state.weight, rtol=1e-6, atol=1e-6)


def test_the_gpu_command_sequence_step_runs_its_checks_on_cpu():
    # The prepared GPU command's sequence step (benchmarks/gpu_check.py) runs this check on CUDA; on CPU it must
    # pass, and the report must render the benchmark rows, including a peer that is not installed.
    from benchmarks import gpu_check

    backends = ("torch", "extension") if extension_unavailable_reason() is None else ("torch",)
    outcome = gpu_check.check_sequence(device="cpu", backends=backends, shapes=((2, 5, 50, 8),))
    assert outcome["problems"] == [] and set(outcome["backends"]) == set(backends)
    report = gpu_check.report({
        "device": {"name": "test", "torch": "-", "cuda": "-"}, "steps": {},
        "sequence_bench": {"shape": {"batch": 8, "time": 1024, "dim": 2048, "vocab": 32000, "dtype": "bfloat16"},
                           "logits_mib": 500.0, "rows": [
                               {"path": "fused", "status": "measured", "median_ms": 1.5, "peak_extra_mib": 20.0},
                               {"path": "Cut Cross-Entropy (reduction='none')", "status": "not installed"}]},
    })  # fmt: skip
    assert "| fused | 1.50 ms | 20 MiB | measured |" in report and "| - | - | not installed |" in report
