"""Where the Triton kernels can run, and why not (imports neither ``triton`` nor the kernels: checking availability
must stay cheap and must not fix the interpreter mode of a process that has not decided it yet)."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import re
import sys

import torch

from es_kernels._build import env_flag

MIN_CAPABILITY = (8, 0)
# tl.histogram(..., mask=) arrived in Triton 3.4 (do_not_specialize_on_alignment in 3.1); torch >= 2.8 ships it.
MIN_TRITON = (3, 4)


def interpreter_requested() -> bool:
    """True if ``TRITON_INTERPRET`` asks for Triton's interpreter (read now, as Triton reads it)."""
    return env_flag("TRITON_INTERPRET", default=False)


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


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _distribution_version() -> str | None:
    # Parses the package's metadata file: once per process, not per call (it costs more than a small select).
    for distribution in ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-windows"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return None


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _installed_triton_version() -> str | None:
    version = _distribution_version()
    if version is not None:
        return version
    # A source build without distribution metadata: ask the module if it is loaded anyway.
    return getattr(sys.modules.get("triton"), "__version__", None)


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on tensors of ``device``, else why not."""
    device = torch.device(device)
    if not _triton_installed():
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
    capability = _capability(device.index)
    if capability < MIN_CAPABILITY:
        return f"the Triton kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+, got {capability}"
    return None
