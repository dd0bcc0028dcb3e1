"""Selection policies: every method is a set-level plan per epoch plus a batch-level choice per step.

The training helper, the sampler and the integrations talk to a :class:`SelectionPolicy` only, so none of them
branches on a method's name; ES and ESWP are policies like the others (:class:`EvolvedPolicy`):

- **set level** (:meth:`SelectionPolicy.epoch_size`, :meth:`SelectionPolicy.plan_epoch`): which ids an epoch keeps,
  with what per-sample loss weights, and by what factor the epoch scales the learning rate. ``epoch_size`` is a pure
  function of the epoch, so ``total_steps`` is exact before training starts and OneCycle never overruns. The
  sampler only shuffles and shards the plan.
- **batch level** (:attr:`SelectionPolicy.selects`, :meth:`SelectionPolicy.choose`): in selecting epochs, which
  rows of a scored meta-batch are back-propagated: ES's exponential race, or the k largest losses (Order); the
  other methods train every row and are never asked.
- **observation** (:meth:`SelectionPolicy.observe`): how the training forward's per-sample losses (and outputs)
  update the policy's per-sample quantities, which live in the :class:`~es_kernels.state.EvolvedState` as named
  buffers, so they are saved, resumed and merged across ranks exactly like ``s`` and ``w``.

``POLICIES`` maps each method name to a factory taking the method's settings as keyword arguments, e.g.
``POLICIES["infobatch"](prune_ratio=0.3)``. A new method is one class here registered in ``POLICIES``, plus its
tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import torch

from es_kernels import _checks
from es_kernels.select import evolved_prune, evolved_select
from es_kernels.state import EvolvedState

BATCH_CHOICES = ("race", "top_k")


def round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def as_written(fraction: float) -> Fraction:
    """The decimal the user wrote: in binary floating point 0.35 * 90 is 31.4999..., which rounds the wrong way."""
    return Fraction(repr(float(fraction)))


def annealing_epochs(num_epochs: int, fraction: float) -> int:
    """Epochs covered by an annealing fraction, rounded half up (5% of 10 epochs is 1 epoch, of 200 is 10)."""
    return round_half_up(as_written(fraction) * num_epochs)


def _check_open_fraction(name: str, value: object) -> float:
    """A float in (0, 1]."""
    value = _checks.check_fraction(name, value)
    if value == 0.0:
        raise ValueError(f"{name} must be in (0, 1], got 0.0")
    return value


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """One epoch's set-level plan (all ranks, before shuffling and sharding).

    ``ids``: the kept dataset ids (int64, CPU), exactly ``policy.epoch_size(epoch)`` of them. ``loss_weights``:
    per-sample loss weights of length n for this epoch (None: all 1). ``lr_scale``: the factor the epoch's learning
    rate is multiplied by (KAKURENBO's 1/(1-F)).
    """

    ids: torch.Tensor
    loss_weights: torch.Tensor | None = None
    lr_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class SamplePredictions:
    """Per-sample prediction quality, for models whose outputs are not one class distribution per sample.

    ``correct`` (B,) bool and ``confidence`` (B,) in [0, 1]; pass as ``observe(batch, losses, outputs=...)`` in
    place of (B, C) logits. The Hugging Face integration builds them for language models from token predictions.
    """

    correct: torch.Tensor
    confidence: torch.Tensor


class SelectionPolicy:
    """Base class: the plain baseline (every id every epoch, every row of every batch, no state).

    Subclasses override what differs. ``bind`` is called once by the training helper with the state, the run's
    length and its annealing, before any other method.
    """

    name = "baseline"
    selects = False  # whether selecting epochs score each meta-batch and ``choose`` its rows (ES, Order)
    prune_ratio = 0.0
    prune_by = "weight"  # which state buffer a set-level plan draws by (ES/ESWP may choose the score)
    # The ES state's EMA factors (the state is built with them); methods without the ES state leave the defaults.
    beta1 = 0.2
    beta2 = 0.9
    keeps_state = False  # whether the state moves during training (then ranks merge it each epoch)
    step_sync = False  # whether the state's updates can be shared every step (sync="step"): the ES state's only
    needs_outputs = False  # whether ``observe`` needs the model's outputs and the targets

    def __init__(self) -> None:
        self.num_samples = 0
        self.num_epochs = 0
        self.anneal_start_epochs = 0
        self.anneal_end_epochs = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({fields})"

    def settings(self) -> dict[str, object]:
        """The method's settings (for logs and checkpoints)."""
        return {}

    def buffers(self) -> dict[str, float]:
        """Extra per-sample buffers this policy keeps in the state, with their initial value."""
        return {}

    @property
    def observes_training_forward(self) -> bool:
        """Whether every step's training forward feeds ``observe`` (set-level methods): ES-family methods score
        in ``select`` instead, outside annealing epochs."""
        return self.keeps_state and not self.selects

    def bind(
        self, state: EvolvedState, num_epochs: int, *, anneal_start: float = 0.05, anneal_end: float = 0.05
    ) -> None:
        """Attach to ``state`` for a run of ``num_epochs``; ``anneal_start``/``anneal_end`` are the fractions of
        epochs at the start and end that neither select nor prune (the ES schedule; other methods ignore it)."""
        num_epochs = _checks.check_int("num_epochs", num_epochs, low=1)
        anneal_start = _checks.check_fraction("anneal_start", anneal_start)
        anneal_end = _checks.check_fraction("anneal_end", anneal_end)
        if anneal_start + anneal_end > 1.0:
            raise ValueError(f"anneal_start + anneal_end must be at most 1, got {anneal_start} + {anneal_end}")
        self.num_samples, self.num_epochs = state.num_samples, num_epochs
        self.anneal_start_epochs = annealing_epochs(num_epochs, anneal_start)
        self.anneal_end_epochs = annealing_epochs(num_epochs, anneal_end)
        for name, initial in self.buffers().items():
            state.register_sample_buffer(name, initial)

    def is_selecting(self, epoch: int) -> bool:
        """Whether ``epoch`` lies outside the annealing epochs (where ES selects, and ESWP prunes from epoch 1)."""
        return self.anneal_start_epochs <= epoch < self.num_epochs - self.anneal_end_epochs

    def plan_device(self, state: EvolvedState) -> torch.device:
        """Where the generator given to :meth:`plan_epoch` lives."""
        return torch.device("cpu")

    # ----------------------------------------------------------------- set level
    def epoch_size(self, epoch: int) -> int:
        """Ids in the plan of ``epoch`` (all ranks): a pure function of the epoch, so step counts are exact.

        The sampler asks for epochs from 1 only (with :meth:`plan_epoch`): it keeps epoch 0 whole for every plan,
        since nothing has been scored when its plan is drawn (:meth:`EvolvedSampler.may_prune`).
        """
        return self.num_samples

    def plan_epoch(self, state: EvolvedState, epoch: int, generator: torch.Generator) -> EpochPlan:
        """The plan of ``epoch`` from the state as it is at the epoch start (identical on every rank)."""
        return EpochPlan(torch.arange(self.num_samples))

    # ----------------------------------------------------------------- per step
    def choose(
        self, state: EvolvedState, indices: torch.Tensor, k: int, *, generator: torch.Generator, **scoring: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows of a scored meta-batch to back-propagate (ascending positions) and the per-row losses the
        state was updated with; asked in selecting epochs when :attr:`selects`. ``scoring`` holds the arguments of
        :func:`~es_kernels.evolved_select` (``logits``/``targets``/``label_smoothing`` or ``losses``, ``backend``,
        ``check_values``). The base class keeps every row and updates nothing."""
        return torch.arange(indices.numel(), device=indices.device), None

    def update(
        self,
        state: EvolvedState,
        indices: torch.Tensor,
        losses: torch.Tensor,
        outputs: Any = None,
        targets: Any = None,
        *,
        check_values: bool | str = True,
    ) -> None:
        """What the training helper calls with a trained batch's detached fp32 losses: checks them, hands them to
        :meth:`observe`, and records the rows as scored (:attr:`EvolvedState.scored`). A new method overrides
        :meth:`observe`, not this."""
        # Read on the host only where that costs no synchronisation (the policies keep their own buffers).
        immediate = _checks.check_mode(check_values, state.device) == _checks.IMMEDIATE
        losses = _checks.check_losses("losses", losses, indices.numel(), state.device, immediate)
        self.observe(state, indices, losses, outputs, targets)
        state.mark_scored(indices)  # one record of "scored" for every method

    def observe(
        self,
        state: EvolvedState,
        indices: torch.Tensor,
        losses: torch.Tensor,
        outputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> None:
        """Update the policy's per-sample quantities from the trained rows' detached fp32 losses."""


class EvolvedPolicy(SelectionPolicy):
    """ES and its relatives: the ES state (b1, b2), ESWP pruning by the ES weights, and a batch-level choice.

    ``es`` (race, r=0), ``eswp`` (race, r=0.2, b2=0.8), ``loss`` (race with b1=b2=0: loss-proportional sampling),
    ``order`` (top-k losses of each meta-batch).

    The plan: selecting epochs from 1 keep ``(1 - r) n`` ids (half up) drawn without replacement ∝ ``w`` (or ``s``,
    ``prune_by="score"``) from the state as it is when the plan is made; annealing epochs keep every id. No sample
    is pruned before it has been scored: a never-scored sample still holds its initial ``1/n`` against scored
    weights of the order of their losses, so pruned once it would practically never come back. Hence (besides
    epoch 0, which the sampler keeps whole for every plan) a pruning epoch keeps every sample the state has not
    scored yet (:attr:`EvolvedState.scored`) and draws the rest of its ids from the scored ones, with the same law.
    (Only when more samples are unscored than the epoch keeps, after an earlier epoch left many out, are the kept
    ones drawn among the unscored, ∝ their equal initial weights.)
    """

    keeps_state = True
    step_sync = True
    selects = True

    def __init__(
        self,
        name: str,
        *,
        beta1: float,
        beta2: float,
        prune_ratio: float = 0.0,
        batch_choice: str = "race",
        prune_by: str = "weight",
    ) -> None:
        super().__init__()
        self.name = name
        self.beta1 = _checks.check_fraction("beta1", beta1)
        self.beta2 = _checks.check_fraction("beta2", beta2)
        self.prune_ratio = _checks.check_fraction("prune_ratio", prune_ratio, upper_open=True)
        if batch_choice not in BATCH_CHOICES:
            raise ValueError(f"batch_choice must be 'race' or 'top_k', got {batch_choice!r}")
        self.batch_choice = batch_choice
        if prune_by not in ("weight", "score"):
            raise ValueError(f"prune_by must be 'weight' or 'score', got {prune_by!r}")
        self.prune_by = prune_by

    def settings(self) -> dict[str, object]:
        return {"beta1": self.beta1, "beta2": self.beta2, "prune_ratio": self.prune_ratio}

    @property
    def kept_samples(self) -> int:
        """Ids a pruning epoch keeps: ``(1 - r) n`` rounded half up."""
        return round_half_up((1 - as_written(self.prune_ratio)) * self.num_samples)

    def epoch_size(self, epoch: int) -> int:
        pruned = self.is_selecting(epoch) and self.prune_ratio > 0
        return self.kept_samples if pruned else self.num_samples

    def plan_device(self, state: EvolvedState) -> torch.device:
        return state.device  # evolved_prune draws on the state's device

    def plan_epoch(self, state: EvolvedState, epoch: int, generator: torch.Generator) -> EpochPlan:
        keep = self.epoch_size(epoch)
        if keep == self.num_samples:
            return EpochPlan(torch.arange(keep))
        draw = dict(by=self.prune_by, generator=generator)
        scored = state.scored
        unscored = (~scored).nonzero().squeeze(1)
        if unscored.numel() == 0:
            return EpochPlan(evolved_prune(state, keep, **draw).cpu())
        if unscored.numel() >= keep:
            return EpochPlan(evolved_prune(state, keep, among=unscored, **draw).cpu())
        drawn = evolved_prune(state, keep - unscored.numel(), among=scored.nonzero().squeeze(1), **draw)
        return EpochPlan(torch.cat([unscored, drawn]).sort().values.cpu())

    def choose(
        self, state: EvolvedState, indices: torch.Tensor, k: int, *, generator: torch.Generator, **scoring: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Order scores and updates exactly like the race (same op, same checks): the op draws all B rows, then the
        # k largest losses are kept.
        top_k = self.batch_choice == "top_k"
        draw = indices.numel() if top_k else k
        rows, losses = evolved_select(state, indices, draw, generator=generator, return_losses=True, **scoring)
        if top_k:
            # A stable sort, not topk: topk's order among equal losses is unspecified, and Order must be reproducible.
            rows = torch.sort(losses, descending=True, stable=True).indices[:k].sort().values
        return rows, losses

    def update(self, state, indices, losses, outputs=None, targets=None, *, check_values=True) -> None:
        state.observe(indices, losses, check_values=check_values)
        state.sync_step(indices, losses, check_values=False)  # no-op unless sync="step" across ranks


class _SetLevelPolicy(SelectionPolicy):
    """Set-level methods: the whole meta-batch is trained, and the training forward's losses are observed.

    Like every plan, theirs is not asked for epoch 0: the sampler keeps it whole, since no loss can rank a sample
    before it has been scored. A sample not observed since holds +inf in the policy's loss buffer, which ranks it
    last to be pruned (the ES plan likewise keeps its unscored samples).
    """

    keeps_state = True

    def _ranking(self, state: EvolvedState, key: torch.Tensor, *, descending: bool) -> torch.Tensor:
        # A stable sort over ids 0..n-1: equal keys keep ascending ids, so every rank and every resume agrees.
        return torch.sort(key.detach().cpu(), descending=descending, stable=True).indices


class InfoBatchPolicy(_SetLevelPolicy):
    """InfoBatch (Qin et al., ICLR 2024): prune a random fraction r of the well-learned samples, up-weight the rest.

    A sample's score is its latest training loss. In pruning epochs (from epoch 1 until the last ``1 - delta`` of the
    epochs, rounded half up, which keep everything; the sampler keeps epoch 0 whole) the candidates are the
    ``m = n // 2`` samples with the lowest scores (ties: lower id first); ``P = round(r * m)`` of them, drawn
    uniformly, are left out, and the kept candidates get loss weight ``m / (m - P)`` (= 1/(1-r) when r*m is whole), so
    the epoch's expected gradient is the full one. InfoBatch itself takes the samples below the *mean* score as
    candidates; their count depends on the losses, which would make the step count unknowable before training (see
    the README).
    """

    name = "infobatch"

    def __init__(self, prune_ratio: float = 0.5, delta: float = 0.875) -> None:
        super().__init__()
        self.prune_ratio = _checks.check_fraction("prune_ratio", prune_ratio, upper_open=True)
        self.delta = _check_open_fraction("delta", delta)

    def settings(self) -> dict[str, object]:
        return {"prune_ratio": self.prune_ratio, "delta": self.delta}

    def buffers(self) -> dict[str, float]:
        return {"infobatch_loss": math.inf}  # never seen: ranks above every loss, so never a candidate

    def _pruned(self) -> tuple[int, int]:
        candidates = self.num_samples // 2
        pruned = round_half_up(as_written(self.prune_ratio) * candidates)
        return candidates, min(pruned, max(candidates - 1, 0))  # at least one candidate stays to carry the weight

    def prunes(self, epoch: int) -> bool:
        full_epochs = round_half_up((1 - as_written(self.delta)) * self.num_epochs)
        return epoch < self.num_epochs - full_epochs

    def epoch_size(self, epoch: int) -> int:
        return self.num_samples - (self._pruned()[1] if self.prunes(epoch) else 0)

    def plan_epoch(self, state: EvolvedState, epoch: int, generator: torch.Generator) -> EpochPlan:
        candidates, pruned = self._pruned()
        if not self.prunes(epoch) or pruned == 0:
            return EpochPlan(torch.arange(self.num_samples))
        order = self._ranking(state, state.sample_buffer("infobatch_loss"), descending=False)
        lower = order[:candidates]
        left_out = lower[torch.randperm(candidates, generator=generator, device=generator.device).cpu()[:pruned]]
        keep = torch.ones(self.num_samples, dtype=torch.bool)
        keep[left_out] = False
        weights = torch.ones(self.num_samples, dtype=torch.float32)
        weights[lower] = candidates / (candidates - pruned)
        weights[left_out] = 0.0  # never trained this epoch; zero makes that visible
        return EpochPlan(keep.nonzero().squeeze(1), weights)

    def observe(self, state, indices, losses, outputs=None, targets=None) -> None:
        state.sample_buffer("infobatch_loss").index_copy_(0, indices, losses)


class KakurenboPolicy(_SetLevelPolicy):
    """KAKURENBO (Thao Nguyen et al., NeurIPS 2023): hide the easiest samples, keep the unsure ones.

    From epoch 1 (the sampler keeps epoch 0 whole), exactly ``q = round(r * n)`` samples are hidden: the lowest latest
    losses among the samples the model last predicted correctly with confidence (max softmax probability) at least
    ``tau``; samples predicted wrongly or less confidently are "moved back" (kept), and their hiding slots pass to the
    next-lowest eligible losses (if fewer than q are eligible, the remaining slots take the lowest-loss others). The
    epoch's learning rate is multiplied by ``1 / (1 - q/n)``. KAKURENBO lets the moved-back samples shrink the hidden
    fraction; a fixed count keeps the step count exact (see the README).
    """

    name = "kakurenbo"
    needs_outputs = True

    def __init__(self, prune_ratio: float = 0.3, confidence: float = 0.7) -> None:
        super().__init__()
        self.prune_ratio = _checks.check_fraction("prune_ratio", prune_ratio, upper_open=True)
        self.confidence = _check_open_fraction("confidence", confidence)

    def settings(self) -> dict[str, object]:
        return {"prune_ratio": self.prune_ratio, "confidence": self.confidence}

    def buffers(self) -> dict[str, float]:
        return {"kakurenbo_loss": math.inf, "kakurenbo_correct": 0.0, "kakurenbo_confidence": 0.0}

    def _hidden(self) -> int:
        return min(round_half_up(as_written(self.prune_ratio) * self.num_samples), self.num_samples - 1)

    def epoch_size(self, epoch: int) -> int:
        return self.num_samples - self._hidden()

    def plan_epoch(self, state: EvolvedState, epoch: int, generator: torch.Generator) -> EpochPlan:
        hidden = self._hidden()
        if hidden == 0:
            return EpochPlan(torch.arange(self.num_samples))
        loss = state.sample_buffer("kakurenbo_loss").detach().cpu()
        eligible = (state.sample_buffer("kakurenbo_correct").cpu() > 0) & (
            state.sample_buffer("kakurenbo_confidence").cpu() >= self.confidence
        )
        # Eligible samples first by loss, then the others by loss: one stable ranking, hide its head.
        by_loss = torch.sort(loss, stable=True).indices
        order = torch.cat([by_loss[eligible[by_loss]], by_loss[~eligible[by_loss]]])
        keep = torch.ones(self.num_samples, dtype=torch.bool)
        keep[order[:hidden]] = False
        return EpochPlan(keep.nonzero().squeeze(1), lr_scale=self.num_samples / (self.num_samples - hidden))

    def observe(self, state, indices, losses, outputs=None, targets=None) -> None:
        if isinstance(outputs, SamplePredictions):
            self._record(state, indices, losses, outputs.correct, outputs.confidence)
            return
        if outputs is None or targets is None:
            raise ValueError(
                "kakurenbo needs the model's outputs and the class targets: call "
                "training.observe(batch, losses, outputs=logits)"
            )
        targets = _checks.check_tensor("targets", targets)
        if targets.dtype.is_floating_point or targets.dim() != 1:
            raise TypeError("kakurenbo needs 1-D integer class targets (soft or mixed targets have no correctness)")
        with torch.no_grad():
            probabilities = torch.softmax(outputs.detach().float(), dim=1)
            confidence, predicted = probabilities.max(dim=1)
        self._record(state, indices, losses, predicted == targets.to(predicted.device), confidence)

    @staticmethod
    def _record(state, indices, losses, correct, confidence) -> None:
        if correct.shape != indices.shape or confidence.shape != indices.shape:
            raise ValueError(
                f"kakurenbo: correct and confidence must have shape {tuple(indices.shape)}, got "
                f"{tuple(correct.shape)} and {tuple(confidence.shape)}"
            )
        device = state.device
        with torch.no_grad():
            state.sample_buffer("kakurenbo_loss").index_copy_(0, indices, losses)
            state.sample_buffer("kakurenbo_correct").index_copy_(0, indices, correct.to(device, torch.float32))
            state.sample_buffer("kakurenbo_confidence").index_copy_(0, indices, confidence.detach().to(device).float())


class UCBPolicy(_SetLevelPolicy):
    """UCB (Raju et al. 2021): keep the samples with the largest upper confidence bound of the loss.

    A visit with loss l updates ``d = beta*d + (1-beta)*|l - m|`` then ``m = beta*m + (1-beta)*l`` (the first visit
    sets ``m = l, d = 0``). From epoch 1 (the sampler keeps epoch 0 whole), the ``round((1-r) n)`` samples with the
    largest ``m + c*d`` are kept (ties: lower id first); never-seen samples rank first.
    """

    name = "ucb"

    def __init__(self, prune_ratio: float = 0.3, beta: float = 0.8, c: float = 1.0) -> None:
        super().__init__()
        self.prune_ratio = _checks.check_fraction("prune_ratio", prune_ratio, upper_open=True)
        self.beta = _checks.check_fraction("beta", beta)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        self.c = float(c)

    def settings(self) -> dict[str, object]:
        return {"prune_ratio": self.prune_ratio, "beta": self.beta, "c": self.c}

    def buffers(self) -> dict[str, float]:
        return {"ucb_mean": math.inf, "ucb_deviation": 0.0}

    def epoch_size(self, epoch: int) -> int:
        return max(1, round_half_up((1 - as_written(self.prune_ratio)) * self.num_samples))

    def plan_epoch(self, state: EvolvedState, epoch: int, generator: torch.Generator) -> EpochPlan:
        size = self.epoch_size(epoch)
        if size == self.num_samples:
            return EpochPlan(torch.arange(self.num_samples))
        mean = state.sample_buffer("ucb_mean").detach().cpu()
        bound = mean + self.c * state.sample_buffer("ucb_deviation").detach().cpu()
        bound = torch.where(torch.isinf(mean), torch.inf, bound)
        kept = self._ranking(state, bound, descending=True)[:size]
        return EpochPlan(kept.sort().values)

    def observe(self, state, indices, losses, outputs=None, targets=None) -> None:
        mean, deviation = state.sample_buffer("ucb_mean"), state.sample_buffer("ucb_deviation")
        with torch.no_grad():
            old = mean.index_select(0, indices)
            first = torch.isinf(old)
            beta = self.beta
            new_deviation = beta * deviation.index_select(0, indices) + (1 - beta) * (losses - old).abs()
            new_mean = beta * old + (1 - beta) * losses
            deviation.index_copy_(0, indices, torch.where(first, torch.zeros_like(losses), new_deviation))
            mean.index_copy_(0, indices, torch.where(first, losses, new_mean))


def _evolved(name: str, beta1: float, beta2: float, prune_ratio: float, batch_choice: str = "race"):
    def make(
        *, beta1: float = beta1, beta2: float = beta2, prune_ratio: float = prune_ratio, prune_by: str = "weight"
    ) -> EvolvedPolicy:
        return EvolvedPolicy(
            name, beta1=beta1, beta2=beta2, prune_ratio=prune_ratio, batch_choice=batch_choice, prune_by=prune_by
        )

    return make


def _baseline(*, beta1: float = 0.2, beta2: float = 0.9) -> SelectionPolicy:
    # The baseline keeps no state; ES betas given for a whole comparison (--betas) are accepted and unused.
    policy = SelectionPolicy()
    policy.beta1 = _checks.check_fraction("beta1", beta1)
    policy.beta2 = _checks.check_fraction("beta2", beta2)
    return policy


# Paper defaults (docs/architecture.md §3, "Methods"; the paper's appendix D.7).
POLICIES: dict[str, Callable[..., SelectionPolicy]] = {
    "baseline": _baseline,
    "es": _evolved("es", 0.2, 0.9, 0.0),
    "eswp": _evolved("eswp", 0.2, 0.8, 0.2),
    "loss": _evolved("loss", 0.0, 0.0, 0.0),
    "order": _evolved("order", 0.0, 0.0, 0.0, batch_choice="top_k"),
    "infobatch": InfoBatchPolicy,
    "kakurenbo": KakurenboPolicy,
    "ucb": UCBPolicy,
}


def make_policy(
    method: str | SelectionPolicy, settings: Mapping[str, object] | None = None, **named: object
) -> SelectionPolicy:
    """A policy from a registry name and its settings, or a policy as given.

    ``named`` settings that are None mean "the method's default" (the helper's ``prune_ratio=None``); ``settings``
    holds any others by name (``{"delta": 0.9}`` for InfoBatch, ``{"confidence": 0.8}`` for KAKURENBO), so no
    method needs subclassing to be configured.
    """
    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping of setting names to values, got {type(settings).__name__}")
    extra = dict(settings or {})
    given = {k: v for k, v in named.items() if v is not None}
    if isinstance(method, SelectionPolicy):
        if given or extra:
            raise ValueError("pass the settings to the policy's constructor, not beside a policy object")
        return method
    if not isinstance(method, str) or method not in POLICIES:
        raise ValueError(f"method must be one of {sorted(POLICIES)} or a SelectionPolicy, got {method!r}")
    twice = sorted(set(given) & set(extra))
    if twice:
        raise ValueError(f"settings: {twice} also given as arguments; give each setting once")
    given.update(extra)
    try:
        return POLICIES[method](**given)
    except TypeError as error:
        raise TypeError(f"method {method!r} does not take {sorted(given)}: {error}") from None
