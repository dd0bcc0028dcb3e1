"""Triton device code: the fused select kernel (loss, state update, race keys, top-k) and the pruning keys, and
the one log-sum-exp of every Triton loss form (``lse_combine``, ``lse_reduce``, ``row_statistics``,
``smoothed_loss``; ``sequence_kernels.py`` uses them for token logits and hidden-state tiles).

Imported lazily (only when a kernel is launched or compiled). Kernels are built in the mode triton itself was
imported in (interpreted if ``TRITON_INTERPRET=1`` was set then), whatever the variable says by the time this module
is imported: interpreted kernels cannot call compiled library functions such as ``tl.randint``, nor the reverse.

Rounding contract of the state update (see ``reference/update.py``): each product is rounded to fp32, then the sum.
Launchers pass ``enable_fp_fusion=False`` so the compiler never contracts them into an FMA; ``aot.py`` checks the
PTX of the update lines for it.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def _jit(fn=None, **options):
    if isinstance(tl.randint, InterpretedFunction):
        return InterpretedFunction(fn, **options) if fn is not None else lambda f: InterpretedFunction(f, **options)
    return triton.jit(fn, **options)


def jit_layout_forms(source, value_ints, value_pointers, layout_ints, layout_pointers):
    """The two compiled forms of one kernel: aligned (specialised on its layout ints and pointers) and any-layout
    (specialised on nothing); the values read once per row or token never get hints in either (see
    ``fused_select_kernel`` below)."""
    aligned = _jit(source, do_not_specialize=value_ints, do_not_specialize_on_alignment=value_pointers)
    any_layout = _jit(
        source,
        do_not_specialize=value_ints + layout_ints,
        do_not_specialize_on_alignment=value_pointers + layout_pointers,
    )
    return aligned, any_layout


# Where the per-sample losses come from (a constexpr: one compiled variant each).
MODE_LOSSES = 0  # given losses, any float dtype
MODE_LABELS = 1  # int64 class ids; the mixup form is two label vectors and lam
MODE_SOFT = 2  # dense (B, C) target weights

LOG2E = tl.constexpr(1.4426950408889634)
# Where running maxima start: the most negative finite fp32, so no max is ever -inf (see ``lse_combine``).
MAX_START = tl.constexpr(-3.4028234663852886e38)
# Private histogram copies per radix pass of select_top_k (see there).
SPREAD = tl.constexpr(8)


@_jit
def race_key(weight, seed, position):
    """``log(w) - log(E)``, E ~ Exp(1) from Philox at (seed, position); -inf unless w >= 2**-126, the smallest
    normal fp32 (zero, subnormal, negative, NaN): libdevice ``logf`` flushes subnormals, so every backend does.

    u = (m + 0.5) * 2**-23 with m the top 23 bits of one Philox word, so u lies strictly inside (0, 1) and
    ``1 - u`` is exact in fp32: ``-log(1 - u)`` then equals ``-log1p(-u)`` to the accuracy of ``log`` (libdevice
    ``logf`` on GPU, numpy in the interpreter), which has no log1p.
    """
    bits = tl.randint(seed, position)
    uniform = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    exponential = -tl.log(1.0 - uniform)
    key = tl.log(weight) - tl.log(exponential)
    return tl.where(weight >= 1.1754943508222875e-38, key, float("-inf"))


@_jit
def pack_key(key, position):
    """int64 whose order is (key, then lower position first): monotone fp32 bits high, ~position low.

    ``select_top_k`` reads only the high half and takes tied keys in ascending position itself; the low half keeps
    the packed value a total order with that same tie-break, so sorting the packed keys gives the same draw.
    """
    bits = key.to(tl.int32, bitcast=True)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    low = 4294967295 - position.to(tl.int64)
    return (monotone.to(tl.int64) << 32) | low


@_jit
def select_top_k(keys_ptr, batch, k, positions_ptr, BLOCK_B: tl.constexpr):
    """Write the positions of the k largest packed keys, ascending, into ``positions_ptr`` (one program).

    A radix select instead of a sort, so any batch size works in one program. Four passes over the keys, one
    8-bit digit of the key (the high half, as unsigned) each, histogram the keys that share the digits fixed so far
    and fix the digit where the count from the top reaches the number still wanted. That yields T, the k-th largest
    key, and how many keys equal to T belong in the draw; the last pass takes every key above T and the first of
    the keys equal to T in ascending position, which is the packed order's tie-break (low half ~position).

    Race keys share their sign and exponent bits, so in the first passes nearly every key falls in two or three
    bins, and a histogram compiles to one shared-memory atomic per key: keys of one warp hitting one counter
    serialise. Each pass therefore counts into SPREAD private copies of the 256 bins, picked by the key's lane
    (keys are laid out two per thread, so bits 1..3 of the position tell lanes apart), and sums the copies once per
    pass: at most 32 / SPREAD lanes of a warp share a counter.
    """
    offsets = tl.arange(0, BLOCK_B)
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int64)
    wanted = k + tl.zeros([], tl.int32)
    for digit_index in range(4):
        shift = 24 - 8 * digit_index
        spread_counts = tl.zeros([256 * SPREAD], tl.int32)
        for start in range(0, batch, BLOCK_B):
            positions = start + offsets
            inside = positions < batch
            # .cg: other programs wrote these keys during this launch; read them from L2, never a stale L1 line.
            key = tl.load(keys_ptr + positions, mask=inside, other=0, cache_modifier=".cg")
            high = (key >> 32) + 2147483648
            same_prefix = inside & ((high >> (shift + 8)) == (prefix >> (shift + 8)))
            digit = ((high >> shift) & 255).to(tl.int32)
            copy = (positions >> 1) & (SPREAD - 1)
            spread_counts += tl.histogram(digit * SPREAD + copy, 256 * SPREAD, mask=same_prefix)
        counts = tl.sum(tl.reshape(spread_counts, [256, SPREAD]), 1)
        # from_top[d] = number of candidates whose digit is >= d; it reaches `wanted` at d = 0.
        from_top = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
        chosen = tl.max(tl.where(from_top >= wanted, bins, -1), 0)
        wanted -= tl.sum(tl.where(bins > chosen, counts, 0), 0)
        prefix += chosen.to(tl.int64) << shift
    written = tl.zeros([], tl.int32)
    ties_seen = tl.zeros([], tl.int32)
    for start in range(0, batch, BLOCK_B):
        positions = start + offsets
        inside = positions < batch
        key = tl.load(keys_ptr + positions, mask=inside, other=0, cache_modifier=".cg")
        high = (key >> 32) + 2147483648
        tie = inside & (high == prefix)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), 0) - 1
        take = (inside & (high > prefix)) | (tie & (tie_rank < wanted))
        slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(positions_ptr + slot, positions.to(tl.int64), mask=take & (slot < k))
        written += tl.sum(take.to(tl.int32), 0)
        ties_seen += tl.sum(tie.to(tl.int32), 0)


@_jit
def lse_combine(max_a, sum_a, max_b, sum_b):
    """The one log-sum-exp step every loss form uses: merge two partial statistics (max m, sum of exp(x - m)) into
    one, with a single exp2.

    Folding one value x is ``lse_combine(m, s, x, 1.0)`` (element-wise, per lane); merging the partials of
    vocabulary splits is a loop over it; statistics along an axis merge with ``lse_reduce``. Of the two rescalings
    exp(m_a - M) and exp(m_b - M) one is exp(0) = 1, so only exp(-|m_a - m_b|) is computed. Running maxima start
    at ``MAX_START`` (finite), so ``m_b - m_a`` is never -inf + inf: a -inf value (masked column) adds exp(-inf) = 0.
    A NaN value makes the sum NaN (the loss reports it).
    """
    difference = max_b - max_a
    smaller = tl.exp2(tl.abs(difference) * -LOG2E)
    total = tl.where(difference > 0.0, sum_a * smaller + sum_b, sum_a + sum_b * smaller)
    return tl.maximum(max_a, max_b), total


@_jit
def lse_reduce(maxes, sums, AXIS: tl.constexpr):
    """Merge statistics (max, sum of exp(x - max)) along ``AXIS`` into one: the largest max and the sums rescaled
    to it. A block of values is ``lse_reduce(values, 1.0, AXIS)``; -inf maxes (masked columns) add 0 and the
    result's max is kept finite (at least ``MAX_START``), ready for ``lse_combine``."""
    merged_max = tl.maximum(tl.max(maxes, AXIS), MAX_START)
    total = tl.sum(sums * tl.exp2((maxes - tl.expand_dims(merged_max, AXIS)) * LOG2E), AXIS)
    return merged_max, total


@_jit
def smoothed_loss(nll, log_sum, shifted_logit_sum, num_classes, label_smoothing, one_minus_smoothing):
    """(1 - eps) * nll + eps * (log s - sum(x - m) / C): label smoothing's uniform target over the C classes."""
    loss = one_minus_smoothing * nll
    if label_smoothing > 0.0:
        # Skipped at 0 so an overflowing logit sum cannot turn 0 * inf into NaN.
        loss += label_smoothing * (log_sum - shifted_logit_sum / num_classes)
    return loss


@_jit
def row_lanes(
    row_start, col_stride, soft_start, soft_col_stride, start, num_classes, anchor,
    lane_max, lane_sum, lane_logits, lane_targets, lane_weighted, SOFT: tl.constexpr, BLOCK: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """Fold columns [start, start + BLOCK) of a row into per-lane running statistics: no reduction across lanes
    (and so no barrier) inside the column loop, only element-wise work between two loads. Only the last, partial
    block is ``MASKED``."""
    cols = start + tl.arange(0, BLOCK)
    inside = cols < num_classes
    pointers = row_start + cols.to(tl.int64) * col_stride
    if MASKED:
        x = tl.load(pointers, mask=inside, other=float("-inf")).to(tl.float32)
        relative = tl.where(inside, x - anchor, 0.0)
    else:
        x = tl.load(pointers).to(tl.float32)
        relative = x - anchor
    lane_max, lane_sum = lse_combine(lane_max, lane_sum, x, 1.0)
    lane_logits += relative
    if SOFT:
        target_pointers = soft_start + cols.to(tl.int64) * soft_col_stride
        if MASKED:
            t = tl.load(target_pointers, mask=inside, other=0.0).to(tl.float32)
        else:
            t = tl.load(target_pointers).to(tl.float32)
        lane_targets += t
        lane_weighted += t * relative
    return lane_max, lane_sum, lane_logits, lane_targets, lane_weighted


@_jit
def row_statistics(
    row_start, col_stride, num_classes, soft_start, soft_col_stride, SOFT: tl.constexpr, BLOCK: tl.constexpr
):
    """(m, log s, sum(x - m), sum t, sum t * (x - m)) of one row of ``num_classes`` logits x (any float dtype,
    computed in fp32), t the soft targets if ``SOFT``; one pass over the row.

    m is the row max and s = sum exp(x - m). The logit sums are accumulated relative to the row's first logit (its
    anchor; 0 if that is not finite) and moved to m at the end, so a large common offset of the logits cannot
    cancel them away. ``num_classes`` may be 0 (an ignored token reads nothing).
    """
    first = tl.load(row_start, mask=num_classes > 0, other=0.0).to(tl.float32)
    anchor = tl.where(tl.abs(first) < float("inf"), first, 0.0)
    lane_max = tl.full([BLOCK], MAX_START, tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    lane_logits = tl.zeros([BLOCK], tl.float32)
    lane_targets = tl.zeros([BLOCK], tl.float32)
    lane_weighted = tl.zeros([BLOCK], tl.float32)
    # Full blocks load without a mask, so the aligned variants' loads vectorise (num_classes is not specialised: a
    # mask `cols < num_classes` would hide the alignment); the partial last block is loaded masked, apart.
    full_end = num_classes - num_classes % BLOCK
    for start in range(0, full_end, BLOCK):
        lane_max, lane_sum, lane_logits, lane_targets, lane_weighted = row_lanes(
            row_start, col_stride, soft_start, soft_col_stride, start, num_classes, anchor,
            lane_max, lane_sum, lane_logits, lane_targets, lane_weighted, SOFT, BLOCK, False,
        )  # fmt: skip
    if full_end < num_classes:
        lane_max, lane_sum, lane_logits, lane_targets, lane_weighted = row_lanes(
            row_start, col_stride, soft_start, soft_col_stride, full_end, num_classes, anchor,
            lane_max, lane_sum, lane_logits, lane_targets, lane_weighted, SOFT, BLOCK, True,
        )  # fmt: skip
    row_max, exp_sum = lse_reduce(lane_max, lane_sum, 0)
    to_max = anchor - row_max
    shifted_logit_sum = tl.sum(lane_logits, 0) + num_classes.to(tl.float32) * to_max
    target_sum = tl.zeros([], tl.float32)
    shifted_target_sum = tl.zeros([], tl.float32)
    if SOFT:
        target_sum = tl.sum(lane_targets, 0)
        shifted_target_sum = tl.sum(lane_weighted, 0) + target_sum * to_max
    return row_max, tl.log(exp_sum), shifted_logit_sum, target_sum, shifted_target_sum


@_jit
def row_loss(
    row,
    logits_ptr,
    logits_row_stride,
    logits_col_stride,
    num_classes,
    labels_a_ptr,
    labels_b_ptr,
    labels_a_stride,
    labels_b_stride,
    lam,
    one_minus_lam,
    soft_ptr,
    soft_row_stride,
    soft_col_stride,
    label_smoothing,
    one_minus_smoothing,
    MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """fp32 cross-entropy of one row (``row_statistics``), label smoothing in the same pass.

    With m the row max and s = sum exp(x - m), lse = m + log(s); the loss is assembled as (m - x_y) + log(s) so a
    confidently right row does not lose its small loss to cancellation against a large lse.
    """
    row_start = logits_ptr + row.to(tl.int64) * logits_row_stride
    soft_start = soft_ptr + row.to(tl.int64) * soft_row_stride
    row_max, log_sum, shifted_logit_sum, target_sum, shifted_target_sum = row_statistics(
        row_start, logits_col_stride, num_classes, soft_start, soft_col_stride, MODE == 2, BLOCK_C
    )
    if MODE == 1:
        # Out-of-range ids (possible only with value checks off) read nothing and give a NaN loss, never chosen.
        label_a = tl.load(labels_a_ptr + row.to(tl.int64) * labels_a_stride)
        label_b = tl.load(labels_b_ptr + row.to(tl.int64) * labels_b_stride)
        valid_a = (label_a >= 0) & (label_a < num_classes)
        valid_b = (label_b >= 0) & (label_b < num_classes)
        x_a = tl.load(row_start + label_a * logits_col_stride, mask=valid_a, other=float("nan")).to(tl.float32)
        x_b = tl.load(row_start + label_b * logits_col_stride, mask=valid_b, other=float("nan")).to(tl.float32)
        nll = lam * ((row_max - x_a) + log_sum) + one_minus_lam * ((row_max - x_b) + log_sum)
    else:
        nll = target_sum * log_sum - shifted_target_sum
    return smoothed_loss(nll, log_sum, shifted_logit_sum, num_classes, label_smoothing, one_minus_smoothing)


def fused_select_kernel(
    score_ptr,
    weight_ptr,
    n_samples,
    indices_ptr,
    batch,
    k,
    logits_ptr,
    logits_row_stride,
    logits_col_stride,
    num_classes,
    labels_a_ptr,
    labels_b_ptr,
    labels_a_stride,
    labels_b_stride,
    lam,
    one_minus_lam,
    soft_ptr,
    soft_row_stride,
    soft_col_stride,
    losses_ptr,
    losses_stride,
    label_smoothing,
    one_minus_smoothing,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    seed_ptr,
    losses_out_ptr,
    keys_ptr,
    ticket_ptr,
    positions_ptr,
    MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program per meta-batch row: loss, update of w then s at the row's dataset id, packed race key.

    The program that takes the last ticket (every other row's key is written by then) selects the k rows. No
    program waits for another, so the grid may have any size whether or not its programs are co-resident.
    """
    # One program per row, so the program id *is* the row's meta-batch position, which alone (with the seed)
    # picks the Philox stream: the draw does not depend on the grid or block sizes.
    row = tl.program_id(0)
    if MODE == 0:
        loss = tl.load(losses_ptr + row.to(tl.int64) * losses_stride).to(tl.float32)
    else:
        loss = row_loss(
            row, logits_ptr, logits_row_stride, logits_col_stride, num_classes,
            labels_a_ptr, labels_b_ptr, labels_a_stride, labels_b_stride, lam, one_minus_lam,
            soft_ptr, soft_row_stride, soft_col_stride, label_smoothing, one_minus_smoothing,
            MODE, BLOCK_C,
        )  # fmt: skip
    tl.store(losses_out_ptr + row, loss)

    index = tl.load(indices_ptr + row)
    # Out-of-range ids (value checks off) touch no memory; their NaN weight keeps them from being preferred.
    valid = (index >= 0) & (index < n_samples)
    score_old = tl.load(score_ptr + index, mask=valid, other=float("nan"))
    weight_part = score_old * beta1
    weight_new = weight_part + loss * one_minus_beta1
    score_part = score_old * beta2
    score_new = score_part + loss * one_minus_beta2
    tl.store(weight_ptr + index, weight_new, mask=valid)
    tl.store(score_ptr + index, score_new, mask=valid)

    seed = tl.load(seed_ptr)
    tl.store(keys_ptr + row, pack_key(race_key(weight_new, seed, row), row))

    # Every thread's key store happens before this program's ticket is released.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        select_top_k(keys_ptr, batch, k, positions_ptr, BLOCK_B)


# Two compiled forms of the same kernel, so the set of variants Triton can build at launch time is small and fixed
# (the AOT gate compiles every one). Triton would otherwise specialise on every integer being 1 or a multiple of 16
# and every pointer being 16-byte aligned: each new view of the inputs could compile a variant nobody checked.
# Values read once per row (ids, labels, given losses) never need those hints. ``fused_select_kernel`` takes
# row-major logits and soft targets with unit column stride, a row stride that is a multiple of 16 elements and
# 16-byte-aligned data, so column blocks load vectorised; ``fused_select_kernel_any_layout`` takes every other view.
_PER_ROW_INTS = ["n_samples", "batch", "k", "num_classes", "labels_a_stride", "labels_b_stride", "losses_stride"]
_PER_ROW_POINTERS = ["indices_ptr", "labels_a_ptr", "labels_b_ptr", "losses_ptr"]
_LAYOUT_INTS = ["logits_row_stride", "logits_col_stride", "soft_row_stride", "soft_col_stride"]
_LAYOUT_POINTERS = ["logits_ptr", "soft_ptr"]
fused_select_kernel, fused_select_kernel_any_layout = jit_layout_forms(
    fused_select_kernel, _PER_ROW_INTS, _PER_ROW_POINTERS, _LAYOUT_INTS, _LAYOUT_POINTERS
)


@_jit(do_not_specialize=["n"])
def prune_keys_kernel(values_ptr, keys_ptr, n, seed_ptr, BLOCK: tl.constexpr):
    """fp32 race keys for n values; the key of sample i depends on (seed, i) only, never on BLOCK.

    Every block but the last loads and stores without a mask, so those accesses vectorise (n is not specialised: a
    mask ``offsets < n`` would hide the alignment).
    """
    first = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = first + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    if first + BLOCK <= n:
        values = tl.load(values_ptr + offsets).to(tl.float32)
        tl.store(keys_ptr + offsets, race_key(values, seed, offsets))
    else:
        inside = offsets < n
        values = tl.load(values_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(keys_ptr + offsets, race_key(values, seed, offsets), mask=inside)
