"""Argument checks shared by every entry point. Each raises ValueError/TypeError naming the argument.

Shape, dtype and device checks never read tensor values. Value checks (ranges, duplicates, finiteness) read them.
They run in one of two ways (:func:`check_mode`): *immediate*, reading the values on the host and raising before
anything is written (free on CPU, a synchronisation on a GPU), or *deferred*, computed on the device by
:class:`DeviceChecks` without the host reading anything; a failed deferred check keeps the call's update out of the
state, and the error is raised at the next point where the host reads (``EvolvedState.check``).
"""

from __future__ import annotations

import enum
import math
import numbers

import torch

from es_kernels.reference import sequence


def check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def check_fraction(name: str, value: object, *, upper_open: bool = False) -> float:
    """A float in [0, 1] (or [0, 1) with ``upper_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    inside = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not inside:
        raise ValueError(f"{name} must be in {'[0, 1)' if upper_open else '[0, 1]'}, got {value}")
    return value


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the state lives on {device}; move one of them")


def check_indices(
    name: str, indices: object, num_samples: int, device: torch.device, check_values: bool
) -> torch.Tensor:
    """1-D integer tensor of dataset ids in [0, num_samples), no repeats; returned as contiguous int64."""
    indices = check_tensor(name, indices)
    check_integer_dtype(name, indices, "(int64 ids)")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one dataset id per meta-batch row), got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    check_device(name, indices, device)
    indices = indices.to(torch.int64).contiguous()
    if check_values:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_samples:
            raise ValueError(ids_out_of_range(name, num_samples, low if low < 0 else high))
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError(ids_repeat(name))
    return indices


def ids_out_of_range(name: str, num_samples: int, bad: int) -> str:
    return f"{name} must be in [0, {num_samples}), got {bad}"


def ids_repeat(name: str) -> str:
    return f"{name} must not repeat an id within one call (each sample is visited once)"


def check_losses(name: str, losses: object, batch: int, device: torch.device, check_values: bool) -> torch.Tensor:
    """Per-sample losses (B,), floating point, finite and non-negative; returned contiguous (the kernels read
    them as a flat vector)."""
    losses = check_tensor(name, losses)
    if not losses.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {losses.dtype}")
    if losses.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match indices, got {tuple(losses.shape)}")
    check_device(name, losses, device)
    if check_values:
        check_loss_values(name, losses)
    return losses.contiguous()


def value_range(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) with one reduction and one host sync. NaN propagates through min/max and inf sits at an end, so
    both are finite exactly when every element is; 10x cheaper than ``isfinite(t).all()``, which allocates a mask."""
    low, high = torch.aminmax(tensor)
    low, high = torch.stack((low, high)).tolist()
    return low, high


def all_finite(tensor: torch.Tensor) -> bool:
    return tensor.numel() == 0 or all(math.isfinite(end) for end in value_range(tensor))


def all_finite_non_negative(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return True
    low, high = value_range(tensor)
    return math.isfinite(low) and math.isfinite(high) and low >= 0


def losses_not_finite(name: str) -> str:
    return f"{name} must be finite (found NaN or inf)"


def losses_negative(name: str) -> str:
    return f"{name} must be non-negative (weights are proportional to losses)"


COMPUTED_LOSSES = "losses computed from logits"


def check_loss_values(name: str, losses: torch.Tensor) -> None:
    if not all_finite(losses):
        raise ValueError(losses_not_finite(name))
    if not all_finite_non_negative(losses):
        raise ValueError(losses_negative(name))


def check_generator(generator: object, device: torch.device) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    same_index = generator.device.index is None or device.index is None or generator.device.index == device.index
    if generator.device.type != device.type or not same_index:
        raise ValueError(f"generator is on {generator.device} but the state lives on {device}")
    return generator


GENERATOR_UNDER_COMPILE = (
    "generator: torch.compile cannot trace a torch.Generator argument; inside a compiled function leave "
    "generator=None (the draw then follows torch.manual_seed of the device's default generator), or call "
    "evolved_select outside the compiled region"
)


def check_integer_dtype(name: str, tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor {what}, got {tensor.dtype}")


def check_step_indices(
    name: str, indices: object, num_samples: int, device: torch.device, check_values: bool
) -> torch.Tensor:
    """As :func:`check_indices`, but an empty 1-D tensor is allowed (a rank with no rows this step)."""
    indices = check_tensor(name, indices)
    if indices.numel() > 0:
        return check_indices(name, indices, num_samples, device, check_values)
    check_integer_dtype(name, indices, "(int64 ids)")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(indices.shape)}")
    check_device(name, indices, device)
    return indices.to(torch.int64)


def class_id_message(name: str, num_classes: int) -> str:
    return f"{name} must hold class ids in [0, {num_classes})"


def check_labels(name: str, labels: object, batch: int, num_classes: int, device, check_values: bool) -> torch.Tensor:
    """Class ids (B,) of any integer dtype, returned as int64."""
    labels = check_tensor(name, labels)
    check_integer_dtype(name, labels, "of class ids")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
    check_device(name, labels, device)
    labels = labels.to(torch.int64)
    if check_values and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(class_id_message(name, num_classes))
    return labels


def check_lam(lam: object, check_values: bool) -> float:
    """The mixup weight as a float. A one-element tensor is read on the host: free on CPU; off the CPU it is a
    synchronisation, accepted only while value checks (which synchronise anyway) are on."""
    name = "targets[2] (lam)"
    if isinstance(lam, torch.Tensor) and lam.numel() == 1:
        if lam.device.type != "cpu" and not check_values:
            raise TypeError(
                f"{name} is a {lam.device.type} tensor: reading it would synchronise the host, which "
                "check_values=False promises not to do; pass lam as a Python float (or a CPU tensor)"
            )
        lam = lam.item()
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(lam).__name__}")
    return check_fraction(name, lam)


def check_logits(logits: object, batch: int, device: torch.device, check_values: bool) -> torch.Tensor:
    logits = check_tensor("logits", logits)
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(f"logits must have shape ({batch}, num_classes) to match indices, got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes, got {logits.shape[1]}")
    check_device("logits", logits, device)
    if check_values and not all_finite(logits):
        raise ValueError(LOGITS_NOT_FINITE)
    return logits


LOGITS_NOT_FINITE = losses_not_finite("logits")
TOKEN_LOGITS_TO_SEQUENCE_LOSSES = (
    "logits of shape (B, T, V) are token logits, which evolved_select does not take: compute the per-sequence "
    "losses with es_kernels.sequence_losses(targets, logits=...) (or hidden_states=..., lm_head_weight=...) and "
    "pass them as evolved_select(..., losses=losses)"
)
SOFT_TARGETS_BAD = "targets as soft labels must be finite and non-negative"


def check_targets(
    targets: object, logits: torch.Tensor, device: torch.device, check_values: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, float]:
    """The user's targets in the call's one encoding: ``(labels_a, labels_b, soft_targets, lam)``.

    Accepts int labels (B,), dense soft targets with the logits' shape, or the mixup form ``(y_a, y_b, lam)`` (a
    tuple, list or :class:`~es_kernels.reference.MixupTargets`).
    """
    batch, num_classes = logits.shape
    if isinstance(targets, (tuple, list)):
        if len(targets) != 3:
            raise ValueError("targets as a tuple must be the mixup form (y_a, y_b, lam)")
        y_a, y_b, lam = targets
        y_a = check_labels("targets[0] (y_a)", y_a, batch, num_classes, device, check_values)
        y_b = check_labels("targets[1] (y_b)", y_b, batch, num_classes, device, check_values)
        return y_a, y_b, None, check_lam(lam, check_values)
    targets = check_tensor("targets", targets)
    if not targets.dtype.is_floating_point:
        return check_labels("targets", targets, batch, num_classes, device, check_values), None, None, 1.0
    if targets.dim() == 1:
        raise TypeError(
            f"1-D targets must be integer class ids, got {targets.dtype} (soft labels have the logits' shape "
            f"{tuple(logits.shape)})"
        )
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets as soft labels must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}"
        )
    check_device("targets", targets, device)
    if check_values and not all_finite_non_negative(targets):
        raise ValueError(SOFT_TARGETS_BAD)
    return None, None, targets, 1.0


IMMEDIATE = "immediate"
DEFERRED = "deferred"
OFF = "off"
CHECK_VALUES_CHOICES = (True, False, IMMEDIATE, DEFERRED)


def check_mode(check_values: object, device: torch.device) -> str:
    """How value checks run for a call on ``device``: ``check_values=True`` (the default) is immediate on CPU,
    where reading a value costs no synchronisation, and deferred elsewhere and inside ``torch.compile`` (a traced
    graph cannot read a value); ``"immediate"`` or ``"deferred"`` choose; ``False`` switches them off."""
    if check_values is False:
        return OFF
    if check_values is True:
        deferred = device.type != "cpu" or torch.compiler.is_compiling()
        return DEFERRED if deferred else IMMEDIATE
    if check_values == IMMEDIATE:
        return DEFERRED if torch.compiler.is_compiling() else IMMEDIATE
    if check_values == DEFERRED:
        return DEFERRED
    raise ValueError(f"check_values must be one of {CHECK_VALUES_CHOICES}, got {check_values!r}")


class ValueCheck(enum.IntEnum):
    """Codes of a failed value check run inside a kernel (csrc/ops.h ``CheckCode``, same numbers): the kernel returns
    the code and the offending value before any write, and :func:`raise_value_check` raises this module's message."""

    OK = 0
    INDICES_OUT_OF_RANGE = 1  # value: the offending id
    INDICES_REPEAT = 2
    LOSSES_NOT_FINITE = 3
    LOSSES_NEGATIVE = 4
    LOGITS_NOT_FINITE = 5
    LABELS_OUT_OF_RANGE = 6  # value: 0 targets, 1 y_a, 2 y_b
    SOFT_TARGETS_BAD = 7
    COMPUTED_LOSSES_NOT_FINITE = 8
    COMPUTED_LOSSES_NEGATIVE = 9
    # Deferred checks only (the C++ kernels never return these):
    INDICES_REVISITED = 10  # value: the first id already visited in the epoch
    TOKEN_TARGETS_OUT_OF_RANGE = 11  # value: the ignore_index


_LABEL_NAMES = ("targets", "targets[0] (y_a)", "targets[1] (y_b)")


def revisit_message(ids: list[int], epoch: int | None) -> str:
    shown = ", ".join(map(str, ids[:8])) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
    return (
        f"indices: sample ids [{shown}] were already visited in epoch {epoch}; Algorithm 1 updates a sample once per "
        "epoch. Select (or observe) each batch once, and call set_epoch at every epoch start."
    )


def value_check_message(code: int, value: int, *, num_samples: int, num_classes: int, epoch: int | None = None) -> str:
    """The message of the Python value check a kernel's or a deferred check's ``(code, value)`` stands for
    (``num_classes`` is the vocabulary size for token targets)."""
    code = ValueCheck(code)
    messages = {
        ValueCheck.INDICES_OUT_OF_RANGE: lambda: ids_out_of_range("indices", num_samples, value),
        ValueCheck.INDICES_REPEAT: lambda: ids_repeat("indices"),
        ValueCheck.LOSSES_NOT_FINITE: lambda: losses_not_finite("losses"),
        ValueCheck.LOSSES_NEGATIVE: lambda: losses_negative("losses"),
        ValueCheck.LOGITS_NOT_FINITE: lambda: LOGITS_NOT_FINITE,
        ValueCheck.LABELS_OUT_OF_RANGE: lambda: class_id_message(_LABEL_NAMES[value], num_classes),
        ValueCheck.SOFT_TARGETS_BAD: lambda: SOFT_TARGETS_BAD,
        ValueCheck.COMPUTED_LOSSES_NOT_FINITE: lambda: losses_not_finite(COMPUTED_LOSSES),
        ValueCheck.COMPUTED_LOSSES_NEGATIVE: lambda: losses_negative(COMPUTED_LOSSES),
        ValueCheck.INDICES_REVISITED: lambda: revisit_message([value], epoch),
        ValueCheck.TOKEN_TARGETS_OUT_OF_RANGE: lambda: sequence.token_targets_message(num_classes, value),
    }
    return messages[code]()


class DeviceChecks:
    """The value checks of one call computed on the device: nothing is read on the host, so nothing synchronises
    and the whole thing traces in ``torch.compile`` and captures in a CUDA graph.

    Checks are added in the order the immediate mode runs them, so the first one that fails names the same problem
    an immediate check would have raised. :meth:`status` is a (2,) int64 device tensor ``(code, value)`` with
    ``code == ValueCheck.OK`` when every check passed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._codes: list[torch.Tensor] = []  # 0-d int64 per check: its code if it failed, else 0
        self._values: list[torch.Tensor] = []  # 0-d int64 per check

    def add(self, failed: torch.Tensor, code: ValueCheck, value: torch.Tensor | None = None) -> None:
        # The code enters as a scalar operand: a device tensor of the codes would be a host-to-device copy per call.
        self._codes.append(failed.reshape(()).to(torch.int64) * int(code))
        self._values.append(self._codes[-1] if value is None else value.reshape(()).to(torch.int64))

    def indices(self, indices: torch.Tensor, num_samples: int, visited: torch.Tensor | None) -> None:
        """Ids in [0, num_samples), no repeat within the call, and (with epoch marks) none visited this epoch."""
        ordered = torch.sort(indices).values
        low, high = ordered[0], ordered[-1]
        self.add((low < 0) | (high >= num_samples), ValueCheck.INDICES_OUT_OF_RANGE, torch.where(low < 0, low, high))
        if indices.numel() > 1:
            self.add((ordered[1:] == ordered[:-1]).any(), ValueCheck.INDICES_REPEAT)
        if visited is not None:
            inside = (indices >= 0) & (indices < num_samples)
            again = visited.index_select(0, indices.clamp(0, num_samples - 1)) & inside
            first = again.to(torch.uint8).argmax().reshape(1)
            self.add(again.any(), ValueCheck.INDICES_REVISITED, indices.index_select(0, first))

    def losses(self, losses: torch.Tensor, computed: bool) -> None:
        """Finite, then non-negative (given by the user, or computed from logits)."""
        low, high = torch.aminmax(losses.to(torch.float32))
        finite = torch.isfinite(low) & torch.isfinite(high)
        if computed:
            codes = ValueCheck.COMPUTED_LOSSES_NOT_FINITE, ValueCheck.COMPUTED_LOSSES_NEGATIVE
        else:
            codes = ValueCheck.LOSSES_NOT_FINITE, ValueCheck.LOSSES_NEGATIVE
        self.add(~finite, codes[0])
        self.add(low < 0, codes[1])

    def labels(self, labels: torch.Tensor, num_classes: int, which: int) -> None:
        low, high = torch.aminmax(labels)
        self.add((low < 0) | (high >= num_classes), ValueCheck.LABELS_OUT_OF_RANGE, torch.full_like(low, which))

    def soft_targets(self, targets: torch.Tensor) -> None:
        low, high = torch.aminmax(targets.to(torch.float32))
        self.add(~(torch.isfinite(low) & torch.isfinite(high)) | (low < 0), ValueCheck.SOFT_TARGETS_BAD)

    def status(self) -> torch.Tensor:
        """(code, value) of the first failed check, or (0, 0)."""
        if not self._codes:
            return torch.zeros(2, dtype=torch.int64, device=self.device)
        codes = torch.stack(self._codes)
        # The first failed check; 0 when none failed, whose code is then 0. index_select, not [first]: indexing with
        # a tensor is a data-dependent size to torch.compile.
        first = (codes != 0).to(torch.uint8).argmax().reshape(1)
        return torch.cat((codes.index_select(0, first), torch.stack(self._values).index_select(0, first)))


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT64_RANGE = (-(2**63), 2**63 - 1)


def check_positive_real(name: str, value: object, *, optional: bool = False) -> float | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float{' or None' if optional else ''}, got {type(value).__name__}")
    return float(value)  # its sign is checked with the other hidden-state arguments (reference.sequence)


def check_sequence_call(
    device: torch.device, check_values: bool, *, logits: object, targets: object, hidden_states: object,
    lm_head_weight: object, lm_head_bias: object, ignore_index: object, sequence_reduction: object,
    label_smoothing: float, logit_scale: object, logit_softcap: object,
) -> dict:  # fmt: skip
    """The arguments of ``sequence_losses`` as ``SelectCall`` token-level fields (the targets as ``labels_a``).

    Either ``logits`` (B, T, V), or ``hidden_states`` (B, T, D) with ``lm_head_weight`` (V, D); int64 ``targets``
    (B, T), whose B the logits or hidden states must match. The shape, dtype and range rules shared with the
    kernels are ``reference.sequence``'s checks."""
    ignore_index = check_int("ignore_index", ignore_index, low=INT64_RANGE[0], high=INT64_RANGE[1])
    fields = {"ignore_index": ignore_index, "sequence_reduction": sequence_reduction}
    if hidden_states is not None:
        if logits is not None:
            raise ValueError("pass either logits or hidden_states with lm_head_weight, not both")
        name, source = "hidden_states", check_tensor("hidden_states", hidden_states)
        weight = check_tensor("lm_head_weight", lm_head_weight)
        if lm_head_bias is not None:
            check_tensor("lm_head_bias", lm_head_bias)
        logit_scale = check_positive_real("logit_scale", logit_scale)
        logit_softcap = check_positive_real("logit_softcap", logit_softcap, optional=True)
        sequence.check_hidden_arguments(source, weight, lm_head_bias, targets, logit_scale, logit_softcap)
        vocab = weight.shape[0]
        fields.update(hidden_states=source.detach(), lm_head_weight=weight.detach(), logit_scale=logit_scale,
                      logit_softcap=logit_softcap,
                      lm_head_bias=None if lm_head_bias is None else lm_head_bias.detach())  # fmt: skip
    else:
        if lm_head_weight is not None or lm_head_bias is not None:
            raise ValueError("lm_head_weight and lm_head_bias go with hidden_states (not with logits)")
        name, source = "logits", check_tensor("logits", logits)
        if source.dim() != 3:
            raise ValueError(f"logits must have shape (B, T, V) for token-level targets, got {tuple(source.shape)}")
        vocab = source.shape[2]
        fields["logits"] = source.detach()
    if source.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {source.dtype}")
    check_device(name, source, device)
    targets = check_tensor("targets", targets)
    check_device("targets", targets, device)
    batch = targets.shape[0] if targets.dim() > 0 else 0
    if source.shape[0] != batch:
        raise ValueError(f"{name} must have B = {batch} sequences to match targets, got shape {tuple(source.shape)}")
    time = source.shape[1]
    sequence.check_sequence_arguments(
        targets, (batch, time), vocab, ignore_index, sequence_reduction, label_smoothing, values=check_values
    )
    if check_values and not all_finite(source):
        raise ValueError(losses_not_finite(name))
    fields["labels_a"] = targets
    return fields
