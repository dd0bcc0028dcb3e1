"""The Triton backend: one fused launch per ``evolved_select`` call, and a key kernel for pruning.

Where it runs:

* CUDA tensors on an sm_80+ GPU with ``triton`` importable (the real use);
* CPU tensors when Triton's interpreter is on, i.e. ``TRITON_INTERPRET=1`` was in the environment *before*
  ``triton`` was first imported in the process (``torch._dynamo``/``torch.compile`` import it too). That mode exists
  for tests on machines without a GPU; it runs every program one after another in numpy and is slow.

Both entry points draw a fresh Philox seed from the caller's generator (or the device's default generator) into a
one-element device tensor, so a CUDA graph that captured the call replays with new randomness, and then call the
``es_kernels::`` custom ops of :mod:`es_kernels.triton.ops`, whose kernels launch the Triton code.

This module imports neither ``triton`` nor the kernels at import time: checking availability must stay cheap and
must not fix the interpreter mode of a process that has not decided it yet.
"""

from __future__ import annotations

import torch

from es_kernels.call import SelectCall, draw_seed
from es_kernels.triton.availability import (
    MIN_CAPABILITY,
    MIN_TRITON,
    _interpreter_active,
    interpreter_requested,
    triton_version_problem,
    unavailable_reason,
)

__all__ = [
    "MIN_CAPABILITY",
    "MIN_TRITON",
    "_interpreter_active",
    "draw_seed",
    "fused_select",
    "interpreter_requested",
    "prune_select",
    "triton_version_problem",
    "unavailable_reason",
]


def fused_select(call: SelectCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend entry of ``evolved_select``: one launch of the ``es_kernels::fused_select`` op."""
    from es_kernels.triton import ops

    seed = draw_seed(call.generator, call.indices.device)
    return ops.fused_select(*call.op_arguments(seed))


def prune_select(values: torch.Tensor, keep: int, generator: torch.Generator | None) -> torch.Tensor:
    """Backend entry of ``evolved_prune``: ``keep`` ascending ids drawn ∝ values."""
    from es_kernels.triton import ops

    return ops.prune_select(values, draw_seed(generator, values.device), keep)
