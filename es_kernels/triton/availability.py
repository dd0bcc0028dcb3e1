"""Where the Triton kernels can run, and why not (imports neither ``triton`` nor the kernels: checking availability
must stay cheap and must not fix the interpreter mode of a process that has not decided it yet)."""

from __future__ import annotations

import importlib.util
import sys

import torch

from es_kernels._build import env_flag

MIN_CAPABILITY = (8, 0)


def interpreter_requested() -> bool:
    """True if ``TRITON_INTERPRET`` asks for Triton's interpreter (read now, as Triton reads it)."""
    return env_flag("TRITON_INTERPRET", default=False)


def _interpreter_active() -> bool:
    # Triton decides at decoration time; its own library functions show which mode this process got.
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.randint, InterpretedFunction)


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on tensors of ``device``, else why not."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
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
