"""One ``evolved_select`` or ``sequence_losses`` call as every backend receives it: a frozen record built once,
after the checks.

``select.py`` checks the user's arguments (``_checks.py``), encodes the targets one way (below) and passes the
record to the chosen backend. The flat argument lists exist only at the boundaries that need them — the
``torch.library`` schemas of the Triton and C++ ops, Triton's argument builder, the C++ kernels — and
:data:`OP_ARGUMENTS` is their one definition: ``SelectCall.op_arguments`` produces it, and tests check each
boundary's names against it (``tests/test_ops.py``). Adding a field: docs/architecture.md, "Adding a field".

Target encoding (exactly one of):

* ``losses`` (B,) given per-sample losses, any float dtype; no logits, no labels;
* ``logits`` (B, C) with ``labels_a`` (B,) int64 class ids; ``labels_b`` and ``lam`` add the mixup form
  ``lam * CE(labels_a) + (1 - lam) * CE(labels_b)`` (without ``labels_b``, ``lam`` is 1);
* ``logits`` (B, C) with ``soft_targets`` (B, C), dense target weights;
* token level (``sequence_reduction`` set; only ``sequence_losses`` builds it): ``labels_a`` holds int64 (B, T)
  token targets (``ignore_index`` marks unscored positions) and either ``logits`` (B, T, V) or ``hidden_states``
  (B, T, D) with ``lm_head_weight`` (V, D) (``lm_head_bias``, ``logit_scale``, ``logit_softcap`` optional); the
  per-sample loss of a sequence is the mean or sum of its scored tokens' cross-entropies
  (``es_kernels/reference/sequence.py``).

``label_smoothing`` applies to the logits forms, as in ``torch.nn.functional.cross_entropy``.

A token-level call never reaches the fused ops: the backend's ``sequence_losses(call)`` gives the (B,) losses,
which the user passes to ``evolved_select(..., losses=...)``, a per-sample call. ``evolved_select`` itself takes no
token-level argument; the fields live here because the backends' sequence ops take the same record.
"""

from __future__ import annotations

import dataclasses

import torch

# The flat argument list of the fused op at every boundary, in order. ``seed`` is the one-element int64 tensor the
# wrappers draw from ``generator`` (a torch.Generator cannot cross a torch.library boundary).
OP_ARGUMENTS = (
    "score", "weight", "indices", "seed", "k", "beta1", "beta2",
    "logits", "labels_a", "labels_b", "soft_targets", "lam", "losses", "label_smoothing",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SelectCall:
    """Checked arguments of one fused select: the state, the meta-batch, one target encoding, the randomness."""

    score: torch.Tensor  # fp32 (n,), updated in place at ``indices``
    weight: torch.Tensor  # fp32 (n,), updated in place at ``indices``
    indices: torch.Tensor  # contiguous int64 (B,)
    k: int  # 1 <= k <= B
    beta1: float
    beta2: float
    logits: torch.Tensor | None = None
    labels_a: torch.Tensor | None = None  # int64 (B,); token level: int64 (B, T)
    labels_b: torch.Tensor | None = None  # int64 (B,), mixup only
    soft_targets: torch.Tensor | None = None  # float (B, C)
    lam: float = 1.0
    losses: torch.Tensor | None = None  # float (B,)
    label_smoothing: float = 0.0
    generator: torch.Generator | None = None
    # Value checks the backend runs itself, before any write (select.py decides; see its evolved_select):
    # ``check_inputs`` the input values (extension on CPU only), ``check_losses`` the losses computed from logits.
    check_inputs: bool = False
    check_losses: bool = False
    # Token-level targets (sequence losses of language models), set by ``sequence_losses`` only. None means "not
    # used". The fused ops take per-sample calls only: ``op_arguments`` refuses these fields (see ``with_losses``).
    ignore_index: int | None = None
    sequence_reduction: str | None = None
    hidden_states: torch.Tensor | None = None
    lm_head_weight: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None
    logit_scale: float | None = None
    logit_softcap: float | None = None

    @property
    def batch(self) -> int:
        return self.indices.numel()

    def token_fields_set(self) -> list[str]:
        """Names of the token-level fields this call sets (empty for every per-sample call)."""
        return [name for name in TOKEN_FIELDS if getattr(self, name) is not None]

    def refuse_token_fields(self, where: str) -> None:
        """Raise if the call sets a token-level field that ``where`` does not take (never ignore one silently)."""
        unsupported = self.token_fields_set()
        if unsupported:
            raise NotImplementedError(f"{where} do not take the token-level fields {unsupported}")

    @property
    def token_level(self) -> bool:
        return self.sequence_reduction is not None

    def with_losses(self, losses: torch.Tensor) -> SelectCall:
        """The same call with the given per-sample losses as its only target encoding (token fields cleared)."""
        cleared = dict.fromkeys(TOKEN_FIELDS)
        return dataclasses.replace(
            self, logits=None, labels_a=None, labels_b=None, soft_targets=None, lam=1.0, losses=losses, **cleared
        )

    def op_arguments(self, seed: torch.Tensor) -> tuple:
        """The call as the ops' flat argument list (:data:`OP_ARGUMENTS`), with ``seed`` drawn by the caller."""
        self.refuse_token_fields("the kernel ops")
        # Spelled out (in OP_ARGUMENTS' order, which tests/test_ops.py checks): this runs on every call's host path.
        return (
            self.score, self.weight, self.indices, seed, self.k, float(self.beta1), float(self.beta2), self.logits,
            self.labels_a, self.labels_b, self.soft_targets, self.lam, self.losses, self.label_smoothing,
        )  # fmt: skip


TOKEN_FIELDS = (
    "ignore_index", "sequence_reduction", "hidden_states", "lm_head_weight", "lm_head_bias", "logit_scale",
    "logit_softcap",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BackendCapabilities:
    """What ``select.py`` needs to know about a backend, read instead of its name: adding a backend means filling
    this record (docs/architecture.md, "Adding a backend"), not adding branches to ``select.py``.

    ``input_checks_on``: device types on which the backend's ``fused_select`` runs the immediate input value checks
    itself (``SelectCall.check_inputs``), before any write and with ``_checks.py``'s messages; elsewhere select.py
    runs them in Python first.

    ``computed_loss_check``: how immediate checks refuse losses that finite logits overflowed to inf, with the state
    as it was. ``"in_kernel"``: the fused op checks them between its loss and update passes
    (``SelectCall.check_losses``). ``"loss_pass"``: the module's ``call_losses(call)`` computes them without touching
    the state; select.py checks them and hands them back as given losses. ``"undo"``: the one fused launch computes,
    updates and draws together, so select.py keeps the B old values and writes them back if the losses are bad.

    ``labels_in_range``: the backend's loss computation indexes by label with ops that fault (or device-assert) on a
    label out of range, so deferred checks clamp the labels first (the call's update is kept out of the state anyway
    once the deferred check fails).
    """

    input_checks_on: frozenset[str] = frozenset()
    computed_loss_check: str = "undo"
    labels_in_range: bool = False

    def __post_init__(self) -> None:
        if self.computed_loss_check not in ("in_kernel", "loss_pass", "undo"):
            raise ValueError(
                f"computed_loss_check must be 'in_kernel', 'loss_pass' or 'undo', got {self.computed_loss_check!r}"
            )


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A Philox seed as a one-element int64 tensor on ``device``, drawn from ``generator`` (no host sync)."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
