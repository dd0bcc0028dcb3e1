"""Launchers: turn checked tensors into one kernel launch. No host synchronisation anywhere on this path.

``fused_select_arguments``/``prune_keys_arguments`` build the exact argument lists the launchers pass, so the AOT
gate (``aot.py``) compiles precisely the variants these launchers can launch.
"""

from __future__ import annotations

import torch

from es_kernels.reference.sampling import largest_keys
from es_kernels.triton import kernels

# Default configuration: the only one the launchers use, and the one the AOT gate proves spill-free.
# Columns per block of the row loss by the widest element of the logits and soft targets: 8 per thread (with
# NUM_WARPS = 4), so fp32 keeps 32 bytes per thread in flight per block (two 16-byte loads) and bf16/fp16 16 bytes;
# 16 per thread for bf16/fp16 spills in this kernel (the radix select shares it), as does fp32 with fp64 targets.
BLOCK_C_BY_ITEMSIZE = {8: 512, 4: 1024, 2: 1024}
BLOCK_B = 1024
NUM_WARPS = 4
PRUNE_BLOCK = 1024
PRUNE_NUM_WARPS = 4
# Keeps every product of the state update rounded before the sum (the reference's rounding order).
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def _row_major_aligned(tensor: torch.Tensor) -> bool:
    """The layout ``fused_select_kernel`` is specialised for (see ``kernels.py``)."""
    return tensor.stride(1) == 1 and tensor.stride(0) % 16 == 0 and tensor.data_ptr() % 16 == 0


def fused_select_arguments(
    score: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    seed: torch.Tensor,
    k: int,
    beta1: float,
    beta2: float,
    logits: torch.Tensor | None,
    labels_a: torch.Tensor | None,
    labels_b: torch.Tensor | None,
    soft_targets: torch.Tensor | None,
    lam: float,
    losses: torch.Tensor | None,
    label_smoothing: float,
) -> tuple[object, tuple, dict, torch.Tensor, torch.Tensor]:
    """(kernel, positional args, constexpr/launch kwargs, positions out, losses out) of one fused launch."""
    batch = indices.numel()
    device = indices.device
    losses_out = torch.empty(batch, dtype=torch.float32, device=device)
    keys = torch.empty(batch, dtype=torch.int64, device=device)
    # A fresh ticket per call (not a cached counter) keeps concurrent calls on different streams independent.
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    positions = torch.empty(k, dtype=torch.int64, device=device)
    # Unused pointer slots get a fixed dummy (the fp32 score) so each mode compiles to exactly one variant.
    dummy = score
    if losses is not None:
        mode = kernels.MODE_LOSSES
        logits_args = (dummy, 0, 0, 2)
    else:
        mode = kernels.MODE_SOFT if soft_targets is not None else kernels.MODE_LABELS
        logits_args = (logits, logits.stride(0), logits.stride(1), logits.shape[1])
    if mode == kernels.MODE_LABELS:
        labels_b = labels_a if labels_b is None else labels_b
        labels_args = (labels_a, labels_b, labels_a.stride(0), labels_b.stride(0), lam, 1.0 - lam)
    else:
        labels_args = (indices, indices, 0, 0, 1.0, 0.0)
    if mode == kernels.MODE_SOFT:
        soft_args = (soft_targets, soft_targets.stride(0), soft_targets.stride(1))
    else:
        soft_args = (dummy, 0, 0)
    losses_args = (losses, losses.stride(0)) if losses is not None else (dummy, 0)
    args = (
        score, weight, score.numel(), indices, batch, k,
        *logits_args, *labels_args, *soft_args, *losses_args,
        label_smoothing, 1.0 - label_smoothing,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        seed, losses_out, keys, ticket, positions,
    )  # fmt: skip
    widest = max((tensor.element_size() for tensor in (logits, soft_targets) if tensor is not None), default=4)
    block_c = BLOCK_C_BY_ITEMSIZE[widest if losses is None else 4]
    kwargs = {"MODE": mode, "BLOCK_C": block_c, "BLOCK_B": BLOCK_B, "num_warps": NUM_WARPS, **COMPILE_OPTIONS}
    layouts = [tensor for tensor in (logits, soft_targets) if tensor is not None and losses is None]
    aligned = all(_row_major_aligned(tensor) for tensor in layouts)
    kernel = kernels.fused_select_kernel if aligned else kernels.fused_select_kernel_any_layout
    return kernel, args, kwargs, positions, losses_out


class _NoDevice:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_STAY = _NoDevice()


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device; a tensor on another GPU must switch to its own. Switching costs two
    # device exchanges per call, so it happens only when needed.
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _STAY
    return torch.cuda.device(device)


def fused_select(*arguments, **named) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments as ``fused_select_arguments``; returns (k ascending positions, fp32 losses). One launch."""
    kernel, args, kwargs, positions, losses_out = fused_select_arguments(*arguments, **named)
    batch = args[4]
    grid = (batch,)
    with _on_device(positions.device):
        kernel[grid](*args, **kwargs)
    return positions, losses_out


def prune_keys_arguments(values: torch.Tensor, seed: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
    keys = torch.empty(values.shape, dtype=torch.float32, device=values.device)
    kwargs = {"BLOCK": PRUNE_BLOCK, "num_warps": PRUNE_NUM_WARPS, **COMPILE_OPTIONS}
    return (values, keys, values.numel(), seed), kwargs, keys


def prune_keys(values: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """fp32 race keys of ``values`` (key i from (seed, i) only): one launch."""
    args, kwargs, keys = prune_keys_arguments(values, seed)
    grid = (triton_cdiv(values.numel(), PRUNE_BLOCK),)
    with _on_device(values.device):
        kernels.prune_keys_kernel[grid](*args, **kwargs)
    return keys


def prune_select(values: torch.Tensor, seed: torch.Tensor, keep: int) -> torch.Tensor:
    """``keep`` ascending ids drawn ∝ values: one key launch, then the reference's choice of the largest keys."""
    return largest_keys(prune_keys(values, seed), keep)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
