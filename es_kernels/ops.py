"""``torch.library`` custom ops of the kernel backends, with fake implementations for tracing.

``es_kernels::fused_select`` mutates exactly ``score`` and ``weight`` (declared in ``mutates_args``, so autograd
version counters are bumped and ``torch.compile`` functionalises the call); ``es_kernels::prune_select`` mutates
nothing. Randomness enters as a one-element int64 seed tensor drawn by the caller from its generator: a
``torch.Generator`` cannot be an op argument, and a device seed keeps captured CUDA graphs drawing fresh numbers.

Kernels per device: where the Triton backend can run (CUDA with Triton, or CPU under ``TRITON_INTERPRET=1``) the op
launches the Triton code; elsewhere (plain CPU) it runs the pure-PyTorch reference, seeded from the seed tensor, so
the op works, traces and passes ``opcheck`` on any machine. The reference kernel reads the seed on the host; that is
a synchronisation only on devices where Triton cannot run, which ``select.py`` never routes here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from es_kernels import reference


def _triton_runs_on(device: torch.device) -> bool:
    from es_kernels.triton import unavailable_reason

    return unavailable_reason(device) is None


def _seeded_generator(seed: Tensor) -> torch.Generator:
    generator = torch.Generator(device=seed.device)
    generator.manual_seed(int(seed.item()))
    return generator


@torch.library.custom_op("es_kernels::fused_select", mutates_args=("score", "weight"))
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
    if _triton_runs_on(indices.device):
        from es_kernels.triton import launch

        return launch.fused_select(
            score, weight, indices, seed, k, beta1, beta2,
            logits, labels_a, labels_b, soft_targets, lam, losses, label_smoothing,
        )  # fmt: skip
    if losses is None:
        if soft_targets is not None:
            targets = soft_targets
        elif labels_b is not None:
            targets = reference.MixupTargets(labels_a, labels_b, lam)
        else:
            targets = labels_a
        losses = reference.per_sample_cross_entropy(logits, targets, label_smoothing)
    losses = losses.to(torch.float32)
    reference.ema_update_(score, weight, indices, losses, beta1, beta2)
    positions = reference.race_select(weight[indices], k, _seeded_generator(seed))
    # A fresh tensor: a custom op's output may not alias an input, and `.to` returns fp32 losses as they came.
    return positions, losses.clone()


@fused_select.register_fake
def _fused_select_fake(
    score, weight, indices, seed, k, beta1, beta2, logits, labels_a, labels_b, soft_targets, lam, losses,
    label_smoothing,
):  # fmt: skip
    return indices.new_empty((k,), dtype=torch.int64), indices.new_empty(indices.shape, dtype=torch.float32)


@torch.library.custom_op("es_kernels::prune_select", mutates_args=())
def prune_select(values: Tensor, seed: Tensor, keep: int) -> Tensor:
    """``keep`` ascending sample ids (int64) drawn without replacement ∝ ``values``, for any n."""
    if _triton_runs_on(values.device):
        from es_kernels.triton import launch

        return launch.prune_select(values, seed, keep)
    return reference.prune_select(values, keep, _seeded_generator(seed))


@prune_select.register_fake
def _prune_select_fake(values, seed, keep):
    return values.new_empty((keep,), dtype=torch.int64)
