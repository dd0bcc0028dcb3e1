"""EvolvedSampler: the per-epoch plan of Evolved Sampling (ESWP pruning, annealing, shuffling, sharding)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import torch
from torch.utils.data import Sampler

from es_kernels import _checks, seeds
from es_kernels.select import evolved_prune
from es_kernels.state import EvolvedState


def as_written(fraction: float) -> Fraction:
    """The decimal the user wrote: in binary floating point 0.35 * 90 is 31.4999..., which rounds the wrong way."""
    return Fraction(repr(float(fraction)))


def round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def annealing_epochs(num_epochs: int, fraction: float) -> int:
    """Epochs covered by an annealing fraction, rounded half up (5% of 10 epochs is 1 epoch, of 200 is 10)."""
    return round_half_up(as_written(fraction) * num_epochs)


class EvolvedSampler(Sampler[int]):
    """Yields this rank's dataset ids for the current epoch; use it as a DataLoader ``sampler``.

    Selecting epochs ``anneal_start_epochs <= e < num_epochs - anneal_end_epochs`` keep ``(1 - r) n`` ids (half up)
    drawn without replacement ∝ ``w`` (or ``s``) from the state as it is when the epoch's plan is made (ESWP; r = 0
    is plain ES). Annealing epochs use every id.

    No sample is pruned before it has been scored: a never-scored sample still holds its initial ``1/n`` against
    scored weights of the order of their losses, so pruned once it would practically never come back. Hence epoch 0
    keeps every id whatever the plan (when its plan is drawn nothing has been scored; a pure function of the epoch,
    so the step counts stay exact), and a later pruning epoch keeps every sample the state has not scored yet
    (:attr:`EvolvedState.scored`) and draws the rest of its ``(1 - r) n`` ids from the scored ones, with the same
    law ∝ ``w``. (Only when more samples are unscored than the epoch keeps, after an earlier epoch left many out,
    are the kept ones drawn among the unscored, ∝ their equal initial weights.)

    The kept ids are shuffled, then sharded: each of the
    ``num_replicas`` ranks gets the same number of ids. When the count does not divide evenly the plan is padded
    with ids from its start (like ``DistributedSampler``); ``is_padding(position)`` tells a loop which positions
    are such repeats; EvolvedTraining drops them, so no sample updates the state twice.

    Every rank must build the sampler with the same ``seed`` and have the same state at the epoch start; then
    pruning and shuffling agree on all ranks without communication.

    Args:
        state: the :class:`EvolvedState` whose weights drive pruning.
        num_epochs: total epochs E of the run (annealing is placed relative to it).
        prune_ratio: r in [0, 1): the fraction dropped in selecting epochs (paper ESWP: 0.2; ES: 0).
        prune_by: ``"weight"`` (later paper version, default) or ``"score"`` (earlier version).
        anneal_start, anneal_end: fractions of epochs at the start and end without selection or pruning.
        shuffle: shuffle the ids each epoch (False keeps ascending order; for debugging).
        seed: base seed of pruning and shuffling; epoch e uses a generator seeded from (seed, e).
        num_replicas, rank: data-parallel world size and this process's rank (default: from the state's
            ``process_group``, else the whole ``torch.distributed`` world), so the sampler shards over exactly the
            ranks the state merges over.
        planner: a set-level :class:`~es_kernels.policies.SelectionPolicy` that draws the plan of every epoch
            from 1 itself (InfoBatch, KAKURENBO, UCB) instead of the ES plan above (epoch 0 keeps every id, as
            above); its per-sample loss weights and learning-rate scale for the current epoch are then
            ``loss_weights`` and ``lr_scale``. Bind it to ``state`` first.
    """

    def __init__(
        self,
        state: EvolvedState,
        num_epochs: int,
        *,
        prune_ratio: float = 0.0,
        prune_by: str = "weight",
        anneal_start: float = 0.05,
        anneal_end: float = 0.05,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        planner=None,
    ) -> None:
        if not isinstance(state, EvolvedState):
            raise TypeError(f"state must be an EvolvedState, got {type(state).__name__}")
        self.state = state
        self.num_epochs = _checks.check_int("num_epochs", num_epochs, low=1)
        self.prune_ratio = _checks.check_fraction("prune_ratio", prune_ratio, upper_open=True)
        if prune_by not in ("weight", "score"):
            raise ValueError(f"prune_by must be 'weight' or 'score', got {prune_by!r}")
        self.prune_by = prune_by
        anneal_start = _checks.check_fraction("anneal_start", anneal_start)
        anneal_end = _checks.check_fraction("anneal_end", anneal_end)
        if anneal_start + anneal_end > 1.0:
            raise ValueError(f"anneal_start + anneal_end must be at most 1, got {anneal_start} + {anneal_end}")
        self.anneal_start_epochs = annealing_epochs(self.num_epochs, anneal_start)
        self.anneal_end_epochs = annealing_epochs(self.num_epochs, anneal_end)
        self.shuffle = bool(shuffle)
        self.seed = _checks.check_int("seed", seed, low=0)
        if num_replicas is None or rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            group = state.process_group
            if num_replicas is None:
                num_replicas = torch.distributed.get_world_size(group) if distributed else 1
            if rank is None:
                rank = torch.distributed.get_rank(group) if distributed else 0
        self.num_replicas = _checks.check_int("num_replicas", num_replicas, low=1)
        self.rank = _checks.check_int("rank", rank, low=0, high=self.num_replicas - 1)
        self.kept_samples = round_half_up((1 - as_written(self.prune_ratio)) * state.num_samples)
        if self.kept_samples < self.num_replicas:
            raise ValueError(
                f"prune_ratio={self.prune_ratio} keeps {self.kept_samples} of {state.num_samples} samples, fewer "
                f"than num_replicas={self.num_replicas}"
            )
        self.planner = planner
        if planner is not None:
            smallest = min(self.epoch_size(e) for e in range(self.num_epochs))
            if smallest < self.num_replicas:
                raise ValueError(f"{planner!r} keeps {smallest} samples in some epoch, fewer than num_replicas")
        self.epoch = 0
        self.position = 0
        self._shard: torch.Tensor | None = None
        # A pass over the epoch reached its end in this process: another pass needs set_epoch (or a resume) first.
        self._iterated_to_end = False
        self.loss_weights: torch.Tensor | None = None  # the planner's per-sample loss weights of this epoch
        self.lr_scale = 1.0  # the planner's learning-rate factor of this epoch

    # ----------------------------------------------------------------- the schedule (pure functions of the epoch)

    def is_selecting(self, epoch: int) -> bool:
        """Whether ``epoch`` selects mini-batches (and prunes, from epoch 1): outside the annealing epochs."""
        return self.anneal_start_epochs <= epoch < self.num_epochs - self.anneal_end_epochs

    @property
    def selecting(self) -> bool:
        """Whether the current epoch selects mini-batches and prunes, from epoch 1 (False in annealing epochs)."""
        return self.is_selecting(self.epoch)

    @staticmethod
    def may_prune(epoch: int) -> bool:
        """Whether any plan (ESWP's or a planner's) may prune in ``epoch``: not in epoch 0, whose plan is drawn
        before any sample has been scored."""
        return epoch >= 1

    def epoch_size(self, epoch: int) -> int:
        """Ids in the whole plan of ``epoch`` (all ranks, before padding)."""
        if not self.may_prune(epoch):
            return self.state.num_samples
        if self.planner is not None:
            return self.planner.epoch_size(epoch)
        pruned = self.is_selecting(epoch) and self.prune_ratio > 0
        return self.kept_samples if pruned else self.state.num_samples

    def shard_size(self, epoch: int) -> int:
        """Ids this rank yields in ``epoch``, padding included: the same on every rank."""
        return math.ceil(self.epoch_size(epoch) / self.num_replicas)

    def steps_per_epoch(self, batch_size: int, *, drop_last: bool = False, epoch: int | None = None) -> int:
        """DataLoader steps of ``epoch`` (default: the current one) on each rank for this ``batch_size``."""
        batch_size = _checks.check_int("batch_size", batch_size, low=1)
        size = self.shard_size(self.epoch if epoch is None else epoch)
        return size // batch_size if drop_last else math.ceil(size / batch_size)

    def total_steps(self, batch_size: int, *, drop_last: bool = False, gradient_accumulation_steps: int = 1) -> int:
        """Optimizer steps over all epochs: exactly what a OneCycle-style scheduler must be told.

        With ``gradient_accumulation_steps=g`` each epoch's DataLoader steps are grouped by g, one optimizer step per
        group, and the last partial group of an epoch counts as one step (the loop steps the optimizer at the epoch
        end too): ``sum over epochs of ceil(steps_per_epoch / g)``. Accumulation never spans an epoch boundary.
        """
        group = _checks.check_int("gradient_accumulation_steps", gradient_accumulation_steps, low=1)
        return sum(
            -(-self.steps_per_epoch(batch_size, drop_last=drop_last, epoch=e) // group) for e in range(self.num_epochs)
        )

    # ----------------------------------------------------------------- the plan of the current epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; its plan is drawn from the state when iteration begins.

        Setting the epoch the sampler is already in keeps its plan and position: that is how a loop resumed from
        ``load_state_dict`` continues mid-epoch with the same ``for epoch in range(start, E)`` code. An epoch is
        iterated to its end once: iterating it again without a ``set_epoch`` to another epoch raises (a forgotten
        ``set_epoch`` would otherwise train on nothing, or repeat the epoch). It also begins the epoch's visit marks
        of the state (:meth:`EvolvedState.begin_epoch`).
        """
        epoch = _checks.check_int("epoch", epoch, low=0, high=self.num_epochs - 1)
        if epoch != self.epoch:
            self.epoch, self.position, self._shard = epoch, 0, None
            self._iterated_to_end = False
            self.loss_weights, self.lr_scale = None, 1.0
        self.state.begin_epoch(epoch)  # the state refuses a second update of a sample within the epoch

    def _epoch_generator(self, device: torch.device, purpose: int) -> torch.Generator:
        # Pruning and shuffling get different streams: on a CPU state one seed would reuse the very random bits that
        # chose the kept set to order it.
        return torch.Generator(device=device).manual_seed(seeds.epoch_seed(self.seed, self.epoch, purpose))

    def _make_shard(self) -> torch.Tensor:
        size = self.epoch_size(self.epoch)
        if self.planner is not None and self.may_prune(self.epoch):
            planned = self.planner.plan_epoch(self.state, self.epoch, self._epoch_generator(torch.device("cpu"), 0))
            if planned.ids.numel() != size:
                count = planned.ids.numel()
                raise RuntimeError(f"{self.planner!r} planned {count} ids in epoch {self.epoch}, not {size}")
            plan, self.loss_weights, self.lr_scale = planned.ids.cpu(), planned.loss_weights, planned.lr_scale
        elif size < self.state.num_samples:
            plan = self._prune(size)
        else:
            plan = torch.arange(size)
        if self.shuffle:
            plan = plan[torch.randperm(size, generator=self._epoch_generator(torch.device("cpu"), purpose=1))]
        padded = self.shard_size(self.epoch) * self.num_replicas
        if padded > size:
            plan = torch.cat([plan, plan[: padded - size]])
        return plan[self.rank :: self.num_replicas].clone()

    def _prune(self, keep: int) -> torch.Tensor:
        """ESWP's kept ids: every sample the state has not scored yet, the rest drawn from the scored ones."""
        generator = self._epoch_generator(self.state.device, purpose=0)
        draw = dict(by=self.prune_by, generator=generator)
        scored = self.state.scored
        unscored = (~scored).nonzero().squeeze(1)
        if unscored.numel() == 0:
            return evolved_prune(self.state, keep, **draw).cpu()
        if unscored.numel() >= keep:
            return evolved_prune(self.state, keep, among=unscored, **draw).cpu()
        drawn = evolved_prune(self.state, keep - unscored.numel(), among=scored.nonzero().squeeze(1), **draw)
        return torch.cat([unscored, drawn]).sort().values.cpu()

    def real_size(self) -> int:
        """Ids of this rank's shard in the current epoch that are not padding; the padding trails them."""
        return max(0, math.ceil((self.epoch_size(self.epoch) - self.rank) / self.num_replicas))

    def is_padding(self, position: int) -> bool:
        """Whether this rank's ``position``-th id of the epoch repeats an id another rank also has."""
        return position >= self.real_size()

    def __iter__(self) -> Iterator[int]:
        if self._iterated_to_end:
            # Without this a loop that forgets set_epoch trains on nothing after the first epoch (the helper's
            # position sits at the end) or on the first epoch's plan again, silently either way.
            raise RuntimeError(
                f"EvolvedSampler: epoch {self.epoch} was already iterated to its end; call sampler.set_epoch(epoch) "
                "(or EvolvedTraining.set_epoch(epoch)) at the start of every epoch, before iterating the DataLoader"
            )
        if self._shard is None:
            self._shard = self._make_shard()
        # In chunks: a whole shard of 1e8 ids as Python ints would take gigabytes.
        for chunk in self._shard[self.position :].split(1 << 16):
            yield from chunk.tolist()
        self._iterated_to_end = True

    def __len__(self) -> int:
        return self.shard_size(self.epoch) - self.position

    def advance(self, count: int) -> None:
        """Record that the loop consumed ``count`` more ids of this epoch (the training helper calls it per step).

        The sampler cannot count this itself: a DataLoader draws ids ahead of the loop to prefetch. A loop that uses
        the sampler without the training helper must call it once per batch, or a mid-epoch ``state_dict`` resumes
        from the epoch's start.
        """
        count = _checks.check_int("count", count, low=0, high=len(self))
        self.position += count

    # ----------------------------------------------------------------- save and resume

    def state_dict(self) -> dict[str, object]:
        """Epoch, position inside it, and the rank's plan (the plan depends on the state at the epoch start, which
        has moved on since, so it is saved rather than redrawn)."""
        shard = self._shard if self._shard is not None else torch.empty(0, dtype=torch.int64)
        return {
            "epoch": self.epoch,
            "position": self.position,
            "shard": shard.clone(),
            "has_shard": self._shard is not None,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            # The planner's weights and scale were drawn from the state at the epoch start, like the shard.
            "loss_weights": self.loss_weights,
            "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        missing = {"epoch", "position", "shard", "has_shard", "seed", "num_replicas", "rank"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        for key in ("num_replicas", "rank", "seed"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict['{key}'] is {state_dict[key]} but this sampler has {getattr(self, key)}; resume "
                    "with the same world size, rank and seed"
                )
        epoch = _checks.check_int("state_dict['epoch']", state_dict["epoch"], low=0, high=self.num_epochs - 1)
        shard = state_dict["shard"] if state_dict["has_shard"] else None
        if shard is not None:
            shard = _checks.check_tensor("state_dict['shard']", shard)
            if shard.dtype != torch.int64:
                raise TypeError(f"state_dict['shard'] must hold int64 sample ids, got {shard.dtype}")
            if shard.numel() and (int(shard.min()) < 0 or int(shard.max()) >= self.state.num_samples):
                raise ValueError(f"state_dict['shard'] holds ids outside [0, {self.state.num_samples})")
        if shard is not None and shard.numel() != self.shard_size(epoch):
            raise ValueError(
                f"state_dict['shard'] has {shard.numel()} ids, expected {self.shard_size(epoch)} for epoch {epoch}"
            )
        high = self.shard_size(epoch)
        position = _checks.check_int("state_dict['position']", state_dict["position"], low=0, high=high)
        weights = state_dict.get("loss_weights")
        if weights is not None:
            weights = _checks.check_tensor("state_dict['loss_weights']", weights)
            if weights.shape != (self.state.num_samples,) or not weights.dtype.is_floating_point:
                n = self.state.num_samples
                raise ValueError(f"state_dict['loss_weights'] must be floating point of shape ({n},)")
        self.epoch, self.position = epoch, position
        self._shard = None if shard is None else shard.clone().to(torch.int64)
        self.loss_weights = None if weights is None else weights.clone()
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self._iterated_to_end = False  # a resume iterates what is left of its epoch (possibly nothing) once
