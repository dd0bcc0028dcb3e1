"""Which implementation runs an op: the Backend enum, availability with reasons, and the auto choice.

Every op has one implementation per backend with the same signature (see ``select.py``); this module only knows
whether each backend can run on a device and why not, and which one ``auto`` picks for each call form.

Availability is decided once per process for each (backend, device, ``TRITON_INTERPRET``): finding the Triton
package, reading its version from its metadata on disk and querying the device cost more than a small select's
kernels, so the call path does one dictionary look-up. :func:`forget_availability` drops the answers (tests that
fake an installation call it).
"""

from __future__ import annotations

import enum
import importlib
import os
from collections.abc import Callable

import torch

from es_kernels import _auto_table


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

# The call forms ``auto`` chooses for separately: their fastest backend differs (``_auto_table.py``).
CALL_FORMS = ("logits", "losses", "tokens", "hidden", "prune")

_BY_NAME = {backend.value: backend for backend in Backend}
_last_backend: Backend | None = None
# (backend value, device, TRITON_INTERPRET) -> reason or None; see the module docstring.
_availability: dict[tuple[str, torch.device, str | None], str | None] = {}


def parse_backend(backend: str | Backend) -> Backend:
    # A dictionary, not ``Backend(value)``: dynamo refuses to construct an Enum member inside a traced function.
    if isinstance(backend, Backend):
        return backend
    found = _BY_NAME.get(backend) if isinstance(backend, str) else None
    if found is None:
        names = ", ".join(repr(b.value) for b in Backend)
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    return found


def forget_availability() -> None:
    """Decide every backend's availability again at its next use (after an install changed, or in tests)."""
    _availability.clear()


def _cached_reason(backend: Backend, device: torch.device) -> str | None:
    key = (backend.value, device, os.environ.get("TRITON_INTERPRET"))
    try:
        return _availability[key]
    except KeyError:
        reason = _availability[key] = _REASONS[backend](device)
        return reason


def unavailable_reason(backend: str | Backend, device: torch.device | str) -> str | None:
    """None if ``backend`` can run on ``device``, else a sentence saying why not."""
    backend = parse_backend(backend)
    if backend is Backend.AUTO:
        return None
    return _REASONS[backend](torch.device(device))


def backend_status(device: torch.device | str = "cpu") -> dict[str, str]:
    """For each concrete backend: ``"available"`` or the reason it cannot run on ``device``."""
    return {b.value: (unavailable_reason(b, device) or "available") for b in Backend if b is not Backend.AUTO}


def auto_order(device_type: str, form: str) -> tuple[Backend, ...]:
    """The order in which ``auto`` tries the backends for one call form on one device type: fastest measured first
    (``_auto_table.py``, the reference included where it was measured), the reference last where it was not."""
    measured = tuple(_BY_NAME[name] for name in _auto_table.ORDER.get(device_type, {}).get(form, _auto_table.FALLBACK))
    return measured if Backend.TORCH in measured else (*measured, Backend.TORCH)


def resolve_backend(backend: str | Backend, device: torch.device, form: str = "logits") -> Backend:
    """The backend that will run a call of ``form`` (one of :data:`CALL_FORMS`): auto picks the first available
    in the measured order; a named one must run."""
    backend = parse_backend(backend)
    answer = _resolve_constant(backend.value, device, form)
    if answer.startswith("!"):
        raise BackendUnavailableError(answer[1:])
    return _BY_NAME[answer]


@torch.compiler.assume_constant_result
def _resolve_constant(backend: str, device: torch.device, form: str) -> str:
    """The chosen backend's value, or "!" and the error message.

    Availability checks import modules and read the environment, which torch.compile cannot trace: marked as a
    constant result, this runs once when a graph is traced and the choice is baked into the graph (a later change of
    availability does not recompile it). It returns plain strings, the kind of constant dynamo accepts. Every
    backend traces (the extension's and Triton's kernels are dispatcher ops with fake implementations), so the
    choice is the same compiled or eager.
    """
    chosen = _BY_NAME[backend]
    if chosen is Backend.AUTO:
        for candidate in auto_order(device.type, form):
            if _cached_reason(candidate, device) is None:
                return candidate.value
        return Backend.TORCH.value
    reason = _cached_reason(chosen, device)
    if reason is not None:
        return f"!backend={backend!r} cannot run on {device}: {reason}"
    return backend


def record_backend(backend: Backend) -> None:
    global _last_backend
    _last_backend = backend


def last_backend() -> str | None:
    """Name of the backend that ran the most recent op in this process (None before the first)."""
    return None if _last_backend is None else _last_backend.value
