"""Triton kernels and launchers of the per-sequence losses for language models
(docs/architecture.md §3, token level).

Two launches per call, whatever the shapes, and no atomics, so the losses are deterministic:

* from ``(B, T, V)`` logits: ``token_loss_kernel``, one program per token, the fused select's row loss
  (``kernels.row_statistics``: one pass, per-lane online log-sum-exp) into a ``(B·T,)`` fp32 buffer (0 where the
  target is ``ignore_index``), then ``sequence_reduce_kernel``: one program per sequence sums its scored tokens'
  losses in a fixed order and divides by their count for ``"mean"`` (an empty sequence gets 0);
* from hidden states and the LM head, in the manner of Cut Cross-Entropy: ``hidden_partials_kernel`` on a grid of
  (token blocks x vocabulary splits) tiles ``H @ W.T`` with ``tl.dot`` (fp32 accumulation; Hopper's wgmma for
  bf16/fp16), applies bias, scale and soft cap to the tile in registers and keeps per token an online
  log-sum-exp, the logit sum and the target's logit, written as four fp32 partials per (token, split): the
  ``(B·T, V)`` logits never exist in memory, the partials take 16·B·T·splits bytes. ``sequence_merge_kernel``
  (one program per sequence) merges each token's splits and reduces the sequence as above.

The arithmetic is the reference's (``reference/sequence.py``): statistics relative to the running max, the loss as
``(1 - eps) * (log s - (z_y - m)) + eps * (log s - sum(z - m) / V)``, every log-sum-exp step through
``kernels.lse_combine`` / ``kernels.lse_reduce``.

Variants: as in ``kernels.py``, each kernel has an aligned form (unit stride in the last dimension, other strides
multiples of 16 elements, 16-byte-aligned data, so blocks load vectorised) and an any-layout form that specialises
on nothing of the layout; counts and per-token values never get specialisation hints. The launchers convert
what would otherwise multiply the variants (an fp64 hidden state, the bias's dtype) once on the host side, so the
set of variants is small and fixed: :func:`aot_variants` lists it for the ahead-of-time gate.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from es_kernels.triton.kernels import (
    LOG2E,
    MAX_START,
    _jit,
    jit_layout_forms,
    lse_combine,
    lse_reduce,
    row_statistics,
    smoothed_loss,
)

# Triton's interpreter keeps bf16 as its uint16 bits and its tl.dot multiplies those bits as integers; interpreted
# kernels widen the tiles to fp32 first (exact for bf16/fp16 values). Compiled kernels never take that branch.
_INTERPRETED = tl.constexpr(isinstance(tl.randint, InterpretedFunction))

# Default configuration: the only one the launchers use, and the one the AOT gate proves spill-free.
# Vocabulary columns per block of the token loss by the logits' element size: 32 bytes per thread per block
# (two 16-byte loads) whatever the dtype.
TOKEN_BLOCK_V_BY_ITEMSIZE = {8: 512, 4: 1024, 2: 2048}
TOKEN_NUM_WARPS = 4
REDUCE_BLOCK_T = 1024
REDUCE_NUM_WARPS = 4
MERGE_BLOCK_T = 256
MERGE_NUM_WARPS = 4


@dataclass(frozen=True)
class HiddenConfig:
    """Tiles and pipeline of ``hidden_partials_kernel`` for one dtype of H and W."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The hidden-state kernel's configuration by (dtype of H and W, aligned layout): the only one the launchers use,
# and the one the AOT gate proves spill-free on sm_80 and sm_90 (and, for bf16/fp16, on Hopper's wgmma).
# ``benchmarks/tune_hidden.py`` sweeps alternatives on a GPU; set the winner here. fp32 runs on CUDA cores (no
# TF32), hence its smaller tiles; the any-layout forms keep a 64-bit pointer per tile element (no vectorised,
# pipelined copies), hence theirs. Larger bf16 tiles (128 x 128 x 64, or 128 x 64 x 64 with a bias) are
# spill-free on sm_90 but spill on sm_80.
_ANY_LAYOUT = HiddenConfig(block_m=64, block_n=64, block_k=16, num_warps=8, num_stages=2)
HIDDEN_CONFIGS = {
    (torch.bfloat16, True): HiddenConfig(block_m=128, block_n=64, block_k=32, num_warps=8, num_stages=3),
    (torch.float16, True): HiddenConfig(block_m=128, block_n=64, block_k=32, num_warps=8, num_stages=3),
    (torch.float32, True): HiddenConfig(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2),
    (torch.bfloat16, False): _ANY_LAYOUT,
    (torch.float16, False): _ANY_LAYOUT,
    (torch.float32, False): _ANY_LAYOUT,
}
# Programs per streaming multiprocessor the vocabulary splits aim for (the grid is token blocks x splits): more
# splits fill the chip when there are few token blocks, at O(B*T*splits) partials and less reuse of each H tile.
HIDDEN_PROGRAMS_PER_SM = 2
# The interpreter has no multiprocessors; this many programs make the tests' small shapes take several splits.
_CPU_PROGRAMS = 3
REDUCTIONS = ("mean", "sum")


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
    """One program per token (b, t): the row loss of the fused select (``kernels.row_statistics``) over the token's
    logits; an ignored token reads no logits at all."""
    token = tl.program_id(0)
    b = (token // time).to(tl.int64)
    t = (token % time).to(tl.int64)
    target = tl.load(targets_ptr + b * targets_batch_stride + t * targets_time_stride)
    scored = target != ignore_index
    row = logits_ptr + b * logits_batch_stride + t * logits_time_stride
    row_max, log_sum, shifted_sum, _, _ = row_statistics(
        row, logits_vocab_stride, tl.where(scored, vocab, 0), row, 0, False, BLOCK_V
    )
    # Targets outside [0, V) (possible only with value checks off) read nothing and give a NaN loss.
    valid = scored & (target >= 0) & (target < vocab)
    z_target = tl.load(row + target * logits_vocab_stride, mask=valid, other=float("nan")).to(tl.float32)
    loss = smoothed_loss((row_max - z_target) + log_sum, log_sum, shifted_sum, vocab, label_smoothing,
                         one_minus_smoothing)  # fmt: skip
    tl.store(token_losses_ptr + token, tl.where(scored, loss, 0.0))


@_jit
def _soft_cap(z, cap):
    """``cap * tanh(z / cap)`` from exp2 (the interpreter has no libdevice): tanh|x| = (1 - e) / (1 + e) with
    e = exp(-2|x|) in (0, 1], which neither overflows nor loses the small values to cancellation."""
    x = z / cap
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    magnitude = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0.0, -magnitude, magnitude)


def hidden_partials_kernel(
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
    partials_ptr,
    tokens,
    time,
    vocab,
    dim,
    split_columns,
    logit_scale,
    logit_softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (i, j): tokens [i * BLOCK_M, (i + 1) * BLOCK_M) of the (B, T, D) hidden states against vocabulary
    split j (``split_columns`` columns, a multiple of BLOCK_N). Tiles of ``H @ W.T`` (``tl.dot``, fp32
    accumulation) stay in registers; per token it keeps the running max m and sum of exp(z - m) (``lse_reduce``
    of the tile, ``lse_combine`` into the running pair), the sum of z - m, and the target's raw logit z_y (0 unless
    the target falls in this split), and writes those four fp32 partials to ``partials[q, j, token]``.
    ``sequence_merge_kernel`` merges the splits.
    """
    block = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_inside = rows < tokens
    targets = tl.load(
        targets_ptr + (rows // time).to(tl.int64) * targets_batch_stride
        + (rows % time).to(tl.int64) * targets_time_stride, mask=row_inside, other=-1,
    )  # fmt: skip
    # Rows past the end read the last token instead of loading masked, so the full K blocks carry no mask at all
    # (those rows' results are never stored); columns past the vocabulary likewise read its last row of W.
    clamped_rows = tl.minimum(rows, tokens - 1)
    b = (clamped_rows // time).to(tl.int64)
    t = (clamped_rows % time).to(tl.int64)
    hidden_rows = hidden_ptr + b * hidden_batch_stride + t * hidden_time_stride
    k_offsets = tl.arange(0, BLOCK_K)
    n_offsets = tl.arange(0, BLOCK_N)
    row_max = tl.full([BLOCK_M], MAX_START, tl.float32)
    exp_sum = tl.zeros([BLOCK_M], tl.float32)
    shifted_sum = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    first_column = split * split_columns
    end_column = tl.minimum(first_column + split_columns, vocab)
    full_dim = dim - dim % BLOCK_K
    for start in range(first_column, end_column, BLOCK_N):
        columns = start + n_offsets
        column_inside = columns < vocab
        weight_columns = weight_ptr + tl.minimum(columns, vocab - 1).to(tl.int64) * weight_vocab_stride
        logits = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # Full K blocks load without a mask, so the aligned form's loads vectorise (dim is not specialised: a mask
        # along K would hide the alignment); the partial last block is masked, apart.
        for k in range(0, full_dim, BLOCK_K):
            ks = (k + k_offsets).to(tl.int64)
            h = tl.load(hidden_rows[:, None] + ks[None, :] * hidden_dim_stride)
            w = tl.load(weight_columns[None, :] + ks[:, None] * weight_dim_stride)
            logits = _dot(h, w, logits)
        if full_dim < dim:
            ks = full_dim + k_offsets
            k_inside = ks < dim
            h = tl.load(hidden_rows[:, None] + ks[None, :].to(tl.int64) * hidden_dim_stride, mask=k_inside[None, :],
                        other=0.0)  # fmt: skip
            w = tl.load(weight_columns[None, :] + ks[:, None].to(tl.int64) * weight_dim_stride,
                        mask=k_inside[:, None], other=0.0)  # fmt: skip
            logits = _dot(h, w, logits)
        if HAS_BIAS:
            logits += tl.load(bias_ptr + columns, mask=column_inside, other=0.0)[None, :]
        logits = logits * logit_scale
        if SOFTCAP:
            logits = _soft_cap(logits, logit_softcap)
        logits = tl.where(column_inside[None, :], logits, float("-inf"))
        tile_max, tile_sum = lse_reduce(logits, 1.0, 1)
        new_max, exp_sum = lse_combine(row_max, exp_sum, tile_max, tile_sum)
        seen = (start - first_column).to(tl.float32)
        shifted = tl.where(column_inside[None, :], logits - new_max[:, None], 0.0)
        shifted_sum += seen * (row_max - new_max) + tl.sum(shifted, 1)
        target_logit += tl.sum(tl.where(columns[None, :] == targets[:, None], logits, 0.0), 1)
        row_max = new_max
    place = partials_ptr + split.to(tl.int64) * tokens + rows
    stride = splits.to(tl.int64) * tokens
    tl.store(place, row_max, mask=row_inside)
    tl.store(place + stride, exp_sum, mask=row_inside)
    tl.store(place + 2 * stride, shifted_sum, mask=row_inside)
    tl.store(place + 3 * stride, target_logit, mask=row_inside)


@_jit
def _dot(h, w, logits):
    """``logits += h @ w`` in fp32; fp32 inputs stay fp32 (no TF32): the losses are compared with fp64 at fp32
    tolerances."""
    if _INTERPRETED:
        h, w = h.to(tl.float32), w.to(tl.float32)
    return tl.dot(h, w, logits, input_precision="ieee")


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


@_jit(
    do_not_specialize=["time", "tokens", "splits", "split_columns", "vocab", "targets_batch_stride",
                       "targets_time_stride", "ignore_index"],
    do_not_specialize_on_alignment=["targets_ptr"],
)  # fmt: skip
def sequence_merge_kernel(
    partials_ptr,
    targets_ptr,
    targets_batch_stride,
    targets_time_stride,
    time,
    tokens,
    splits,
    split_columns,
    vocab,
    ignore_index,
    label_smoothing,
    one_minus_smoothing,
    out_ptr,
    MEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per sequence: merge each token's vocabulary-split partials (``hidden_partials_kernel``) into
    its loss, then reduce the sequence as ``sequence_reduce_kernel`` does, in a fixed order."""
    b = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_T)
    total = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.int32)
    tokens_wide = tokens.to(tl.int64)
    stride = splits.to(tl.int64) * tokens
    for start in range(0, time, BLOCK_T):
        t = start + offsets
        inside = t < time
        target = tl.load(targets_ptr + b * targets_batch_stride + t.to(tl.int64) * targets_time_stride,
                         mask=inside, other=ignore_index)  # fmt: skip
        scored = inside & (target != ignore_index)
        token = b * time + t
        row_max = tl.full([BLOCK_T], MAX_START, tl.float32)
        exp_sum = tl.zeros([BLOCK_T], tl.float32)
        shifted_sum = tl.zeros([BLOCK_T], tl.float32)
        target_logit = tl.zeros([BLOCK_T], tl.float32)
        for split in range(0, splits):
            place = partials_ptr + split * tokens_wide + token
            split_max = tl.load(place, mask=scored, other=MAX_START)
            new_max, exp_sum = lse_combine(row_max, exp_sum, split_max, tl.load(place + stride, mask=scored, other=0.0))
            seen = (split * split_columns).to(tl.float32)
            width = (tl.minimum(split_columns, vocab - split * split_columns)).to(tl.float32)
            split_shifted = tl.load(place + 2 * stride, mask=scored, other=0.0)
            shifted_sum += seen * (row_max - new_max) + split_shifted + width * (split_max - new_max)
            target_logit += tl.load(place + 3 * stride, mask=scored, other=0.0)
            row_max = new_max
        log_sum = tl.log(exp_sum)
        # Targets outside [0, V) (possible only with value checks off) give a NaN loss.
        valid = (target >= 0) & (target < vocab)
        nll = tl.where(valid, (row_max - target_logit) + log_sum, float("nan"))
        loss = smoothed_loss(nll, log_sum, shifted_sum, vocab, label_smoothing, one_minus_smoothing)
        total += tl.where(scored, loss, 0.0)
        count += scored.to(tl.int32)
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
_HIDDEN_COUNTS = [
    "tokens", "time", "vocab", "dim", "split_columns", "targets_batch_stride", "targets_time_stride",
]  # fmt: skip
_HIDDEN_LAYOUT = [
    "hidden_batch_stride", "hidden_time_stride", "hidden_dim_stride", "weight_vocab_stride", "weight_dim_stride",
]  # fmt: skip
hidden_partials_kernel, hidden_partials_kernel_any_layout = jit_layout_forms(
    hidden_partials_kernel, _HIDDEN_COUNTS, ["targets_ptr"], _HIDDEN_LAYOUT, ["hidden_ptr", "weight_ptr"]
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
    kwargs = {"BLOCK_V": TOKEN_BLOCK_V_BY_ITEMSIZE[logits.element_size()], "num_warps": TOKEN_NUM_WARPS}
    return kernel, args, kwargs, (batch * time,)


@functools.cache
def _programs_target(device: torch.device) -> int:
    """Programs the hidden-state grid aims for on ``device`` (cached: one device query per device and process)."""
    if device.type != "cuda":
        return _CPU_PROGRAMS
    return HIDDEN_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def vocabulary_splits(tokens: int, vocab: int, config: HiddenConfig, programs: int) -> tuple[int, int]:
    """(splits, columns per split): enough vocabulary splits that token blocks x splits reaches ``programs``, each
    split a whole number of BLOCK_N tiles and none empty."""
    token_blocks = -(-tokens // config.block_m)
    tiles = -(-vocab // config.block_n)
    wanted = min(tiles, max(1, -(-programs // token_blocks)))
    split_columns = -(-tiles // wanted) * config.block_n
    return -(-vocab // split_columns), split_columns


def hidden_loss_arguments(hidden, weight, bias, targets, logit_scale, logit_softcap, programs):
    """(kernel, positional args, constexpr/launch kwargs, grid, partials, split_columns) of the hidden-state
    partials launch, its vocabulary split so the grid reaches about ``programs`` programs
    (``vocabulary_splits``). ``bias`` must already be fp32 (or None); the partials are fp32 (4, splits, B*T).
    Ignored tokens and the smoothing are the merge's business (``sequence_merge_arguments``)."""
    batch, time, dim = hidden.shape
    vocab = weight.shape[0]
    tokens = batch * time
    aligned = _aligned(hidden) and _aligned(weight)
    kernel = hidden_partials_kernel if aligned else hidden_partials_kernel_any_layout
    config = HIDDEN_CONFIGS[hidden.dtype, aligned]
    splits, split_columns = vocabulary_splits(tokens, vocab, config, programs)
    partials = torch.empty(4, splits, tokens, dtype=torch.float32, device=hidden.device)
    args = (
        hidden, *hidden.stride(), weight, *weight.stride(),
        bias if bias is not None else partials,  # a fixed dummy keeps one variant per HAS_BIAS
        targets, *targets.stride(), partials, tokens, time, vocab, dim, split_columns, float(logit_scale),
        float(logit_softcap) if logit_softcap is not None else 1.0,
    )  # fmt: skip
    kwargs = {
        "HAS_BIAS": bias is not None, "SOFTCAP": logit_softcap is not None, "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }  # fmt: skip
    return kernel, args, kwargs, (-(-tokens // config.block_m), splits), partials, split_columns


def sequence_merge_arguments(partials, split_columns, vocab, targets, ignore_index, reduction, label_smoothing, out):
    """(kernel, positional args, constexpr/launch kwargs, grid) of the merge of the (4, splits, B*T) partials and
    the per-sequence reduction."""
    batch, time = targets.shape
    args = (
        partials, targets, *targets.stride(), time, batch * time, partials.shape[1], split_columns, vocab,
        int(ignore_index),
        *_smoothing_args(label_smoothing), out,
    )  # fmt: skip
    kwargs = {"MEAN": reduction == "mean", "BLOCK_T": MERGE_BLOCK_T, "num_warps": MERGE_NUM_WARPS}
    return sequence_merge_kernel, args, kwargs, (batch,)


def sequence_reduce_arguments(token_losses, targets, ignore_index, reduction, out):
    """(kernel, positional args, constexpr/launch kwargs, grid) of the per-sequence reduction."""
    batch, time = targets.shape
    args = (token_losses, targets, *targets.stride(), time, int(ignore_index), out)
    kwargs = {"MEAN": reduction == "mean", "BLOCK_T": REDUCE_BLOCK_T, "num_warps": REDUCE_NUM_WARPS}
    return sequence_reduce_kernel, args, kwargs, (batch,)


# ----------------------------------------------------------------------------------------- launchers


def _launch(kernel, args, kwargs, grid) -> None:
    kernel[grid](*args, **kwargs)


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
    out = torch.empty(batch, dtype=torch.float32, device=targets.device)
    _launch(*sequence_reduce_arguments(token_losses, targets, ignore_index, reduction, out))
    return out


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
    never materialising the logits: the partials over vocabulary splits (fp32, 16 bytes per token and split),
    then their merge and the per-sequence reduction. H and W: fp32/bf16/fp16 (fp64 is computed in fp32), any
    strides. Arguments are checked by the caller (``reference.sequence.check_hidden_arguments`` and
    ``check_sequence_arguments``)."""
    batch, time, _ = hidden.shape
    if batch * time == 0:
        return torch.zeros(batch, dtype=torch.float32, device=hidden.device)
    if hidden.dtype == torch.float64:
        hidden, weight = hidden.float(), weight.float()
    bias = None if bias is None else bias.to(torch.float32)
    kernel, args, kwargs, grid, partials, split_columns = hidden_loss_arguments(
        hidden, weight, bias, targets, logit_scale, logit_softcap, _programs_target(hidden.device)
    )
    _launch(kernel, args, kwargs, grid)
    out = torch.empty(batch, dtype=torch.float32, device=hidden.device)
    merge = sequence_merge_arguments(
        partials, split_columns, weight.shape[0], targets, ignore_index, reduction, label_smoothing, out
    )
    _launch(*merge)
    return out


# ----------------------------------------------------------------------------------------- AOT gate hooks


def aot_variants() -> list[tuple[str, object, tuple, dict]]:
    """(name, kernel, args, kwargs) of every variant the launchers above can launch, from representative CPU
    tensors, in the form of ``aot.Variant``: ``aot.variants()`` needs only
    ``yield from (Variant(*v) for v in sequence_kernels.aot_variants())``."""
    variants = []
    batch, time, vocab, dim = 2, 8, 64, 32
    targets = torch.zeros(batch, time, dtype=torch.int64)
    token_losses = torch.zeros(batch * time)
    partials = torch.zeros(4, 2, batch * time)
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
                    kernel, args, kwargs, *_ = hidden_loss_arguments(hidden, weight, bias, targets, 1.0, softcap, 2)
                    name = (
                        f"sequence hidden_loss H,W={dtype_name} {layout_name} bias={bias is not None} "
                        f"softcap={softcap is not None}"
                    )
                    variants.append((name, kernel, args, kwargs))
    for reduction in REDUCTIONS:
        kernel, args, kwargs, _ = sequence_reduce_arguments(token_losses, targets, -100, reduction, torch.zeros(2))
        variants.append((f"sequence reduce {reduction}", kernel, args, kwargs))
        kernel, args, kwargs, _ = sequence_merge_arguments(
            partials, 32, vocab, targets, -100, reduction, 0.1, torch.zeros(2)
        )
        variants.append((f"sequence merge {reduction}", kernel, args, kwargs))
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
        partials = torch.zeros(4, 3, batch * time)
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
                kernel, args, kwargs, *_ = hidden_loss_arguments(
                    hidden, weight, bias, target_views["labels[:, 1:]"], 1.0, None, 264
                )
                name = f"hidden {dtype} {hidden_name} {weight_name} bias={bias is not None} B={batch} D={dim}"
                probes.append((name, kernel, args, kwargs))
        for reduction, (target_name, targets) in itertools.product(REDUCTIONS, target_views.items()):
            kernel, args, kwargs, _ = sequence_reduce_arguments(
                token_losses, targets, -100, reduction, torch.zeros(batch)
            )
            probes.append((f"reduce {reduction} {target_name} B={batch} T={time}", kernel, args, kwargs))
            kernel, args, kwargs, _ = sequence_merge_arguments(
                partials, 4096, vocab, targets, -100, reduction, 0.0, torch.zeros(batch)
            )
            probes.append((f"merge {reduction} {target_name} B={batch} T={time}", kernel, args, kwargs))
    return probes
