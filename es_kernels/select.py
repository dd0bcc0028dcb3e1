"""The public ops ``evolved_select``, ``sequence_losses`` and ``evolved_prune``: argument checks, one call object,
backend dispatch.

This is the only module that chooses between implementations. After the checks (``_checks.py``) it builds one
:class:`~es_kernels.call.SelectCall` and hands it to the chosen backend module, each of which provides

* ``CAPABILITIES``, a :class:`~es_kernels.call.BackendCapabilities` saying which value checks it runs itself and
  how an overflowed loss is refused (this module reads the record, never the backend's name);
* ``fused_select(call)`` returning ``(positions, losses)``: fp32 per-sample losses (from logits, or the given
  ones), the state update at ``call.indices``, and k ascending positions drawn without replacement ∝ the updated
  weights;
* ``sequence_losses(call)`` returning the fp32 (B,) per-sequence losses of a token-level call (language models:
  token logits, or hidden states and the LM head): the public ``sequence_losses``, whose result a language model
  passes to ``evolved_select`` as ``losses=`` (one small op per step, as FlashInfer's sampling API);
* ``prune_select(values, keep, generator)`` returning ``keep`` ascending ids drawn without replacement ∝ values.

The backends: ``es_kernels.reference`` ("torch"), ``es_kernels.triton``, ``es_kernels.extension``. Arguments reach
them already checked: contiguous int64 indices, a 2-D logits tensor with matching targets (or contiguous,
fp32-convertible losses; or, for ``sequence_losses``, token logits or hidden states with (B, T) targets), and, when
value checks are on, finite logits and in-range targets (docs/architecture.md, "One call").
"""

from __future__ import annotations

from types import ModuleType

import torch

from es_kernels import _checks, reference
from es_kernels.backends import Backend, record_backend, resolve_backend
from es_kernels.call import BackendCapabilities, SelectCall
from es_kernels.reference import MixupTargets
from es_kernels.state import EvolvedState

Targets = torch.Tensor | MixupTargets | tuple


def _backend_module(backend: Backend) -> ModuleType:
    # Import statements, not importlib: torch.compile traces these (the modules are loaded by the availability
    # check already) but refuses importlib.import_module.
    if backend is Backend.TORCH:
        return reference
    if backend is Backend.TRITON:
        from es_kernels import triton as module

        return module
    if backend is Backend.EXTENSION:
        from es_kernels import extension as module

        return module
    raise ValueError(f"no backend module for {backend!r} (auto is resolved before a module is chosen)")


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
        targets: int64 labels (B,), dense soft targets (B, C), or the mixup form ``(y_a, y_b, lam)``.
        losses: (B,) per-sample losses of any task, instead of logits/targets. Language models pass the
            per-sequence losses of :func:`sequence_losses` here (token logits, or hidden states and the LM head)::

                losses = sequence_losses(labels[:, 1:], hidden_states=hidden[:, :-1], lm_head_weight=head.weight)
                rows = evolved_select(state, ids, k, losses=losses)

        label_smoothing: as in ``torch.nn.functional.cross_entropy``, in [0, 1].
        generator: source of the draw; ``None`` uses torch's default generator of the device (follows
            ``torch.manual_seed``). A given generator leaves the global RNG untouched.
        backend: ``"auto"``, ``"triton"``, ``"extension"`` or ``"torch"`` (the reference). A named backend that
            cannot run raises; ``es_kernels.last_backend()`` says which ran.
        return_losses: also return the fp32 per-sample losses (for logging).
        check_values: reject out-of-range ids, repeats, revisits within an epoch, NaN/inf or negative losses and
            bad labels. ``True`` (default): immediately on CPU; on a GPU (and inside ``torch.compile``) *deferred*:
            computed on the device without synchronising the host, the bad call's update kept out of the state, and
            the ``ValueError`` raised at the next point where the host reads anyway (a later call once the GPU is
            past the bad one, ``set_epoch``, ``state_dict``, ``state.check()``), naming the call. ``"immediate"``
            raises at the call itself (one host sync per call on a GPU, for debugging); ``"deferred"`` defers on
            CPU too. ``False`` skips them: bad values are then undefined behaviour but never an out-of-bounds
            write.

    Returns:
        int64 positions into the meta-batch (ascending, length k), and the losses if ``return_losses``.

    Raises ``TypeError``/``ValueError`` naming the bad argument; the state is unchanged when it raises (and, with
    deferred checks, by the call a deferred error names).
    """
    if not isinstance(state, EvolvedState):
        raise TypeError(f"state must be an EvolvedState, got {type(state).__name__}")
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        raise ValueError(_checks.TOKEN_LOGITS_TO_SEQUENCE_LOSSES)
    device = state.device
    mode = _checks.check_mode(check_values, device)
    chosen = resolve_backend(backend, device, "losses" if losses is not None else "logits")
    module = _backend_module(chosen)
    capabilities: BackendCapabilities = module.CAPABILITIES
    if mode != _checks.OFF:
        state.begin_call(counted=mode == _checks.IMMEDIATE)
    immediate, deferred = mode == _checks.IMMEDIATE, mode == _checks.DEFERRED
    # A backend that runs the immediate value checks in its own pass (same messages, before any write) is spared
    # them here: in Python they cost more than the whole kernel at small sizes.
    check_inputs = immediate and device.type in capabilities.input_checks_on
    check_here = immediate and not check_inputs
    indices = _checks.check_indices("indices", indices, state.num_samples, device, check_here)
    batch = indices.numel()
    k = _checks.check_int("k", k, low=1, high=batch)
    label_smoothing = _checks.check_fraction("label_smoothing", label_smoothing)
    generator = _checks.check_generator(generator, device)
    if generator is not None and torch.compiler.is_compiling():
        raise TypeError(_checks.GENERATOR_UNDER_COMPILE)
    labels_a = labels_b = soft_targets = None
    lam = 1.0
    if losses is not None:
        if logits is not None or targets is not None:
            raise ValueError("pass either losses, or logits with targets, not both")
        losses = _checks.check_losses("losses", losses, batch, device, check_here).detach()
    else:
        if logits is None or targets is None:
            raise ValueError("pass logits together with targets (or per-sample losses)")
        logits = _checks.check_logits(logits, batch, device, check_here).detach()
        labels_a, labels_b, soft_targets, lam = _checks.check_targets(targets, logits, device, check_here)
        if soft_targets is not None:
            soft_targets = soft_targets.detach()
    if immediate:
        state.check_unvisited(indices)  # a sample updated twice in one epoch (once an epoch was begun)
    guard = None
    if deferred:
        classes = 0 if logits is None else logits.shape[1]
        guard = state.guard(
            indices, losses=losses, labels_a=labels_a, labels_b=labels_b, soft_targets=soft_targets, classes=classes
        )
        # Bad ids or labels must not reach a kernel as they are: the clamped ids' old values are restored if a
        # check failed, and a backend whose indexing ops fault on labels out of range gets them clamped.
        indices = guard.safe_ids
        if capabilities.labels_in_range:
            labels_a, labels_b = _clamped(labels_a, classes), _clamped(labels_b, classes)
    computed_loss_check = capabilities.computed_loss_check
    call = SelectCall(
        score=state.score, weight=state.weight, indices=indices, k=k, beta1=state.beta1, beta2=state.beta2,
        logits=logits, labels_a=labels_a, labels_b=labels_b, soft_targets=soft_targets, lam=lam, losses=losses,
        label_smoothing=label_smoothing, generator=generator, check_inputs=check_inputs,
        # Finite logits can still overflow to an infinite loss: how each backend lets that be refused with the state
        # as it was is its ``computed_loss_check`` (call.BackendCapabilities).
        check_losses=immediate and losses is None and computed_loss_check == "in_kernel",
    )  # fmt: skip
    with torch.no_grad():
        if immediate and losses is None and computed_loss_check == "loss_pass":
            computed = module.call_losses(call)
            _checks.check_loss_values(_checks.COMPUTED_LOSSES, computed)
            call = call.with_losses(computed)
        undo = None
        if immediate and call.losses is None and computed_loss_check == "undo":
            undo = state.score[indices], state.weight[indices]
        positions, batch_losses = module.fused_select(call)
        if undo is not None:
            try:
                _checks.check_loss_values(_checks.COMPUTED_LOSSES, batch_losses)
            except ValueError:
                state.score.index_copy_(0, indices, undo[0])
                state.weight.index_copy_(0, indices, undo[1])
                raise
        if deferred:
            state.settle(guard, batch_losses if losses is None else None, classes)
    if not deferred:
        state.mark_visited(indices)
    record_backend(chosen)
    return (positions, batch_losses) if return_losses else positions


def _clamped(labels: torch.Tensor | None, classes: int, ignore_index: int | None = None) -> torch.Tensor | None:
    """Labels moved into [0, classes) (token targets: those not ``ignore_index``), under deferred checks, for a
    backend whose label indexing faults on labels out of range (``BackendCapabilities.labels_in_range``)."""
    if labels is None:
        return None
    inside = labels.clamp(0, classes - 1)
    return inside if ignore_index is None else torch.where(labels == ignore_index, labels, inside)


def sequence_losses(
    targets: torch.Tensor,
    *,
    logits: torch.Tensor | None = None,
    hidden_states: torch.Tensor | None = None,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    sequence_reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    backend: str | Backend = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    """Per-sequence losses of a language model's batch, with no state: fp32 (B,) losses of token ``logits``
    (B, T, V), or of ``hidden_states`` (B, T, D) through the LM head without ever holding the (B·T, V) logits.
    Pass them to :func:`evolved_select` as ``losses=``; the two together are the language-model form::

        losses = sequence_losses(labels[:, 1:], hidden_states=hidden[:, :-1], lm_head_weight=head.weight)
        rows = evolved_select(state, ids, k, losses=losses)

    Args:
        targets: int64 (B, T) token targets (e.g. ``labels[:, 1:]``), ``ignore_index`` where a token is not scored.
        logits: (B, T, V) token logits of any float dtype and strides (e.g. ``logits[:, :-1]``).
        hidden_states, lm_head_weight, lm_head_bias: instead of logits, the backbone's last hidden state (B, T, D)
            and the LM head (V, D) (bias (V,) optional): the losses of ``H @ W.T + bias`` computed chunk by chunk
            over the vocabulary.
        ignore_index: token targets equal to it are not scored.
        sequence_reduction: a sequence's loss is the ``"mean"`` or ``"sum"`` of its scored tokens' cross-entropies
            (0 for a sequence without one).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``, in [0, 1], per token.
        logit_scale, logit_softcap: with hidden states, logits are ``z * logit_scale``, then ``c * tanh(z / c)``
            with ``c = logit_softcap`` if given (Gemma).
        backend: as for :func:`evolved_select`.
        check_values: as for :func:`evolved_select`. Immediate checks raise here (targets out of range, NaN/inf
            inputs). Deferred ones read nothing on the host: a sequence with a target out of range gets a NaN loss
            instead (no kernel ever sees the bad target), which ``evolved_select(losses=...)`` then refuses with
            its deferred error. ``False`` reads and changes nothing.

    Raises ``TypeError``/``ValueError`` naming the bad argument.
    """
    source = hidden_states if hidden_states is not None else logits
    name = "hidden_states" if hidden_states is not None else "logits"
    device = _checks.check_tensor(name, source).device
    chosen = resolve_backend(backend, device, "hidden" if hidden_states is not None else "tokens")
    module = _backend_module(chosen)
    label_smoothing = _checks.check_fraction("label_smoothing", label_smoothing)
    mode = _checks.check_mode(check_values, device)
    fields = _checks.check_sequence_call(
        device, mode == _checks.IMMEDIATE, logits=logits, targets=targets, hidden_states=hidden_states,
        lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias, ignore_index=ignore_index,
        sequence_reduction=sequence_reduction, label_smoothing=label_smoothing, logit_scale=logit_scale,
        logit_softcap=logit_softcap,
    )  # fmt: skip
    bad_rows = None
    if mode == _checks.DEFERRED:
        # No state here to hold a deferred error: a sequence with a target out of range is flagged on the device
        # and its loss made NaN, which the evolved_select(losses=...) that follows refuses under its own deferred
        # checks. A backend whose indexing faults on such a target must not see it at all.
        vocab = _vocabulary(fields)
        bad_tokens = reference.sequence.token_targets_outside(fields["labels_a"], vocab, fields["ignore_index"])
        bad_rows = bad_tokens.any(dim=1)
        if module.CAPABILITIES.labels_in_range:
            fields["labels_a"] = _clamped(fields["labels_a"], vocab, fields["ignore_index"])
    unused = torch.empty(0, device=device)
    call = SelectCall(
        score=unused, weight=unused, indices=torch.arange(source.shape[0], device=device), k=1, beta1=0.0,
        beta2=0.0, label_smoothing=label_smoothing, **fields,
    )  # fmt: skip
    with torch.no_grad():
        losses = module.sequence_losses(call)
        if bad_rows is not None:
            losses = torch.where(bad_rows, torch.full_like(losses, float("nan")), losses)
    record_backend(chosen)
    return losses


def _vocabulary(fields: dict) -> int:
    """V of a checked token-level call: the token logits' last size, or the LM head's rows."""
    if fields.get("lm_head_weight") is not None:
        return fields["lm_head_weight"].shape[0]
    return fields["logits"].shape[2]


def evolved_prune(
    state: EvolvedState,
    keep: int,
    *,
    by: str = "weight",
    generator: torch.Generator | None = None,
    backend: str | Backend = "auto",
    among: torch.Tensor | None = None,
) -> torch.Tensor:
    """ESWP's set-level draw: ``keep`` sample ids (ascending, int64) without replacement ∝ ``w`` (or ``s``).

    ``among``: ascending int64 sample ids on the state's device to draw from (default: every sample); the law over
    them is the same successive sampling ∝ their values. Works for any n (no ``torch.multinomial``, which refuses
    more than 2**24 categories).
    """
    if not isinstance(state, EvolvedState):
        raise TypeError(f"state must be an EvolvedState, got {type(state).__name__}")
    if among is not None:
        among = _checks.check_tensor("among", among)
        if among.dtype != torch.int64 or among.dim() != 1 or among.device != state.device:
            raise ValueError(f"among must be 1-D int64 sample ids on {state.device}")
        inside = among.numel() == 0 or (int(among[0]) >= 0 and int(among[-1]) < state.num_samples)
        if not inside or bool((among[1:] <= among[:-1]).any()):
            raise ValueError(f"among must hold ascending, distinct sample ids in [0, {state.num_samples})")
    pool = state.num_samples if among is None else among.numel()
    keep = _checks.check_int("keep", keep, low=0, high=pool)
    if by not in ("weight", "score"):
        raise ValueError(f"by must be 'weight' or 'score', got {by!r}")
    generator = _checks.check_generator(generator, state.device)
    chosen = resolve_backend(backend, state.device, "prune")
    state.check()
    values = state.weight if by == "weight" else state.score
    with torch.no_grad():
        if among is not None:
            values = values.index_select(0, among)
        kept = _backend_module(chosen).prune_select(values, keep, generator)
        if among is not None:
            kept = among.index_select(0, kept)  # ascending positions of an ascending list: ascending ids
    record_backend(chosen)
    return kept
