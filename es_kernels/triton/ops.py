"""The Triton backend's ``torch.library`` custom ops, with fake implementations for tracing.

``es_kernels::{token,hidden}_sequence_losses`` return the per-sequence losses of a language model's token-level
call in two launches each (``sequence_kernels.py``); ``es_kernels::fused_select`` then takes them as ``losses``.
``es_kernels::fused_select`` mutates exactly ``score`` and ``weight`` (declared in ``mutates_args``, so autograd
version counters are bumped and ``torch.compile`` functionalises the call); ``es_kernels::prune_select`` mutates
nothing. Randomness enters as a one-element int64 seed tensor drawn by the caller from its generator: a
``torch.Generator`` cannot be an op argument, and a device seed keeps captured CUDA graphs drawing fresh numbers.
The argument names and order are ``es_kernels.call.OP_ARGUMENTS`` (checked by tests/test_ops.py).

Kernels per device: CUDA launches the compiled Triton code; CPU launches it under Triton's interpreter only
(``TRITON_INTERPRET=1`` set before triton was imported) and otherwise raises: the op never runs something else in
its place. The ops check what they rely on (shapes, contiguity, ``1 <= k <= B``) on the host without reading
values, so a direct ``torch.ops`` caller cannot make them write out of bounds or return unwritten positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from es_kernels.call import OP_ARGUMENTS
from es_kernels.triton.availability import unavailable_reason


def _require_interpreter(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise NotImplementedError(f"es_kernels::fused_select/prune_select cannot run on {device}: {reason}")


def _check_vector(name: str, tensor: Tensor, length: int | None, dtype: torch.dtype | None = None) -> None:
    if tensor.dim() != 1 or (length is not None and tensor.numel() != length):
        wanted = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{name} must have shape {wanted}, got {tuple(tensor.shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_fused_select(
    score, weight, indices, seed, k, logits, labels_a, labels_b, soft_targets, losses
) -> None:  # fmt: skip
    """The op's own host-side checks (no value is read): what the kernel relies on for memory safety."""
    _check_vector("score", score, None, torch.float32)
    _check_vector("weight", weight, score.numel(), torch.float32)
    _check_vector("indices", indices, None, torch.int64)
    batch = indices.numel()
    _check_vector("seed", seed, 1, torch.int64)
    if not 1 <= k <= batch:
        raise ValueError(f"k must be in [1, {batch}], got {k}")
    if losses is not None:
        _check_vector("losses", losses, batch)
        return
    if logits is None or logits.dim() != 2 or logits.shape[0] != batch:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(f"logits must have shape ({batch}, num_classes) to match indices, got {shape}")
    if soft_targets is not None:
        if soft_targets.shape != logits.shape:
            raise ValueError(f"soft_targets must have the logits' shape {tuple(logits.shape)}")
        return
    if labels_a is None:
        raise ValueError("pass labels_a, soft_targets or losses")
    for name, labels in (("labels_a", labels_a), ("labels_b", labels_b)):
        if labels is not None and (labels.shape != (batch,) or labels.dtype != torch.int64):
            raise ValueError(f"{name} must be int64 of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}")


@torch.library.custom_op("es_kernels::fused_select", mutates_args=("score", "weight"), device_types="cuda")
def fused_select(
    score: Tensor,
    weight: Tensor,
    indices: Tensor,
    seed: Tensor,
    k: int,
    beta1: float,
    beta2: float,
    logits: Tensor | None,
    labels_a: Tensor | None,
    labels_b: Tensor | None,
    soft_targets: Tensor | None,
    lam: float,
    losses: Tensor | None,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """Per-sample fp32 losses, ``w`` then ``s`` updated at ``indices``, and k ascending positions drawn ∝ w.

    Targets are ``labels_a`` (int64 ids; with ``labels_b`` and ``lam`` the mixup form), or ``soft_targets`` (B, C);
    or ``losses`` replaces logits and targets. Returns (positions int64 (k,), losses fp32 (B,)).
    """
    return launch_checked(locals())  # the first statement: locals() holds exactly the op's arguments


def launch_checked(arguments: dict) -> tuple[Tensor, Tensor]:
    """The op's host checks and its launch, from its arguments by name (so the list is spelled out only above);
    also the eager path of ``es_kernels.triton.fused_select``, which skips the op's Python dispatch."""
    check_fused_select(*(arguments[name] for name in _CHECKED))
    if arguments["indices"].device.type == "cpu":
        _require_interpreter(arguments["indices"].device)
    from es_kernels.triton import launch  # imports triton: only once a kernel runs

    return launch.fused_select(**arguments)


_CHECKED = ("score", "weight", "indices", "seed", "k", "logits", "labels_a", "labels_b", "soft_targets", "losses")


@fused_select.register_kernel("cpu")
def _fused_select_cpu(*arguments):
    return launch_checked(dict(zip(OP_ARGUMENTS, arguments, strict=True)))


@fused_select.register_fake
def _fused_select_fake(*arguments):
    named = dict(zip(OP_ARGUMENTS, arguments, strict=True))
    indices, k = named["indices"], named["k"]
    return indices.new_empty((k,), dtype=torch.int64), indices.new_empty(indices.shape, dtype=torch.float32)


def check_prune_select(values: Tensor, seed: Tensor, keep: int) -> None:
    _check_vector("values", values, None, torch.float32)
    _check_vector("seed", seed, 1, torch.int64)
    if not 0 <= keep <= values.numel():
        raise ValueError(f"keep must be in [0, {values.numel()}], got {keep}")


@torch.library.custom_op("es_kernels::prune_select", mutates_args=(), device_types="cuda")
def prune_select(values: Tensor, seed: Tensor, keep: int) -> Tensor:
    """``keep`` ascending sample ids (int64) drawn without replacement ∝ ``values``, for any n."""
    check_prune_select(values, seed, keep)
    from es_kernels.triton import launch  # imports triton: only once a kernel runs

    return launch.prune_select(values, seed, keep)


@prune_select.register_kernel("cpu")
def _prune_select_cpu(values, seed, keep):
    check_prune_select(values, seed, keep)
    _require_interpreter(values.device)
    from es_kernels.triton import launch  # imports triton: only once a kernel runs

    return launch.prune_select(values, seed, keep)


@prune_select.register_fake
def _prune_select_fake(values, seed, keep):
    return values.new_empty((keep,), dtype=torch.int64)


def _sequence_launchers(device: torch.device):
    if device.type == "cpu":
        _require_interpreter(device)
    from es_kernels.triton import sequence_kernels  # imports triton: only once a kernel runs

    return sequence_kernels


def _check_sequence_op(source: Tensor, targets: Tensor, vocab: int, ignore_index: int, reduction: str, smoothing):
    """What the kernels rely on (no value is read): the targets' shape and dtype against (B, T) of the source."""
    from es_kernels.reference.sequence import check_sequence_arguments

    check_sequence_arguments(targets, tuple(source.shape[:2]), vocab, ignore_index, reduction, smoothing, False)
    if targets.device != source.device:
        raise ValueError(f"targets must be on {source.device}, got {targets.device}")


@torch.library.custom_op("es_kernels::token_sequence_losses", mutates_args=(), device_types=("cuda", "cpu"))
def token_sequence_losses(
    logits: Tensor, targets: Tensor, ignore_index: int, sequence_reduction: str, label_smoothing: float
) -> Tensor:
    """fp32 (B,) per-sequence losses of (B, T, V) token logits (any strides): per-token launch, then reduction."""
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    _check_sequence_op(logits, targets, logits.shape[2], ignore_index, sequence_reduction, label_smoothing)
    return _sequence_launchers(logits.device).token_sequence_losses(
        logits, targets, ignore_index, sequence_reduction, label_smoothing
    )


@token_sequence_losses.register_fake
def _token_sequence_losses_fake(logits, targets, *options):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


@torch.library.custom_op("es_kernels::hidden_sequence_losses", mutates_args=(), device_types=("cuda", "cpu"))
def hidden_sequence_losses(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    sequence_reduction: str,
    label_smoothing: float,
    logit_scale: float,
    logit_softcap: float | None,
) -> Tensor:
    """fp32 (B,) per-sequence losses of ``H @ W.T (+ bias)``, scaled and soft-capped: the fused tile kernel (an
    online log-sum-exp over vocabulary tiles, never the logits), then the reduction."""
    from es_kernels.reference.sequence import check_hidden_arguments

    check_hidden_arguments(hidden_states, lm_head_weight, lm_head_bias, targets, logit_scale, logit_softcap)
    _check_sequence_op(
        hidden_states, targets, lm_head_weight.shape[0], ignore_index, sequence_reduction, label_smoothing
    )
    return _sequence_launchers(hidden_states.device).hidden_sequence_losses(
        hidden_states, lm_head_weight, lm_head_bias, targets, ignore_index, sequence_reduction, label_smoothing,
        logit_scale, logit_softcap,
    )  # fmt: skip


@hidden_sequence_losses.register_fake
def _hidden_sequence_losses_fake(hidden_states, *arguments):
    return hidden_states.new_empty((hidden_states.shape[0],), dtype=torch.float32)
