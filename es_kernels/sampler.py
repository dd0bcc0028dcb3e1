"""EvolvedSampler: shuffles and shards the per-epoch plan of a selection policy (ES's by default)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from es_kernels import _checks, seeds
from es_kernels.policies import EvolvedPolicy, SelectionPolicy, annealing_epochs
from es_kernels.state import EvolvedState


class EvolvedSampler(Sampler[int]):
    """Yields this rank's dataset ids for the current epoch; use it as a DataLoader ``sampler``.

    The ids of each epoch are the plan of a :class:`~es_kernels.policies.SelectionPolicy` (``planner``), by default
    ES's (:class:`~es_kernels.policies.EvolvedPolicy`): selecting epochs
    ``anneal_start_epochs <= e < num_epochs - anneal_end_epochs`` keep ``(1 - r) n`` ids (half up) drawn without
    replacement ∝ ``w`` (or ``s``) from the state as it is when the epoch's plan is made, every not yet scored sample
    among them (ESWP; r = 0 is plain ES); annealing epochs use every id.

    Epoch 0 keeps every id whatever the plan: when its plan is drawn nothing has been scored, so no loss or weight
    can rank a sample yet (and, a pure function of the epoch, the step counts stay exact).

    The kept ids are shuffled, then sharded: each of the
    ``num_replicas`` ranks gets the same number of ids. When the count does not divide evenly the plan is padded
    with ids from its start (like ``DistributedSampler``); ``is_padding(position)`` tells a loop which positions
    are such repeats; EvolvedTraining drops them, so no sample updates the state twice.

    Every rank must build the sampler with the same ``seed`` and have the same state at the epoch start; then
    pruning and shuffling agree on all ranks without communication.

    Args:
        state: the :class:`EvolvedState` whose weights drive pruning.
        num_epochs: total epochs E of the run (annealing is placed relative to it).
        prune_ratio: r in [0, 1): the fraction dropped in selecting epochs (paper ESWP: 0.2; ES: 0). Without a
            ``planner`` only: a planner carries its own.
        prune_by: ``"weight"`` (later paper version, default) or ``"score"`` (earlier version); without a planner.
        anneal_start, anneal_end: fractions of epochs at the start and end without selection or pruning (default
            5% each; with a ``planner``, the annealing it was bound with, which these must then match).
        shuffle: shuffle the ids each epoch (False keeps ascending order; for debugging).
        seed: base seed of pruning and shuffling; epoch e uses a generator seeded from (seed, e).
        num_replicas, rank: data-parallel world size and this process's rank (default: from the state's
            ``process_group``, else the whole ``torch.distributed`` world), so the sampler shards over exactly the
            ranks the state merges over.
        planner: the :class:`~es_kernels.policies.SelectionPolicy` whose plan of every epoch from 1 the sampler
            shuffles and shards (InfoBatch, KAKURENBO, UCB, or an ES policy with its own settings); its per-sample
            loss weights and learning-rate scale for the current epoch are then ``loss_weights`` and ``lr_scale``.
            Bind it to ``state`` first (``policy.bind(state, num_epochs)``).
    """

    def __init__(
        self,
        state: EvolvedState,
        num_epochs: int,
        *,
        prune_ratio: float | None = None,
        prune_by: str | None = None,
        anneal_start: float | None = None,
        anneal_end: float | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        planner: SelectionPolicy | None = None,
    ) -> None:
        if not isinstance(state, EvolvedState):
            raise TypeError(f"state must be an EvolvedState, got {type(state).__name__}")
        self.state = state
        self.num_epochs = _checks.check_int("num_epochs", num_epochs, low=1)
        annealing = {"anneal_start": anneal_start, "anneal_end": anneal_end}
        if planner is None:
            planner = EvolvedPolicy(
                "es",
                beta1=state.beta1,
                beta2=state.beta2,
                prune_ratio=0.0 if prune_ratio is None else prune_ratio,
                prune_by="weight" if prune_by is None else prune_by,
            )
            planner.bind(state, self.num_epochs, **{k: 0.05 if v is None else v for k, v in annealing.items()})
        else:
            self._check_planner(planner, prune_ratio=prune_ratio, prune_by=prune_by, **annealing)
        self.planner = planner
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
        smallest = min(self.epoch_size(e) for e in range(self.num_epochs))
        if smallest < self.num_replicas:
            raise ValueError(
                f"{planner!r} (prune_ratio={planner.prune_ratio}) keeps {smallest} of {state.num_samples} samples in "
                f"some epoch, fewer than num_replicas={self.num_replicas}"
            )
        self.epoch = 0
        self.position = 0
        self._shard: torch.Tensor | None = None
        # A pass over the epoch reached its end in this process: another pass needs set_epoch (or a resume) first.
        self._iterated_to_end = False
        self.loss_weights: torch.Tensor | None = None  # the planner's per-sample loss weights of this epoch
        self.lr_scale = 1.0  # the planner's learning-rate factor of this epoch

    def _check_planner(self, planner: object, **settings: float | str | None) -> None:
        if not isinstance(planner, SelectionPolicy):
            raise TypeError(f"planner must be a SelectionPolicy, got {type(planner).__name__}")
        if (planner.num_samples, planner.num_epochs) != (self.state.num_samples, self.num_epochs):
            raise ValueError(
                f"planner: bind it to this state and run first (policy.bind(state, {self.num_epochs})); it is bound "
                f"to {planner.num_samples} samples and {planner.num_epochs} epochs"
            )
        for name in ("prune_ratio", "prune_by"):
            if settings[name] is not None:
                raise ValueError(f"{name}: a planner carries its own; set it on the policy, not the sampler")
        for name in ("anneal_start", "anneal_end"):
            value = settings[name]
            if value is not None and annealing_epochs(self.num_epochs, value) != getattr(planner, f"{name}_epochs"):
                raise ValueError(
                    f"{name}={value} differs from the annealing the planner was bound with; pass it to "
                    "policy.bind(state, num_epochs, anneal_start=..., anneal_end=...)"
                )

    # ----------------------------------------------------------------- the schedule (pure functions of the epoch)

    @property
    def prune_ratio(self) -> float:
        return self.planner.prune_ratio

    @property
    def prune_by(self) -> str:
        return self.planner.prune_by

    @property
    def kept_samples(self) -> int:
        """Ids a pruning epoch of the plan keeps (the smallest epoch of a plan whose epochs differ)."""
        return min(self.epoch_size(e) for e in range(self.num_epochs))

    @property
    def anneal_start_epochs(self) -> int:
        return self.planner.anneal_start_epochs

    @property
    def anneal_end_epochs(self) -> int:
        return self.planner.anneal_end_epochs

    def is_selecting(self, epoch: int) -> bool:
        """Whether ``epoch`` selects mini-batches (and prunes, from epoch 1): outside the annealing epochs."""
        return self.planner.is_selecting(epoch)

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
        return self.planner.epoch_size(epoch)

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
        if self.may_prune(self.epoch):
            generator = self._epoch_generator(self.planner.plan_device(self.state), purpose=0)
            planned = self.planner.plan_epoch(self.state, self.epoch, generator)
            if planned.ids.numel() != size:
                count = planned.ids.numel()
                raise RuntimeError(f"{self.planner!r} planned {count} ids in epoch {self.epoch}, not {size}")
            plan, self.loss_weights, self.lr_scale = planned.ids.cpu(), planned.loss_weights, planned.lr_scale
        else:
            plan = torch.arange(size)
        if self.shuffle:
            plan = plan[torch.randperm(size, generator=self._epoch_generator(torch.device("cpu"), purpose=1))]
        padded = self.shard_size(self.epoch) * self.num_replicas
        if padded > size:
            plan = torch.cat([plan, plan[: padded - size]])
        return plan[self.rank :: self.num_replicas].clone()

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
