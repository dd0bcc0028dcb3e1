"""The reference pipeline of one call: per-sample losses, then the state update, then the race. The torch backend
is this function; every other backend must reproduce its state bit for bit and its draw in law."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from es_kernels.reference.losses import MixupTargets, per_sample_cross_entropy
from es_kernels.reference.sampling import race_select
from es_kernels.reference.sequence import hidden_sequence_losses, token_sequence_losses
from es_kernels.reference.update import ema_update_

if TYPE_CHECKING:
    from es_kernels.call import SelectCall


def call_losses(call: SelectCall) -> torch.Tensor:
    """fp32 per-sample losses of the call's target encoding (docs/architecture.md, "Exact semantics")."""
    if call.token_level:
        return sequence_losses(call)
    call.refuse_token_fields("per-sample calls (sequence_reduction unset)")
    if call.losses is not None:
        return call.losses.to(torch.float32)
    if call.soft_targets is not None:
        targets = call.soft_targets
    elif call.labels_b is not None:
        targets = MixupTargets(call.labels_a, call.labels_b, call.lam)
    else:
        targets = call.labels_a
    return per_sample_cross_entropy(call.logits, targets, call.label_smoothing)


def sequence_losses(call: SelectCall) -> torch.Tensor:
    """fp32 (B,) per-sequence losses of a token-level call: chunked over the vocabulary, never the whole logits.
    The call's values were checked by select.py (or deliberately not), so nothing here reads one."""
    if call.hidden_states is None:
        return token_sequence_losses(
            call.logits, call.labels_a, call.ignore_index, call.sequence_reduction, call.label_smoothing,
            check_values=False,
        )  # fmt: skip
    return hidden_sequence_losses(
        call.hidden_states, call.lm_head_weight, call.lm_head_bias, call.labels_a, call.ignore_index,
        call.sequence_reduction, call.label_smoothing, call.logit_scale, call.logit_softcap, check_values=False,
    )  # fmt: skip


def fused_select(call: SelectCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(k ascending positions, fp32 losses): losses, ``w`` then ``s`` updated at the ids, the race over the new w."""
    losses = call_losses(call)
    ema_update_(call.score, call.weight, call.indices, losses, call.beta1, call.beta2)
    return race_select(call.weight[call.indices], call.k, call.generator), losses
