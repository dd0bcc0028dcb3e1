"""Which implementation runs an op: the Backend enum, availability with reasons, and the auto choice.

Every op has one implementation per backend with the same signature (see ``select.py``); this module only knows
whether each backend can run on a device and why not.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable

import torch


class Backend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    EXTENSION = "extension"
    TORCH = "torch"


class BackendUnavailableError(RuntimeError):
    """A backend the user named explicitly cannot run here; the message says why."""


def _module_reason(name: str) -> Callable[[torch.device], str | None]:
    """The reason of a backend module, imported only when asked (it may import triton or load the extension)."""

    def reason(device: torch.device) -> str | None:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            return f"{name} cannot be imported ({error})"
        return module.unavailable_reason(device)

    return reason


_REASONS: dict[Backend, Callable[[torch.device], str | None]] = {
    Backend.TRITON: _module_reason("es_kernels.triton"),
    Backend.EXTENSION: _module_reason("es_kernels.extension"),
    Backend.TORCH: lambda device: None,
}

# Preference order of the auto choice per device type; the reference always closes the list.
_AUTO_ORDER = {
    "cuda": (Backend.TRITON, Backend.EXTENSION, Backend.TORCH),
    "cpu": (Backend.EXTENSION, Backend.TORCH),
}

_last_backend: Backend | None = None


def parse_backend(backend: str | Backend) -> Backend:
    try:
        return Backend(backend)
    except ValueError:
        names = ", ".join(repr(b.value) for b in Backend)
        raise ValueError(f"backend must be one of {names}, got {backend!r}") from None


def unavailable_reason(backend: str | Backend, device: torch.device | str) -> str | None:
    """None if ``backend`` can run on ``device``, else a sentence saying why not."""
    backend = parse_backend(backend)
    if backend is Backend.AUTO:
        return None
    return _REASONS[backend](torch.device(device))


def backend_status(device: torch.device | str = "cpu") -> dict[str, str]:
    """For each concrete backend: ``"available"`` or the reason it cannot run on ``device``."""
    return {b.value: (unavailable_reason(b, device) or "available") for b in Backend if b is not Backend.AUTO}


def resolve_backend(backend: str | Backend, device: torch.device) -> Backend:
    """The backend that will run: auto picks the first available in the device's order; a named one must run."""
    backend = parse_backend(backend)
    answer = _resolve_constant(backend.value, device)
    if answer.startswith("!"):
        raise BackendUnavailableError(answer[1:])
    return Backend(answer)


@torch.compiler.assume_constant_result
def _resolve_constant(backend: str, device: torch.device) -> str:
    """The chosen backend's value, or "!" and the error message.

    Availability checks import modules and read the environment, which torch.compile cannot trace: marked as a
    constant result, this runs once when a graph is traced and the choice is baked into the graph (a later change of
    availability does not recompile it). It returns plain strings, the kind of constant dynamo accepts. Every
    backend traces (the extension's and Triton's kernels are dispatcher ops with fake implementations), so the
    choice is the same compiled or eager.
    """
    backend = Backend(backend)
    if backend is Backend.AUTO:
        for candidate in _AUTO_ORDER.get(device.type, (Backend.TORCH,)):
            if unavailable_reason(candidate, device) is None:
                return candidate.value
        return Backend.TORCH.value
    reason = unavailable_reason(backend, device)
    if reason is not None:
        return f"!backend={backend.value!r} cannot run on {device}: {reason}"
    return backend.value


def record_backend(backend: Backend) -> None:
    global _last_backend
    _last_backend = backend


def last_backend() -> str | None:
    """Name of the backend that ran the most recent op in this process (None before the first)."""
    return None if _last_backend is None else _last_backend.value
