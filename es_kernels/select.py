"""The public ops ``evolved_select`` and ``evolved_prune``: argument checks, then backend dispatch.

This is the only module that chooses between implementations. A backend module (``es_kernels.reference`` via the
wrappers below, ``es_kernels.triton``, ``es_kernels.extension``) provides

* ``fused_select(score, weight, indices, k, beta1, beta2, logits, targets, losses, label_smoothing, generator)``
  returning ``(positions, losses)``: fp32 per-sample losses (from logits, or the given ones), the state update at
  ``indices``, and k ascending positions drawn without replacement ∝ the updated weights;
* ``prune_select(values, keep, generator)`` returning ``keep`` ascending ids drawn without replacement ∝ values.

Arguments reach a backend already checked: contiguous int64 indices, a 2-D logits tensor with matching targets (or
fp32-convertible losses), and, when value checks are on, finite logits and in-range targets.
"""

from __future__ import annotations

import numbers
from types import ModuleType

import torch

from es_kernels import _checks, reference
from es_kernels.backends import Backend, record_backend, resolve_backend
from es_kernels.reference import MixupTargets
from es_kernels.state import EvolvedState

Targets = torch.Tensor | MixupTargets | tuple


class _TorchBackend:
    """The reference as a backend: same signatures as the kernels, composed of the oracle's pieces."""

    @staticmethod
    def fused_select(score, weight, indices, k, beta1, beta2, logits, targets, losses, label_smoothing, generator):
        if losses is None:
            losses = reference.per_sample_cross_entropy(logits, targets, label_smoothing)
        losses = losses.to(torch.float32)
        reference.ema_update_(score, weight, indices, losses, beta1, beta2)
        return reference.race_select(weight[indices], k, generator), losses

    @staticmethod
    def prune_select(values, keep, generator):
        return reference.prune_select(values, keep, generator)


def _backend_module(backend: Backend) -> ModuleType | type[_TorchBackend]:
    # Import statements, not importlib: torch.compile traces these (the modules are loaded by the availability
    # check already) but refuses importlib.import_module.
    if backend is Backend.TORCH:
        return _TorchBackend
    if backend is Backend.TRITON:
        from es_kernels import triton as module
    else:
        from es_kernels import extension as module
    return module


def _check_generator(generator: object, device: torch.device) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    same_index = generator.device.index is None or device.index is None or generator.device.index == device.index
    if generator.device.type != device.type or not same_index:
        raise ValueError(f"generator is on {generator.device} but the state lives on {device}")
    return generator


def _check_label_tensor(name: str, labels: object, batch: int, num_classes: int, device, check_values: bool):
    labels = _checks.check_tensor(name, labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class ids, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
    _checks.check_device(name, labels, device)
    labels = labels.to(torch.int64)
    if check_values and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"{name} must hold class ids in [0, {num_classes})")
    return labels


def _check_targets(targets: object, logits: torch.Tensor, device: torch.device, check_values: bool) -> Targets:
    batch, num_classes = logits.shape
    if isinstance(targets, (tuple, list)):
        if len(targets) != 3:
            raise ValueError("targets as a tuple must be the mixup form (y_a, y_b, lam)")
        y_a, y_b, lam = targets
        y_a = _check_label_tensor("targets[0] (y_a)", y_a, batch, num_classes, device, check_values)
        y_b = _check_label_tensor("targets[1] (y_b)", y_b, batch, num_classes, device, check_values)
        if isinstance(lam, torch.Tensor) and lam.numel() == 1:
            lam = lam.item()
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
            raise TypeError(f"targets[2] (lam) must be a float, got {type(lam).__name__}")
        return MixupTargets(y_a, y_b, _checks.check_fraction("targets[2] (lam)", lam))
    targets = _checks.check_tensor("targets", targets)
    if not targets.dtype.is_floating_point:
        return _check_label_tensor("targets", targets, batch, num_classes, device, check_values)
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets as soft labels must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}"
        )
    _checks.check_device("targets", targets, device)
    if check_values and not _checks.all_finite_non_negative(targets):
        raise ValueError("targets as soft labels must be finite and non-negative")
    return targets


def _check_logits(logits: object, batch: int, device: torch.device, check_values: bool) -> torch.Tensor:
    logits = _checks.check_tensor("logits", logits)
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(f"logits must have shape ({batch}, num_classes) to match indices, got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes, got {logits.shape[1]}")
    _checks.check_device("logits", logits, device)
    if check_values and not _checks.all_finite(logits):
        raise ValueError("logits must be finite (found NaN or inf)")
    return logits


def evolved_select(
    state: EvolvedState,
    indices: torch.Tensor,
    k: int,
    *,
    logits: torch.Tensor | None = None,
    targets: Targets | None = None,
    losses: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | Backend = "auto",
    return_losses: bool = False,
    check_values: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Score a meta-batch, update the state at its dataset ids, and draw k of its B rows to back-propagate.

    Args:
        state: the :class:`EvolvedState`; its ``s``/``w`` at ``indices`` are updated in place.
        indices: (B,) dataset ids of the meta-batch rows, on the state's device, no repeats.
        k: how many rows to keep, 1 <= k <= B (paper: B // 4).
        logits: (B, C) outputs of the scoring forward (fp32/bf16/fp16); losses are cross-entropy against targets.
        targets: with logits: int64 labels (B,), dense soft targets (B, C), or the mixup form ``(y_a, y_b, lam)``.
        losses: (B,) per-sample losses of any task, instead of logits/targets.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``, in [0, 1].
        generator: source of the draw; ``None`` uses torch's default generator of the device (follows
            ``torch.manual_seed``). A given generator leaves the global RNG untouched.
        backend: ``"auto"``, ``"triton"``, ``"extension"`` or ``"torch"`` (the reference). A named backend that
            cannot run raises; ``es_kernels.last_backend()`` says which ran.
        return_losses: also return the fp32 per-sample losses (for logging).
        check_values: read tensor values to reject out-of-range ids, repeats, NaN/inf and bad labels (synchronises a
            GPU). With it off, bad values are undefined behaviour but never an out-of-bounds write.

    Returns:
        int64 positions into the meta-batch (ascending, length k), and the losses if ``return_losses``.

    Raises ``TypeError``/``ValueError`` naming the bad argument; the state is unchanged when it raises.
    """
    if not isinstance(state, EvolvedState):
        raise TypeError(f"state must be an EvolvedState, got {type(state).__name__}")
    device = state.device
    chosen = resolve_backend(backend, device)
    # On CPU the extension runs the value checks in its own pass (same messages, before any write): in Python they
    # cost more than the whole kernel at small sizes.
    checks_in_kernel = check_values and chosen is Backend.EXTENSION and device.type == "cpu"
    check_values_here = check_values and not checks_in_kernel
    indices = _checks.check_indices("indices", indices, state.num_samples, device, check_values_here)
    batch = indices.numel()
    k = _checks.check_int("k", k, low=1, high=batch)
    label_smoothing = _checks.check_fraction("label_smoothing", label_smoothing)
    generator = _check_generator(generator, device)
    if losses is not None:
        if logits is not None or targets is not None:
            raise ValueError("pass either losses, or logits with targets, not both")
        losses = _checks.check_losses("losses", losses, batch, device, check_values_here).detach()
    else:
        if logits is None or targets is None:
            raise ValueError("pass logits together with targets (or per-sample losses)")
        logits = _check_logits(logits, batch, device, check_values_here).detach()
        targets = _check_targets(targets, logits, device, check_values_here)
        if isinstance(targets, torch.Tensor):
            targets = targets.detach()
    if check_values:
        state.check_unvisited(indices)  # a sample updated twice in one epoch (once an epoch was begun)
    implementation = _backend_module(chosen)
    with torch.no_grad():
        if check_values and losses is None and chosen is Backend.TORCH:
            # The reference computes losses before touching the state, so an overflow to inf can still be refused.
            computed = reference.per_sample_cross_entropy(logits, targets, label_smoothing)
            _checks.check_loss_values("losses computed from logits", computed)
            logits, targets, losses = None, None, computed
        # The extension checks the losses it computes between its loss and update passes (finite logits can still
        # overflow); Triton cannot without a host sync, so there the logits pre-check is the guard.
        extension_only = (
            {"check_losses": check_values, "check_inputs": checks_in_kernel} if chosen is Backend.EXTENSION else {}
        )
        positions, batch_losses = implementation.fused_select(
            state.score, state.weight, indices, k, state.beta1, state.beta2,
            logits, targets, losses, label_smoothing, generator, **extension_only,
        )  # fmt: skip
    state.mark_visited(indices)
    record_backend(chosen)
    return (positions, batch_losses) if return_losses else positions


def evolved_prune(
    state: EvolvedState,
    keep: int,
    *,
    by: str = "weight",
    generator: torch.Generator | None = None,
    backend: str | Backend = "auto",
) -> torch.Tensor:
    """ESWP's set-level draw: ``keep`` sample ids (ascending, int64) without replacement ∝ ``w`` (or ``s``).

    Works for any n (no ``torch.multinomial``, which refuses more than 2**24 categories).
    """
    if not isinstance(state, EvolvedState):
        raise TypeError(f"state must be an EvolvedState, got {type(state).__name__}")
    keep = _checks.check_int("keep", keep, low=0, high=state.num_samples)
    if by not in ("weight", "score"):
        raise ValueError(f"by must be 'weight' or 'score', got {by!r}")
    generator = _check_generator(generator, state.device)
    chosen = resolve_backend(backend, state.device)
    values = state.weight if by == "weight" else state.score
    with torch.no_grad():
        kept = _backend_module(chosen).prune_select(values, keep, generator)
    record_backend(chosen)
    return kept
