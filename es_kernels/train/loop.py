"""EvolvedTraining: turns a plain PyTorch loop into any method of METHODS: six added lines, four changed.

    training = EvolvedTraining("es", num_samples=len(dataset), num_epochs=E, device="cuda")  # any METHODS name
    loader = DataLoader(IndexedDataset(dataset), batch_size=B, sampler=training.sampler)
    for epoch in range(E):
        training.set_epoch(epoch)
        for indices, inputs, targets in loader:
            batch = training.select(model, indices, inputs, targets)      # scoring forward + draw of k rows
            logits = model(batch.inputs)
            losses = F.cross_entropy(logits, batch.targets, reduction="none")
            loss = training.observe(batch, losses, outputs=logits)       # weighted as the method's plan says
            loss.backward()
            with training.scaled_lr(optimizer):                          # the plan's learning-rate factor
                optimizer.step()
            optimizer.zero_grad()

Against a plain loop: added are the import, ``training = ...``, ``set_epoch``, ``select``, ``observe`` and the
``with`` around the step; changed are the DataLoader (``sampler=``), the scheduler's step count, the ``for`` line
(ids first) and the training forward (``batch.inputs``/``batch.targets``, ``reduction="none"``). The same loop trains
every method; one that leaves out what the named method needs (the weighted loss, the scaled step, ``outputs=``,
``observe``) raises, saying what to write, instead of training another method.

Apply batch-mixing augmentation (mixup, cutmix) to ``batch.inputs``/``batch.targets`` *after* ``select``: scores
must belong to the original samples. Then also pass ``score_annealing=True``: in annealing epochs ``observe``
would otherwise feed the state the training forward's losses, which with batch mixing are losses of mixtures, not
of samples; with it, ``select`` scores the unmixed rows in annealing epochs too (one no-grad forward per step) and
``observe`` does nothing there.

Misuse is loud: iterating an epoch again without ``set_epoch`` raises, updating a sample twice in one epoch raises
(naming the ids), ``observe`` checks its losses' shape in every epoch, and a loop whose steps disagree with
``total_steps`` (or a scheduler that does, via :meth:`EvolvedTraining.check_scheduler`) gets a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from es_kernels import _checks, seeds
from es_kernels.policies import POLICIES, SelectionPolicy, as_written, make_policy, round_half_up
from es_kernels.sampler import EvolvedSampler
from es_kernels.state import EvolvedState

# The method registry: name -> policy factory (es_kernels.policies). Kept under its old name for the integrations.
METHODS = POLICIES

SCORING_MODES = ("eval", "train")


@dataclasses.dataclass
class SelectedBatch:
    """The rows to train on. ``indices`` are their dataset ids on the state's device."""

    indices: torch.Tensor
    inputs: Any
    targets: Any
    scored: bool  # the state already saw these rows' losses (selecting step): observe() does nothing
    # Per-row loss weights of the epoch's plan (InfoBatch), None when every row weighs 1: see ``mean_loss``.
    loss_weights: torch.Tensor | None = None
    # Set by autograd once something built by ``weigh`` was back-propagated: the helper reads it at the next step, so
    # a loop that back-propagates its own unweighted mean (training another method than the one named) is caught.
    weighted_backward: bool = dataclasses.field(default=False, repr=False, compare=False)

    def weigh(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (B,), each row multiplied by its plan weight (unchanged when every row weighs 1).

        For a loop that reduces the loss its own way (a sum over tokens, a DDP-safe mean): build the back-propagated
        loss from this, or the helper raises at the next step in epochs whose plan weights rows.
        """
        if self.loss_weights is None:
            return values
        weighted = values * self.loss_weights.to(values.device, values.dtype)
        if weighted.requires_grad:
            weighted.register_hook(self._mark_weighted_backward)
        return weighted

    def _mark_weighted_backward(self, grad: torch.Tensor) -> None:
        self.weighted_backward = True

    def mean_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: the mean of ``losses`` (B,), each row weighted by the plan's weight (what
        :meth:`EvolvedTraining.observe` returns)."""
        return self.weigh(losses).mean()


def _lr_check_hook(training_ref: weakref.ref) -> Callable:
    # A closure over a weak reference: a global hook must not keep a finished run (and its state) alive.
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        training = training_ref()
        if training is not None:
            training._check_optimizer_step(optimizer)

    return hook


def take_rows(value: Any, rows: torch.Tensor) -> Any:
    """Rows ``rows`` of a tensor, or of every tensor in a (nested) tuple, list or dict.

    Plain numbers pass through unchanged: they belong to the whole batch (the ``lam`` of mixup-form targets).
    """
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(item, rows) for item in value)
    if isinstance(value, dict):
        return {key: take_rows(item, rows) for key, item in value.items()}
    raise TypeError(f"cannot take rows of a {type(value).__name__}; pass tensors, tuples, lists or dicts of them")


class EvolvedTraining:
    """State, epoch plan and per-step selection of one training run.

    Args:
        method: a name from :data:`METHODS` (``"baseline"``, ``"es"``, ``"eswp"``, ``"loss"``, ``"order"``,
            ``"infobatch"``, ``"kakurenbo"``, ``"ucb"``) with the paper's defaults, or a
            :class:`~es_kernels.policies.SelectionPolicy` built with other settings. Set-level methods weight the
            loss (back-propagate what ``observe`` returns), scale the learning rate (step inside
            ``training.scaled_lr(optimizer)``) and, for KAKURENBO, need ``observe(batch, losses, outputs=logits)``;
            a loop that leaves one out raises.
        num_samples: training-set size n.
        num_epochs: total epochs E.
        select_ratio: k/B, the fraction of each meta-batch back-propagated (paper: 0.25).
        prune_ratio, beta1, beta2: override the method's defaults (ES: r=0, (0.2, 0.9); ESWP: r=0.2, (0.2, 0.8);
            InfoBatch r=0.5, KAKURENBO and UCB r=0.3); a method raises on settings it does not take.
        settings: the method's other settings by name, e.g. ``{"delta": 0.9}`` (InfoBatch), ``{"confidence": 0.8}``
            (KAKURENBO), ``{"beta": 0.7, "c": 2.0}`` (UCB), ``{"prune_by": "score"}`` (ES family).
        anneal_start, anneal_end: fractions of epochs without selection at the start and end (paper: 5% each).
        label_smoothing: used when ``select`` computes cross-entropy from logits.
        scoring_mode: ``"eval"`` (default: BatchNorm statistics frozen, dropout off during scoring) or ``"train"``;
            the model's own mode is restored after the scoring forward.
        seed: seeds pruning, shuffling and selection; same seed, same run.
        device: where the state lives (where the model's outputs are).
        num_replicas, rank: data-parallel layout (default: from torch.distributed).
        backend: ``evolved_select`` backend.
        sync, process_group: how ranks keep one state (see :class:`EvolvedState`): ``"epoch"`` merges at each
            ``set_epoch``, ``"step"`` shares every step's ids and losses; nothing to call beyond ``torchrun``.
        check_values: validate ids, labels and losses every step, as :func:`~es_kernels.evolved_select` does
            (deferred on a GPU: no host synchronisation); ``False`` once a run is known to be sound.
        score_annealing: also run the scoring forward in annealing epochs (ES/ESWP), so the state is updated from
            the unmixed rows' losses and :meth:`observe` does nothing there. Needed when the training forward does
            not see the original samples (mixup, cutmix): its losses belong to mixtures, and fed to ``observe``
            they would score sample i by a blend of i and another row. Costs one no-grad forward of the meta-batch
            per annealing step (5% + 5% of the epochs by default). Off: ``observe`` takes the training forward's
            losses (no extra forward), which is exact only without batch mixing.
    """

    def __init__(
        self,
        method: str | SelectionPolicy,
        num_samples: int,
        num_epochs: int,
        *,
        select_ratio: float = 0.25,
        prune_ratio: float | None = None,
        beta1: float | None = None,
        beta2: float | None = None,
        settings: Mapping[str, object] | None = None,
        anneal_start: float = 0.05,
        anneal_end: float = 0.05,
        label_smoothing: float = 0.0,
        scoring_mode: str = "eval",
        seed: int = 0,
        device: torch.device | str | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        backend: str = "auto",
        sync: str = "epoch",
        process_group: torch.distributed.ProcessGroup | None = None,
        check_values: bool | str = True,
        score_annealing: bool = False,
    ) -> None:
        policy = make_policy(method, settings, prune_ratio=prune_ratio, beta1=beta1, beta2=beta2)
        if sync == "step" and policy.keeps_state and not policy.step_sync:
            raise ValueError(f"sync='step' shares ES updates only; use sync='epoch' with {policy.name!r}")
        self.policy = policy
        self.method = policy.name
        self.selects = policy.selects
        _checks.check_mode(check_values, torch.device("cpu"))  # refuses a bad value now, not at the first step
        self.check_values = check_values
        self.score_annealing = bool(score_annealing)
        self.select_ratio = _checks.check_fraction("select_ratio", select_ratio)
        if self.select_ratio == 0.0:
            raise ValueError("select_ratio must be in (0, 1], got 0.0")
        if scoring_mode not in SCORING_MODES:
            raise ValueError(f"scoring_mode must be one of {SCORING_MODES}, got {scoring_mode!r}")
        self.scoring_mode = scoring_mode
        self.label_smoothing = _checks.check_fraction("label_smoothing", label_smoothing)
        self.backend = backend
        self.state = EvolvedState(
            num_samples,
            beta1=policy.beta1,
            beta2=policy.beta2,
            device=device,
            sync=sync,
            process_group=process_group,
        )
        policy.bind(self.state, num_epochs, anneal_start=anneal_start, anneal_end=anneal_end)
        self.sampler = EvolvedSampler(
            self.state,
            num_epochs,
            planner=policy,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        )
        # The sampler's own generators are rebuilt per epoch; selection draws from one long-lived stream. Ranks get
        # distinct streams (rank 0 keeps ``seed``), else every rank would reuse the same race noise per position.
        selection_seed = seeds.rank_seed(seed, self.sampler.rank)
        self.generator = torch.Generator(device=self.state.device).manual_seed(selection_seed)
        self.scored_samples = 0
        self.trained_samples = 0
        # The step plan the user asked total_steps for (batch_size, drop_last) and the DataLoader steps each epoch
        # took, so set_epoch can say when the loop and the plan disagree (a schedule ending in the wrong place).
        self._planned_batches: tuple[int, bool] | None = None
        self._epoch_batches = 0
        self._schedule_warned = False
        # What the method needs from the loop beyond select, checked at the next step (see _check_last_step):
        # batches whose losses observe has not had yet, and batches whose weighted loss must be back-propagated.
        self._unobserved: list[SelectedBatch] = []
        self._weighted: list[SelectedBatch] = []
        # Batches a loop may select before observing the first of them: 1 for a plain loop; an integration that
        # selects a whole gradient-accumulation group first (the Hugging Face Trainer) raises it to the group size.
        self.observe_lag = 1
        # The learning-rate factor of a plan reaches the optimizer through scaled_lr only: a global step hook (the
        # helper never holds the optimizer) refuses a step of the selected model's optimizer outside it.
        self._lr_scaled = 0
        self._model: weakref.ref | None = None
        self._model_params: frozenset[int] = frozenset()
        handle = register_optimizer_step_pre_hook(_lr_check_hook(weakref.ref(self)))
        weakref.finalize(self, handle.remove)

    @property
    def selecting(self) -> bool:
        """Whether the current epoch selects (False for the baseline and in annealing epochs)."""
        return self.selects and self.sampler.selecting

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; under ``torch.distributed`` all ranks first merge their states (a collective: call it
        on every rank), so the sampler prunes from the same weights everywhere."""
        self._check_last_step(epoch_end=True)
        if epoch != self.sampler.epoch:
            self._check_epoch_steps()
        if self.policy.keeps_state:  # the baseline never changes its state: nothing to merge
            self.state.sync_epoch()
        self.sampler.set_epoch(epoch)

    @property
    def lr_scale(self) -> float:
        """The current epoch's learning-rate factor (KAKURENBO's 1/(1-F); 1 otherwise), known once iteration began."""
        return self.sampler.lr_scale

    @contextlib.contextmanager
    def scaled_lr(self, optimizer: torch.optim.Optimizer):
        """Run the optimizer step inside this: every group's ``lr`` is multiplied by :attr:`lr_scale` and then put
        back exactly, so any scheduler keeps its own schedule."""
        scale = self.lr_scale
        self._lr_scaled += 1
        if scale == 1.0:
            try:
                yield
            finally:
                self._lr_scaled -= 1
            return
        saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        try:
            yield
        finally:
            self._lr_scaled -= 1
            for group, lr in zip(optimizer.param_groups, saved, strict=True):
                group["lr"] = lr

    def _check_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._lr_scaled or self.lr_scale == 1.0 or not self._model_params:
            return
        if not any(id(p) in self._model_params for group in optimizer.param_groups for p in group["params"]):
            return  # another model's optimizer (a discriminator, an unrelated run): not this method's business
        raise RuntimeError(
            f"{self.method}: this epoch's plan scales the learning rate by {self.lr_scale:.6g}, but the optimizer "
            "stepped outside training.scaled_lr(optimizer); write the step as `with training.scaled_lr(optimizer): "
            "optimizer.step()` (a plain step would train another method than the one named)"
        )

    def _know_model(self, model: Any) -> None:
        # Any callable scores; only a module's parameters tell which optimizer trains it (integrations that score
        # through another callable apply scaled_lr themselves).
        try:
            self._model = weakref.ref(model)
        except TypeError:
            self._model = None
        parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
        self._model_params = frozenset(id(p) for p in parameters)

    def _check_last_step(self, *, epoch_end: bool = False) -> None:
        """Raise if an earlier step skipped something its method needs (the loop would train another method)."""
        weighted, self._weighted = self._weighted, []
        lag = 1 if epoch_end else max(self.observe_lag, 1)
        if len(self._unobserved) >= lag:
            self._unobserved = []
            raise RuntimeError(
                f"{self.method}: the previous batch was trained without training.observe(batch, losses, "
                "outputs=logits); the method learns from the training forward's per-sample losses, call it after "
                "every training forward"
            )
        if not all(batch.weighted_backward for batch in weighted):
            raise RuntimeError(
                f"{self.method}: this epoch's plan weights each row's loss, but the loss back-propagated in the "
                "previous step was not built from the weighted losses; back-propagate what "
                "`loss = training.observe(batch, losses, outputs=logits)` returns (or batch.mean_loss(losses), or a "
                "reduction of batch.weigh(losses))"
            )

    def steps_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        return self.sampler.steps_per_epoch(batch_size, drop_last=drop_last)

    def total_steps(self, batch_size: int, *, drop_last: bool = False, gradient_accumulation_steps: int = 1) -> int:
        """Optimizer steps of the whole run (pass it to OneCycleLR and the like).

        ``batch_size`` and ``drop_last`` are the DataLoader's. With ``gradient_accumulation_steps=g`` one optimizer
        step is taken per g DataLoader steps and once more for an epoch's last partial group (see
        :meth:`EvolvedSampler.total_steps`). The helper remembers the plan: at each ``set_epoch`` it warns if the
        epoch just finished took another number of DataLoader steps than planned (a schedule that would end early
        or never reach its end).
        """
        total = self.sampler.total_steps(
            batch_size, drop_last=drop_last, gradient_accumulation_steps=gradient_accumulation_steps
        )
        self._planned_batches = (batch_size, bool(drop_last))
        return total

    def check_scheduler(
        self,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        batch_size: int,
        *,
        drop_last: bool = False,
        gradient_accumulation_steps: int = 1,
    ) -> bool:
        """Warn (and return False) if ``scheduler`` plans another number of steps than this run takes.

        For a schedule built by hand, e.g. ``total_steps=E * len(loader)``: pruned and annealing epochs have
        different lengths, so that count is wrong under ESWP and OneCycle ends at the wrong learning rate. Reads
        ``total_steps`` (OneCycleLR), ``T_max`` (CosineAnnealingLR) or ``total_iters`` (LinearLR, PolynomialLR,
        ConstantLR); other schedulers raise ``TypeError``.
        """
        for attribute in ("total_steps", "T_max", "total_iters"):
            planned = getattr(scheduler, attribute, None)
            if isinstance(planned, int):
                break
        else:
            raise TypeError(
                f"scheduler: cannot read a step count from {type(scheduler).__name__} (no total_steps, T_max or "
                "total_iters)"
            )
        actual = self.total_steps(
            batch_size, drop_last=drop_last, gradient_accumulation_steps=gradient_accumulation_steps
        )
        if planned == actual:
            return True
        warnings.warn(
            f"scheduler: {type(scheduler).__name__} plans {planned} steps ({attribute}) but this run takes {actual} "
            f"optimizer steps (training.total_steps({batch_size}, drop_last={drop_last}, "
            f"gradient_accumulation_steps={gradient_accumulation_steps})); pruned and annealing epochs differ in "
            "length, so build the schedule from training.total_steps(...)",
            stacklevel=2,
        )
        return False

    def _check_epoch_steps(self) -> None:
        taken, self._epoch_batches = self._epoch_batches, 0
        if self._planned_batches is None or self._schedule_warned or taken <= 0:
            return
        batch_size, drop_last = self._planned_batches
        planned = self.sampler.steps_per_epoch(batch_size, drop_last=drop_last)
        if taken != planned:
            self._schedule_warned = True  # once per run: every later epoch would repeat it
            warnings.warn(
                f"epoch {self.sampler.epoch} took {taken} DataLoader steps, but total_steps({batch_size}, "
                f"drop_last={drop_last}) planned {planned} for it: a learning-rate schedule built from that plan will "
                "not end where it should. Pass total_steps the DataLoader's own batch_size and drop_last.",
                stacklevel=3,
            )

    def num_selected(self, batch_size: int) -> int:
        """k for a meta-batch of ``batch_size`` rows: ``select_ratio * B`` rounded half up (as pruning rounds its
        counts: B = 10 at 0.25 gives 3), at least 1."""
        return max(1, round_half_up(as_written(self.select_ratio) * batch_size))

    def select(
        self,
        model: torch.nn.Module,
        indices: torch.Tensor,
        inputs: Any,
        targets: Any,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> SelectedBatch:
        """The rows of this meta-batch to train on.

        In selecting epochs: a scoring forward of ``model`` on all rows under ``torch.no_grad()`` in
        ``scoring_mode``, per-sample losses (cross-entropy of the outputs against ``targets``, or ``loss_fn(outputs,
        targets)`` returning shape (B,) for any other task), the state update, and the draw of k rows. Otherwise
        all rows (scored, and the state updated, first with ``score_annealing``). Rows that repeat another rank's
        ids (padding of an uneven last shard) are dropped, unless the batch holds nothing else: then they are
        trained on and never update the state.
        """
        indices = _checks.check_tensor("indices", indices)
        if indices.dim() != 1 or not 1 <= indices.numel() <= len(self.sampler):
            raise ValueError(
                f"indices must be 1-D with 1 to {len(self.sampler)} ids (what is left of this rank's epoch), got "
                f"shape {tuple(indices.shape)}"
            )
        self._check_last_step()
        if self._model is None or self._model() is not model:
            self._know_model(model)
        batch = self._select(model, indices, inputs, targets, loss_fn)
        if not batch.scored and self.policy.keeps_state:
            self._unobserved.append(batch)
        # Only a step that succeeded moves the epoch position: a raising call can be retried, or checkpointed.
        self.sampler.advance(indices.numel())
        if self._epoch_batches >= 0:  # -1: an epoch resumed from an older checkpoint, not counted
            self._epoch_batches += 1
        return batch

    def _select(self, model, indices, inputs, targets, loss_fn) -> SelectedBatch:
        # Padding always trails a shard, so the real rows of this batch are a prefix of it.
        real = min(indices.numel(), max(0, self.sampler.real_size() - self.sampler.position))
        indices = indices.to(self.state.device)
        if real == 0:
            # A last batch of padding only (one repeated id): every rank must still take an optimizer step (DDP
            # all-reduces gradients), so train on the repeat, but never let it touch the state. In step mode the
            # other ranks are in a sync_step now: join it with nothing to share.
            if self.selects:
                self.state.sync_step(indices[:0], torch.empty(0, device=self.state.device), check_values=False)
            self.trained_samples += indices.numel()
            return SelectedBatch(indices, inputs, targets, scored=True)
        if real < indices.numel():
            rows = torch.arange(real)
            indices, inputs, targets = (take_rows(v, rows) for v in (indices, inputs, targets))
        batch_size = indices.numel()
        if not self.selecting and not (self.selects and self.score_annealing):
            self.trained_samples += batch_size
            weights = self.sampler.loss_weights
            weights = None if weights is None else weights.index_select(0, indices.cpu())
            return SelectedBatch(indices, inputs, targets, scored=False, loss_weights=weights)
        outputs = self.scoring_forward(model, inputs)
        # Annealing epochs with score_annealing: the same scoring and update, all B rows kept.
        k = self.num_selected(batch_size) if self.selecting else batch_size
        if loss_fn is None:
            scoring = dict(logits=outputs, targets=targets, label_smoothing=self.label_smoothing)
        else:
            scoring = dict(losses=loss_fn(outputs, targets).detach())
        rows, losses = self.policy.choose(
            self.state, indices, k, generator=self.generator, backend=self.backend, check_values=self.check_values,
            **scoring,
        )  # fmt: skip
        if losses is not None:
            self.state.sync_step(indices, losses, check_values=False)  # no-op unless sync="step" across ranks
        self.scored_samples += batch_size
        self.trained_samples += k
        return SelectedBatch(take_rows(indices, rows), take_rows(inputs, rows), take_rows(targets, rows), scored=True)

    def observe(
        self, batch: SelectedBatch, losses: torch.Tensor, *, outputs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feed the training forward's per-sample losses to the policy; return the loss to back-propagate.

        The returned loss is the mean of ``losses`` with each row weighted by the epoch's plan (InfoBatch's
        1/(1-r) on kept low-loss rows; a plain mean for every other method): back-propagating it, rather than
        ``losses.mean()``, is what makes one loop train every method. In an epoch whose plan weights rows, a step
        that back-propagated something else raises at the next ``select``. ES-family methods update the state here
        in annealing epochs only (unless ``score_annealing``), set-level methods at every step (KAKURENBO also needs
        the training forward's ``outputs``); the baseline keeps no state. A batch trained without ``observe`` where
        the method needs it raises at the next ``select``. Losses are stored detached. Their shape is checked in
        every epoch, also where they are not used, so a loop that passes the wrong tensor fails in its first step,
        not when the schedule reaches an annealing epoch.
        """
        losses = _checks.check_tensor("losses", losses)
        if losses.shape != batch.indices.shape:
            raise ValueError(
                f"losses must be per-sample losses of the batch's rows, shape {tuple(batch.indices.shape)}, got "
                f"{tuple(losses.shape)} (pass reduction='none')"
            )
        if not batch.scored and self.policy.keeps_state:
            detached = losses.detach().to(self.state.device, torch.float32)
            self.policy.update(
                self.state, batch.indices, detached, outputs, batch.targets, check_values=self.check_values
            )
        self._unobserved = [pending for pending in self._unobserved if pending is not batch]
        loss = batch.mean_loss(losses)
        if batch.loss_weights is not None and losses.requires_grad:
            self._weighted.append(batch)
        return loss

    def scoring_forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        """``model(inputs)`` under ``torch.no_grad()`` in :attr:`scoring_mode`, the model's own mode restored: the
        forward ``select`` scores with (integrations that score outside ``select`` use it too)."""
        was_training = model.training
        model.train(self.scoring_mode == "train")
        try:
            with torch.no_grad():
                return model(inputs)
        finally:
            model.train(was_training)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: state, sampler plan and position, selection RNG, counters."""
        return {
            "method": self.method,
            "state": self.state.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "scored_samples": self.scored_samples,
            "trained_samples": self.trained_samples,
            "epoch_batches": self._epoch_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["method"] != self.method:
            raise ValueError(f"state_dict is from method {state_dict['method']!r}, this run is {self.method!r}")
        backup = self.state_dict()
        try:
            self._apply(state_dict)
        except Exception:
            self._apply(backup)  # all or nothing: a part that fails late must not leave earlier parts loaded
            raise
        # The steps still owed an observe or a weighted backward belong to the progress just replaced.
        self._unobserved, self._weighted = [], []

    def _apply(self, state_dict: dict[str, Any]) -> None:
        self.state.load_state_dict(state_dict["state"])
        self.sampler.load_state_dict(state_dict["sampler"])
        self.generator.set_state(state_dict["generator"])
        self.scored_samples = int(state_dict["scored_samples"])
        self.trained_samples = int(state_dict["trained_samples"])
        # Older checkpoints lack the count: -1 leaves the resumed epoch out of the step-plan check.
        self._epoch_batches = int(state_dict.get("epoch_batches", -1))
