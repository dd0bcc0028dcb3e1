"""The Triton backend: one fused launch per ``evolved_select`` call, and a key kernel for pruning.

Where it runs:

* CUDA tensors on an sm_80+ GPU with ``triton`` importable (the real use);
* CPU tensors when Triton's interpreter is on, i.e. ``TRITON_INTERPRET=1`` was in the environment *before*
  ``triton`` was first imported in the process (``torch._dynamo``/``torch.compile`` import it too). That mode exists
  for tests on machines without a GPU; it runs every program one after another in numpy and is slow.

Both entry points draw a fresh Philox seed from the caller's generator (or the device's default generator) into a
one-element device tensor, so a CUDA graph that captured the call replays with new randomness, and then call the
``es_kernels::`` custom ops of :mod:`es_kernels.ops`, whose CUDA kernels launch the Triton code.

This module imports neither ``triton`` nor the kernels at import time: checking availability must stay cheap and
must not fix the interpreter mode of a process that has not decided it yet.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import sys

import torch

from es_kernels.reference import MixupTargets

MIN_CAPABILITY = (8, 0)
# tl.histogram(..., mask=) arrived in Triton 3.4 (do_not_specialize_on_alignment in 3.1); torch >= 2.8 ships it.
MIN_TRITON = (3, 4)
_TRUE = ("1", "true", "yes", "on", "y")


def interpreter_requested() -> bool:
    """True if ``TRITON_INTERPRET`` asks for Triton's interpreter (read now, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _interpreter_active() -> bool:
    # Triton decides at decoration time; its own library functions show which mode this process got.
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.randint, InterpretedFunction)


def triton_version_problem(version: str) -> str | None:
    """None if Triton ``version`` (a version string such as ``"3.4.0"`` or ``"3.3.1+git..."``) can run the
    kernels, else why not. Read from the installed distribution's metadata, so it costs no import of triton."""
    numbers = re.match(r"(\d+)\.(\d+)", version)
    if numbers is None:
        return f"cannot read the Triton version {version!r}"
    if (int(numbers.group(1)), int(numbers.group(2))) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return f"the Triton kernels need triton >= {need} (torch >= 2.8), found {version}"
    return None


def _installed_triton_version() -> str | None:
    for distribution in ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-windows"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    # A source build without distribution metadata: ask the module if it is loaded anyway.
    return getattr(sys.modules.get("triton"), "__version__", None)


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on tensors of ``device``, else why not."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    version = _installed_triton_version()
    if version is not None and (problem := triton_version_problem(version)):
        return problem
    if interpreter_requested():
        if device.type not in ("cpu", "cuda"):
            return f"Triton's interpreter runs on CPU or CUDA tensors, not {device.type}"
        if "triton" in sys.modules and not _interpreter_active():
            return (
                "TRITON_INTERPRET=1 was set after triton had been imported in this process; set it before the "
                "first import of triton (torch._dynamo and torch.compile import it too)"
            )
        return None
    if device.type != "cuda":
        return (
            f"the Triton kernels run on CUDA tensors, not {device.type} (for tests on CPU, set TRITON_INTERPRET=1 "
            "before triton is imported to use Triton's interpreter)"
        )
    if torch.version.cuda is None or not torch.cuda.is_available():
        return "no CUDA device is available to this PyTorch build"
    if "triton" in sys.modules and _interpreter_active():
        return "triton was imported with TRITON_INTERPRET=1 and that variable has since been unset"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"the Triton kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+, got {capability}"
    return None


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A Philox seed as a one-element int64 tensor on ``device``, drawn from ``generator`` (no host sync)."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)


def split_targets(targets):
    """(labels_a, labels_b, soft_targets, lam) as the custom op takes them."""
    if targets is None:
        return None, None, None, 1.0
    if isinstance(targets, MixupTargets):
        return targets.y_a, targets.y_b, None, float(targets.lam)
    if targets.is_floating_point():
        return None, None, targets, 1.0
    return targets, None, None, 1.0


def fused_select(score, weight, indices, k, beta1, beta2, logits, targets, losses, label_smoothing, generator):
    """Backend entry point of ``evolved_select`` (arguments already checked by ``select.py``)."""
    from es_kernels import ops

    labels_a, labels_b, soft_targets, lam = split_targets(targets)
    seed = draw_seed(generator, indices.device)
    return ops.fused_select(
        score, weight, indices, seed, k, float(beta1), float(beta2),
        logits, labels_a, labels_b, soft_targets, lam, losses, float(label_smoothing),
    )  # fmt: skip


def prune_select(values, keep, generator):
    """Backend entry point of ``evolved_prune``: ``keep`` ascending ids drawn ∝ values."""
    from es_kernels import ops

    seed = draw_seed(generator, values.device)
    return ops.prune_select(values, seed, keep)
