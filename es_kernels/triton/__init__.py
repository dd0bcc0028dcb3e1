"""The Triton backend: one fused launch per ``evolved_select`` call, two per ``sequence_losses`` call (a language
model's step is both: three launches), and a key kernel for pruning.

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

from es_kernels.call import OP_ARGUMENTS, BackendCapabilities, SelectCall, draw_seed
from es_kernels.triton.availability import (
    MIN_CAPABILITY,
    MIN_TRITON,
    _interpreter_active,
    interpreter_requested,
    triton_version_problem,
    unavailable_reason,
)

# One launch computes, updates and draws: an overflowed loss is refused by writing the old values back. Labels
# out of range are masked loads, never a fault.
CAPABILITIES = BackendCapabilities(computed_loss_check="undo")

__all__ = [
    "CAPABILITIES",
    "MIN_CAPABILITY",
    "MIN_TRITON",
    "_interpreter_active",
    "draw_seed",
    "fused_select",
    "interpreter_requested",
    "prune_select",
    "sequence_losses",
    "triton_version_problem",
    "unavailable_reason",
]


def fused_select(call: SelectCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend entry of ``evolved_select``: one launch of the fused kernel.

    Traced by ``torch.compile``, the call goes through the ``es_kernels::fused_select`` op (its fake gives the
    shapes, ``mutates_args`` the functionalisation). In eager mode the op's Python dispatch (``custom_op`` costs
    hundreds of microseconds per call, more than the kernel) is skipped: the same host checks and launch run
    directly, and the state's version counters are bumped as the op's ``mutates_args`` would.
    """
    from es_kernels.triton import ops

    arguments = call.op_arguments(draw_seed(call.generator, call.indices.device))
    if torch.compiler.is_compiling():
        return ops.fused_select(*arguments)
    result = ops.launch_checked(dict(zip(OP_ARGUMENTS, arguments, strict=True)))
    torch.autograd.graph.increment_version(call.score)
    torch.autograd.graph.increment_version(call.weight)
    return result


def sequence_losses(call: SelectCall) -> torch.Tensor:
    """Backend entry of ``sequence_losses``: the per-sequence losses in two launches (the per-token
    kernel — over token logits, or the fused H @ W.T tile kernel — then the per-sequence reduction)."""
    from es_kernels.triton import ops

    if call.hidden_states is None:
        return ops.token_sequence_losses(
            call.logits, call.labels_a, call.ignore_index, call.sequence_reduction, call.label_smoothing
        )
    return ops.hidden_sequence_losses(
        call.hidden_states, call.lm_head_weight, call.lm_head_bias, call.labels_a, call.ignore_index,
        call.sequence_reduction, call.label_smoothing, call.logit_scale, call.logit_softcap,
    )  # fmt: skip


def prune_select(values: torch.Tensor, keep: int, generator: torch.Generator | None) -> torch.Tensor:
    """Backend entry of ``evolved_prune``: ``keep`` ascending ids drawn ∝ values."""
    from es_kernels.triton import ops

    return ops.prune_select(values, draw_seed(generator, values.device), keep)
