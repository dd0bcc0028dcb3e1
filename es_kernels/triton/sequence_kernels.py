"""Triton kernels and launchers of the per-sequence losses for language models
(docs/architecture.md §3, token level).

Two launches per call, whatever the shapes, and no atomics, so the losses are deterministic:

1. per-token cross-entropy into a ``(B·T,)`` fp32 buffer (0 where the target is ``ignore_index``), either
   * ``token_loss_kernel``: one program per token, an online log-sum-exp over blocks of the vocabulary of the
     ``(B, T, V)`` logits (any strides), or
   * ``hidden_loss_kernel``: one program per block of BLOCK_M tokens, in the manner of Cut Cross-Entropy: it tiles
     ``H @ W.T`` over the vocabulary with ``tl.dot`` (fp32 accumulation), applies bias, scale and soft cap to the
     tile in registers, and keeps an online log-sum-exp, the target's logit and the logit sum per token, so the
     ``(B·T, V)`` logits never exist in memory;
2. ``sequence_reduce_kernel``: one program per sequence sums its scored tokens' losses in a fixed order and divides
   by their count for ``"mean"`` (an empty sequence gets 0).

The arithmetic is the reference's (``reference/sequence.py``): statistics relative to the running max, the loss as
``(1 - eps) * (log s - (z_y - m)) + eps * (log s - sum(z - m) / V)``.

Variants: as in ``kernels.py``, each kernel has an aligned form (unit stride in the last dimension, other strides
multiples of 16 elements, 16-byte-aligned data, so blocks load vectorised) and an any-layout form that specialises
on nothing of the layout; counts and per-token values never get specialisation hints. The launchers convert
what would otherwise multiply the variants (an fp64 hidden state, the bias's dtype) once on the host side, so the
set of variants is small and fixed: :func:`aot_variants` lists it for the ahead-of-time gate.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from es_kernels.triton.kernels import LOG2E, _jit, jit_layout_forms

# Triton's interpreter keeps bf16 as its uint16 bits and its tl.dot multiplies those bits as integers; interpreted
# kernels widen the tiles to fp32 first (exact for bf16/fp16 values). Compiled kernels never take that branch.
_INTERPRETED = tl.constexpr(isinstance(tl.randint, InterpretedFunction))

# Default configuration: the only one the launchers use, and the one the AOT gate proves spill-free.
TOKEN_BLOCK_V = 1024
TOKEN_NUM_WARPS = 4
REDUCE_BLOCK_T = 1024
REDUCE_NUM_WARPS = 4
HIDDEN_BLOCK_M = 64
HIDDEN_BLOCK_N = 64
HIDDEN_BLOCK_K = 16
HIDDEN_NUM_WARPS = 8
HIDDEN_NUM_STAGES = 2
REDUCTIONS = ("mean", "sum")


@_jit
def _token_loss(log_sum, shifted_target, shifted_sum, vocab, label_smoothing, one_minus_smoothing):
    """Cross-entropy of a token from its statistics relative to the max m: lse - z_y = log s - (z_y - m)."""
    loss = one_minus_smoothing * (log_sum - shifted_target)
    if label_smoothing > 0.0:
        # Skipped at 0 so an overflowing logit sum cannot turn 0 * inf into NaN.
        loss += label_smoothing * (log_sum - shifted_sum / vocab)
    return loss


@_jit
def _absorb_block(z, inside, start, row_max, exp_sum, shifted_sum):
    """Fold one block of a token's fp32 logits (-inf outside ``inside``) into its running statistics; ``start``
    columns were seen before it."""
    new_max = tl.maximum(row_max, tl.max(z, 0))
    # A row of -inf logits so far must not turn the rescaling into exp(-inf + inf) = NaN.
    anchor = tl.where(new_max == float("-inf"), 0.0, new_max)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max - anchor)
    exp_sum = exp_sum * tl.exp2(shift * LOG2E) + tl.sum(tl.exp2((z - anchor) * LOG2E), 0)
    shifted_sum += start * shift + tl.sum(tl.where(inside, z - anchor, 0.0), 0)
    return new_max, exp_sum, shifted_sum


def token_loss_kernel(
    logits_ptr,
    logits_batch_stride,
    logits_time_stride,
    logits_vocab_stride,
    targets_ptr,
    targets_batch_stride,
    targets_time_stride,
    token_losses_ptr,
    time,
    vocab,
    ignore_index,
    label_smoothing,
    one_minus_smoothing,
    BLOCK_V: tl.constexpr,
):
    """One program per token (b, t): online log-sum-exp over vocabulary blocks, label smoothing in the same pass."""
    token = tl.program_id(0)
    b = (token // time).to(tl.int64)
    t = (token % time).to(tl.int64)
    target = tl.load(targets_ptr + b * targets_batch_stride + t * targets_time_stride)
    scored = target != ignore_index
    row = logits_ptr + b * logits_batch_stride + t * logits_time_stride
    offsets = tl.arange(0, BLOCK_V)
    row_max = tl.full([], float("-inf"), tl.float32)
    exp_sum = tl.zeros([], tl.float32)
    shifted_sum = tl.zeros([], tl.float32)
    # An ignored token reads no logits at all. Full blocks load without a mask, so the aligned form's loads
    # vectorise (vocab is not specialised: a mask `columns < vocab` would hide the alignment); the partial last
    # block is loaded masked, apart.
    columns_to_read = tl.where(scored, vocab, 0)
    full_end = columns_to_read - columns_to_read % BLOCK_V
    for start in range(0, full_end, BLOCK_V):
        z = tl.load(row + (start + offsets).to(tl.int64) * logits_vocab_stride).to(tl.float32)
        row_max, exp_sum, shifted_sum = _absorb_block(z, offsets < BLOCK_V, start, row_max, exp_sum, shifted_sum)
    if full_end < columns_to_read:
        inside = full_end + offsets < vocab
        z = tl.load(row + (full_end + offsets).to(tl.int64) * logits_vocab_stride, mask=inside, other=float("-inf"))
        row_max, exp_sum, shifted_sum = _absorb_block(z.to(tl.float32), inside, full_end, row_max, exp_sum, shifted_sum)
    # Targets outside [0, V) (possible only with value checks off) read nothing and give a NaN loss.
    valid = scored & (target >= 0) & (target < vocab)
    z_target = tl.load(row + target * logits_vocab_stride, mask=valid, other=float("nan")).to(tl.float32)
    loss = _token_loss(tl.log(exp_sum), z_target - row_max, shifted_sum, vocab, label_smoothing, one_minus_smoothing)
    tl.store(token_losses_ptr + token, tl.where(scored, loss, 0.0))


@_jit
def _soft_cap(z, cap):
    """``cap * tanh(z / cap)`` from exp2 (the interpreter has no libdevice): tanh|x| = (1 - e) / (1 + e) with
    e = exp(-2|x|) in (0, 1], which neither overflows nor loses the small values to cancellation."""
    x = z / cap
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    magnitude = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0.0, -magnitude, magnitude)


@_jit
def _dot_block(hidden_rows, hidden_dim_stride, weight_columns, weight_dim_stride, ks, h_mask, w_mask, logits):
    """``logits += H[rows, ks] @ W[columns, ks].T`` for one K block, in fp32."""
    h = tl.load(hidden_rows[:, None] + ks[None, :].to(tl.int64) * hidden_dim_stride, mask=h_mask, other=0.0)
    w = tl.load(weight_columns[None, :] + ks[:, None].to(tl.int64) * weight_dim_stride, mask=w_mask, other=0.0)
    if _INTERPRETED:
        h, w = h.to(tl.float32), w.to(tl.float32)
    # fp32 inputs stay fp32 (no TF32): the losses are compared with fp64 at fp32 tolerances.
    return tl.dot(h, w, logits, input_precision="ieee")


def hidden_loss_kernel(
    hidden_ptr,
    hidden_batch_stride,
    hidden_time_stride,
    hidden_dim_stride,
    weight_ptr,
    weight_vocab_stride,
    weight_dim_stride,
    bias_ptr,
    targets_ptr,
    targets_batch_stride,
    targets_time_stride,
    token_losses_ptr,
    tokens,
    time,
    vocab,
    dim,
    ignore_index,
    label_smoothing,
    one_minus_smoothing,
    logit_scale,
    logit_softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per BLOCK_M tokens: logits tiles ``H @ W.T`` over the vocabulary, never stored, and an online
    log-sum-exp per token in registers (Cut Cross-Entropy's forward; scoring needs no backward)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_inside = rows < tokens
    b = (rows // time).to(tl.int64)
    t = (rows % time).to(tl.int64)
    targets = tl.load(targets_ptr + b * targets_batch_stride + t * targets_time_stride, mask=row_inside,
                      other=ignore_index)  # fmt: skip
    hidden_rows = hidden_ptr + b * hidden_batch_stride + t * hidden_time_stride
    k_offsets = tl.arange(0, BLOCK_K)
    n_offsets = tl.arange(0, BLOCK_N)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    exp_sum = tl.zeros([BLOCK_M], tl.float32)
    shifted_sum = tl.zeros([BLOCK_M], tl.float32)
    shifted_target = tl.zeros([BLOCK_M], tl.float32)
    full_dim = dim - dim % BLOCK_K
    for start in range(0, vocab, BLOCK_N):
        columns = start + n_offsets
        column_inside = columns < vocab
        weight_columns = weight_ptr + columns.to(tl.int64) * weight_vocab_stride
        logits = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # Full K blocks carry no mask along K, so the aligned form's loads vectorise (dim is not specialised);
        # the partial last block is masked, apart.
        for k in range(0, full_dim, BLOCK_K):
            logits = _dot_block(hidden_rows, hidden_dim_stride, weight_columns, weight_dim_stride, k + k_offsets,
                                row_inside[:, None], column_inside[None, :], logits)  # fmt: skip
        if full_dim < dim:
            ks = full_dim + k_offsets
            k_inside = ks < dim
            logits = _dot_block(hidden_rows, hidden_dim_stride, weight_columns, weight_dim_stride, ks,
                                row_inside[:, None] & k_inside[None, :], k_inside[:, None] & column_inside[None, :],
                                logits)  # fmt: skip
        if HAS_BIAS:
            logits += tl.load(bias_ptr + columns, mask=column_inside, other=0.0)[None, :]
        logits = logits * logit_scale
        if SOFTCAP:
            logits = _soft_cap(logits, logit_softcap)
        logits = tl.where(column_inside[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        anchor = tl.where(new_max == float("-inf"), 0.0, new_max)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max - anchor)
        shifted = logits - anchor[:, None]
        exp_sum = exp_sum * tl.exp2(shift * LOG2E) + tl.sum(tl.exp2(shifted * LOG2E), 1)
        shifted_sum += start * shift + tl.sum(tl.where(column_inside[None, :], shifted, 0.0), 1)
        is_target = columns[None, :] == targets[:, None]
        found = tl.sum(is_target.to(tl.int32), 1) > 0
        shifted_target = tl.where(found, tl.sum(tl.where(is_target, shifted, 0.0), 1), shifted_target + shift)
        row_max = new_max
    scored = targets != ignore_index
    # Targets outside [0, V) (possible only with value checks off) give a NaN loss.
    valid = (targets >= 0) & (targets < vocab)
    shifted_target = tl.where(valid, shifted_target, float("nan"))
    loss = _token_loss(tl.log(exp_sum), shifted_target, shifted_sum, vocab, label_smoothing, one_minus_smoothing)
    tl.store(token_losses_ptr + rows, tl.where(scored, loss, 0.0), mask=row_inside)


@_jit(
    do_not_specialize=["time", "targets_batch_stride", "targets_time_stride", "ignore_index"],
    do_not_specialize_on_alignment=["targets_ptr"],
)
def sequence_reduce_kernel(
    token_losses_ptr,
    targets_ptr,
    targets_batch_stride,
    targets_time_stride,
    time,
    ignore_index,
    out_ptr,
    MEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per sequence: the sum of its token losses (fixed order), over their count for the mean."""
    b = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_T)
    total = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.int32)
    for start in range(0, time, BLOCK_T):
        t = start + offsets
        inside = t < time
        target = tl.load(targets_ptr + b * targets_batch_stride + t.to(tl.int64) * targets_time_stride,
                         mask=inside, other=ignore_index)  # fmt: skip
        total += tl.load(token_losses_ptr + b * time + t, mask=inside, other=0.0)
        count += (target != ignore_index).to(tl.int32)
    loss = tl.sum(total, 0)
    if MEAN:
        loss = loss / tl.maximum(tl.sum(count, 0), 1).to(tl.float32)
    tl.store(out_ptr + b, loss)


# Values read once per token (targets, counts, scalars) never get specialisation hints; layout ints and pointers
# do in the aligned form only (see the module docstring and ``kernels.py``).
_TOKEN_COUNTS = ["time", "vocab", "targets_batch_stride", "targets_time_stride", "ignore_index"]
_TOKEN_LAYOUT = ["logits_batch_stride", "logits_time_stride", "logits_vocab_stride"]
token_loss_kernel, token_loss_kernel_any_layout = jit_layout_forms(
    token_loss_kernel, _TOKEN_COUNTS, ["targets_ptr"], _TOKEN_LAYOUT, ["logits_ptr"]
)
_HIDDEN_COUNTS = ["tokens", "time", "vocab", "dim", "targets_batch_stride", "targets_time_stride", "ignore_index"]
_HIDDEN_LAYOUT = [
    "hidden_batch_stride", "hidden_time_stride", "hidden_dim_stride", "weight_vocab_stride", "weight_dim_stride",
]  # fmt: skip
hidden_loss_kernel, hidden_loss_kernel_any_layout = jit_layout_forms(
    hidden_loss_kernel, _HIDDEN_COUNTS, ["targets_ptr"], _HIDDEN_LAYOUT, ["hidden_ptr", "weight_ptr"]
)


# ----------------------------------------------------------------------------------------- argument builders


def _aligned(tensor: torch.Tensor) -> bool:
    """The layout the aligned kernel forms are specialised for: unit last stride, other strides multiples of 16
    elements, 16-byte-aligned data."""
    *outer, last = tensor.stride()
    return last == 1 and all(s % 16 == 0 for s in outer) and tensor.data_ptr() % 16 == 0


def _smoothing_args(label_smoothing: float) -> tuple[float, float]:
    return float(label_smoothing), 1.0 - float(label_smoothing)


def token_loss_arguments(logits, targets, ignore_index, label_smoothing, token_losses):
    """(kernel, positional args, constexpr/launch kwargs, grid) of the per-token launch over (B, T, V) logits."""
    batch, time, vocab = logits.shape
    kernel = token_loss_kernel if _aligned(logits) else token_loss_kernel_any_layout
    args = (
        logits, *logits.stride(), targets, *targets.stride(), token_losses, time, vocab, int(ignore_index),
        *_smoothing_args(label_smoothing),
    )  # fmt: skip
    kwargs = {"BLOCK_V": TOKEN_BLOCK_V, "num_warps": TOKEN_NUM_WARPS}
    return kernel, args, kwargs, (batch * time,)


def hidden_loss_arguments(
    hidden, weight, bias, targets, ignore_index, label_smoothing, logit_scale, logit_softcap, token_losses
):
    """(kernel, positional args, constexpr/launch kwargs, grid) of the fused hidden-state launch. ``bias`` must
    already be fp32 (or None)."""
    batch, time, dim = hidden.shape
    vocab = weight.shape[0]
    tokens = batch * time
    layouts_aligned = _aligned(hidden) and _aligned(weight)
    kernel = hidden_loss_kernel if layouts_aligned else hidden_loss_kernel_any_layout
    args = (
        hidden, *hidden.stride(), weight, *weight.stride(),
        bias if bias is not None else token_losses,  # a fixed dummy keeps one variant per HAS_BIAS
        targets, *targets.stride(), token_losses, tokens, time, vocab, dim, int(ignore_index),
        *_smoothing_args(label_smoothing), float(logit_scale),
        float(logit_softcap) if logit_softcap is not None else 1.0,
    )  # fmt: skip
    kwargs = {
        "HAS_BIAS": bias is not None, "SOFTCAP": logit_softcap is not None, "BLOCK_M": HIDDEN_BLOCK_M,
        "BLOCK_N": HIDDEN_BLOCK_N, "BLOCK_K": HIDDEN_BLOCK_K, "num_warps": HIDDEN_NUM_WARPS,
        "num_stages": HIDDEN_NUM_STAGES,
    }  # fmt: skip
    return kernel, args, kwargs, (triton.cdiv(tokens, HIDDEN_BLOCK_M),)


def sequence_reduce_arguments(token_losses, targets, ignore_index, reduction, out):
    """(kernel, positional args, constexpr/launch kwargs, grid) of the per-sequence reduction."""
    batch, time = targets.shape
    args = (token_losses, targets, *targets.stride(), time, int(ignore_index), out)
    kwargs = {"MEAN": reduction == "mean", "BLOCK_T": REDUCE_BLOCK_T, "num_warps": REDUCE_NUM_WARPS}
    return sequence_reduce_kernel, args, kwargs, (batch,)


# ----------------------------------------------------------------------------------------- launchers


def _launch(kernel, args, kwargs, grid) -> None:
    kernel[grid](*args, **kwargs)


def _reduce(token_losses, targets, ignore_index, reduction) -> torch.Tensor:
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=targets.device)
    _launch(*sequence_reduce_arguments(token_losses, targets, ignore_index, reduction, out))
    return out


def token_sequence_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """fp32 (B,) per-sequence losses from (B, T, V) logits (fp32/bf16/fp16/fp64, any strides) in two launches.
    Arguments are checked by the caller (``reference.sequence.check_sequence_arguments``)."""
    batch, time, _ = logits.shape
    if batch * time == 0:
        return torch.zeros(batch, dtype=torch.float32, device=logits.device)
    token_losses = torch.empty(batch * time, dtype=torch.float32, device=logits.device)
    _launch(*token_loss_arguments(logits, targets, ignore_index, label_smoothing, token_losses))
    return _reduce(token_losses, targets, ignore_index, reduction)


def hidden_sequence_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """fp32 (B,) per-sequence losses of ``(H @ W.T + bias) * logit_scale`` (soft-capped if asked) in two launches,
    never materialising the logits. H and W: fp32/bf16/fp16 (fp64 is computed in fp32), any strides. Arguments are
    checked by the caller (``reference.sequence.check_hidden_arguments`` and ``check_sequence_arguments``)."""
    batch, time, _ = hidden.shape
    if batch * time == 0:
        return torch.zeros(batch, dtype=torch.float32, device=hidden.device)
    if hidden.dtype == torch.float64:
        hidden, weight = hidden.float(), weight.float()
    bias = None if bias is None else bias.to(torch.float32)
    token_losses = torch.empty(batch * time, dtype=torch.float32, device=hidden.device)
    arguments = hidden_loss_arguments(
        hidden, weight, bias, targets, ignore_index, label_smoothing, logit_scale, logit_softcap, token_losses
    )
    _launch(*arguments)
    return _reduce(token_losses, targets, ignore_index, reduction)


# ----------------------------------------------------------------------------------------- AOT gate hooks


def aot_variants() -> list[tuple[str, object, tuple, dict]]:
    """(name, kernel, args, kwargs) of every variant the launchers above can launch, from representative CPU
    tensors, in the form of ``aot.Variant``: ``aot.variants()`` needs only
    ``yield from (Variant(*v) for v in sequence_kernels.aot_variants())``."""
    variants = []
    batch, time, vocab, dim = 2, 8, 64, 32
    targets = torch.zeros(batch, time, dtype=torch.int64)
    token_losses = torch.zeros(batch * time)
    layouts = {"aligned": lambda t: t, "any-layout": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    for dtype_name, dtype in dtypes.items():
        for layout_name, layout in layouts.items():
            logits = layout(torch.zeros(batch, time, vocab, dtype=dtype))
            kernel, args, kwargs, _ = token_loss_arguments(logits, targets, -100, 0.1, token_losses)
            variants.append((f"sequence token_loss logits={dtype_name} {layout_name}", kernel, args, kwargs))
    for dtype_name, dtype in list(dtypes.items())[:3]:
        for layout_name, layout in layouts.items():
            hidden = layout(torch.zeros(batch, time, dim, dtype=dtype))
            weight = layout(torch.zeros(vocab, dim, dtype=dtype))
            for bias in (None, torch.zeros(vocab)):
                for softcap in (None, 30.0):
                    kernel, args, kwargs, _ = hidden_loss_arguments(
                        hidden, weight, bias, targets, -100, 0.1, 1.0, softcap, token_losses
                    )
                    name = (
                        f"sequence hidden_loss H,W={dtype_name} {layout_name} bias={bias is not None} "
                        f"softcap={softcap is not None}"
                    )
                    variants.append((name, kernel, args, kwargs))
    for reduction in REDUCTIONS:
        kernel, args, kwargs, _ = sequence_reduce_arguments(token_losses, targets, -100, reduction, torch.zeros(2))
        variants.append((f"sequence reduce {reduction}", kernel, args, kwargs))
    return variants


def probe_launches() -> list[tuple[str, object, tuple, dict]]:
    """(description, kernel, args, kwargs) of user-like launches (odd sizes, shifted views, offsets, transposes);
    each must compile to one of :func:`aot_variants`. ``aot.probe_launches()`` needs only
    ``yield from sequence_kernels.probe_launches()``."""
    probes = []
    for batch, time, vocab, dim in ((1, 1, 2, 8), (3, 7, 1000, 96), (3, 129, 32769, 96), (2, 16, 32000, 1024)):
        labels = torch.zeros(batch, time + 1, dtype=torch.int64)
        target_views = {"labels": labels[:, :time], "labels[:, 1:]": labels[:, 1:], "transposed": labels.t().t()}
        token_losses = torch.zeros(batch * time)
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            # Views need real storage for their strides; small shapes stand for the big ones' layouts.
            small = torch.zeros(batch, time + 1, min(vocab, 4096) + 1, dtype=dtype)
            logits_views = {
                "contiguous": torch.zeros(batch, time, vocab, dtype=dtype),
                "logits[:, :-1]": small[:, :-1, :-1],
                "transposed": torch.zeros(min(vocab, 4096), time, batch, dtype=dtype).permute(2, 1, 0),
            }
            for (target_name, targets), (logits_name, logits) in itertools.product(
                target_views.items(), logits_views.items()
            ):
                kernel, args, kwargs, _ = token_loss_arguments(logits, targets, -100, 0.0, token_losses)
                name = f"token {dtype} {logits_name} {target_name} B={batch} T={time} V={logits.shape[2]}"
                probes.append((name, kernel, args, kwargs))
            if dtype == torch.float64:
                continue  # the launcher computes fp64 hidden states in fp32
            hidden_views = {
                "contiguous": torch.zeros(batch, time, dim, dtype=dtype),
                "offset view": torch.zeros(batch, time + 1, dim + 3, dtype=dtype)[:, 1:, 3:],
                "transposed": torch.zeros(dim, time, batch, dtype=dtype).permute(2, 1, 0),
            }
            weight_views = {
                "weight": torch.zeros(vocab, dim, dtype=dtype),
                "weight.t().contiguous().t()": torch.zeros(dim, vocab, dtype=dtype).t(),
            }
            for (hidden_name, hidden), (weight_name, weight), bias in itertools.product(
                hidden_views.items(), weight_views.items(), (None, torch.zeros(vocab))
            ):
                kernel, args, kwargs, _ = hidden_loss_arguments(
                    hidden, weight, bias, target_views["labels[:, 1:]"], -100, 0.1, 1.0, None, token_losses
                )
                name = f"hidden {dtype} {hidden_name} {weight_name} bias={bias is not None} B={batch} D={dim}"
                probes.append((name, kernel, args, kwargs))
        for reduction, (target_name, targets) in itertools.product(REDUCTIONS, target_views.items()):
            kernel, args, kwargs, _ = sequence_reduce_arguments(
                token_losses, targets, -100, reduction, torch.zeros(batch)
            )
            probes.append((f"reduce {reduction} {target_name} B={batch} T={time}", kernel, args, kwargs))
    return probes
