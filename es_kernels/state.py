"""EvolvedState: the per-sample score ``s`` and weight ``w`` of Evolved Sampling, and their update rule."""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.distributed as dist

from es_kernels import _checks
from es_kernels.reference.update import ema_update_

SYNC_MODES = ("epoch", "step", "off")


def communication_device(backend: str, device: torch.device) -> torch.device:
    """Where the sync's tensors must live for a process group of ``backend`` when the state lives on ``device``.

    NCCL only moves CUDA tensors; gloo moves host tensors for every collective used here (its CUDA support does not
    cover all of them), so a GPU state under gloo is staged through the host. Other backends get the state's device.
    """
    names = backend.lower()
    if device.type == "cuda" and "nccl" in names:
        return device
    if "gloo" in names or "mpi" in names:
        return torch.device("cpu")
    if device.type == "cpu" and "nccl" in names:
        raise ValueError(
            f"device: the state lives on the CPU but the process group's backend is {backend!r}, which only "
            "communicates CUDA tensors; create the state with device='cuda' (or use a gloo group)"
        )
    return device


@dataclasses.dataclass(frozen=True)
class DeferredGuard:
    """What :meth:`EvolvedState.guard` keeps for :meth:`EvolvedState.settle`: the clamped ids, the old values, and
    the input checks' result (``status`` from the C++ op, or the ``checks`` computed with torch ops)."""

    safe_ids: torch.Tensor
    snapshot: torch.Tensor
    status: torch.Tensor | None = None
    checks: _checks.DeviceChecks | None = None


def _native_deferred_checks(device: torch.device) -> bool:
    """The C++ ops (two dispatcher calls) where the extension runs on ``device``; else torch ops (dozens of small
    launches, each costing host time on a GPU). Traced graphs use torch ops, which the compiler fuses."""
    if torch.compiler.is_compiling():
        return False
    from es_kernels.backends import Backend, _cached_reason

    return _cached_reason(Backend.EXTENSION, device) is None


class EvolvedState:
    """Per-sample score ``s`` and weight ``w`` (fp32, length n, both starting at 1/n).

    A visit of sample i with loss l sets ``w_i = b1*s_i + (1-b1)*l`` using the old ``s_i``, then
    ``s_i = b2*s_i + (1-b2)*l``. ``(b1, b2) = (0, 0)`` is plain loss sampling and ``(1, 1)`` uniform sampling.
    The buffers are updated in place and never reallocated, so CUDA graphs and compiled code that captured them
    stay valid.

    Args:
        num_samples: size n of the training set; sample ids are 0..n-1.
        beta1: EMA factor of the weight (paper: 0.2).
        beta2: EMA factor of the score (paper: 0.9 for ES, 0.8 for ESWP).
        device: where the buffers live; put them where the logits are (the GPU in training).
        sync: how data-parallel ranks keep one state (no effect unless ``torch.distributed`` is initialised with
            more than one rank). ``"epoch"`` (default): each rank updates its own copy and :meth:`sync_epoch` merges
            the copies exactly at the epoch boundary with one all-reduce of 8 bytes per sample (and one of 1 byte for
            the ``scored`` marks). ``"step"``: :meth:`sync_step` all-gathers every step's ids and losses and every
            rank applies every rank's update.
            ``"off"``: never communicate (ranks that all see the same data, e.g. tensor-parallel groups).
        process_group: the data-parallel group to synchronise over (default: the whole world). Use the same ranks
            the sampler shards over.
    """

    def __init__(
        self,
        num_samples: int,
        beta1: float = 0.2,
        beta2: float = 0.9,
        device: torch.device | str | None = None,
        *,
        sync: str = "epoch",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        num_samples = _checks.check_int("num_samples", num_samples, low=1)
        self.beta1 = _checks.check_fraction("beta1", beta1)
        self.beta2 = _checks.check_fraction("beta2", beta2)
        if not isinstance(sync, str) or sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            kind = type(process_group).__name__
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {kind}")
        self.sync_mode = sync
        self.process_group = process_group
        initial = 1.0 / num_samples
        self.score = torch.full((num_samples,), initial, dtype=torch.float32, device=device)
        self.weight = torch.full((num_samples,), initial, dtype=torch.float32, device=device)
        # Which samples have been scored at least once (any update, on any rank): pruning never drops one that has
        # not, since its 1/n weight says nothing about it (see ``scored``).
        self._scored = torch.zeros(num_samples, dtype=torch.bool, device=device)
        # Epoch-mode merge base: the (score, weight) values all ranks agreed on at the last merge, stacked as
        # (2, n). None means "the initial 1/n" until a load_state_dict (then "the loaded values"), so single-process
        # runs never pay its 8n bytes.
        self._sync_snapshot: torch.Tensor | None = None
        self._pristine = True
        # Per-epoch visit marks (see begin_epoch): None until an epoch is begun, so a loop that uses the op without
        # any epoch notion pays nothing and is never refused.
        self._visit_epoch: int | None = None
        self._visited: torch.Tensor | None = None
        self._unchecked_revisits: torch.Tensor | None = None
        # Deferred value checks (see check): calls counted on the host, the first failure kept on the device as
        # (code, value, call, classes), and on CUDA a pinned copy of it with the event that says the copy is done.
        self._calls = torch.zeros((), dtype=torch.int64, device=device)
        self._deferred_error = torch.zeros(4, dtype=torch.int64, device=device)
        self._error_mirror: torch.Tensor | None = None
        self._mirror_ready: torch.cuda.Event | None = None
        self._init_sample_buffers()

    @property
    def num_samples(self) -> int:
        return self.score.numel()

    @property
    def device(self) -> torch.device:
        return self.score.device

    def __repr__(self) -> str:
        return (
            f"EvolvedState(num_samples={self.num_samples}, beta1={self.beta1}, beta2={self.beta2}, "
            f"device={self.device})"
        )

    def observe(self, indices: torch.Tensor, losses: torch.Tensor, *, check_values: bool | str = True) -> None:
        """Update-only step: apply the visit rule for ``indices`` with their ``losses``, select nothing.

        Used in annealing epochs with the training forward's detached per-sample losses. A bad argument never
        reaches the state; ``check_values`` as in :func:`~es_kernels.evolved_select` (on a GPU the value checks are
        deferred by default: see :meth:`check`).
        """
        mode = _checks.check_mode(check_values, self.device)
        if mode != _checks.OFF:
            self.begin_call(counted=mode == _checks.IMMEDIATE)
        immediate = mode == _checks.IMMEDIATE
        indices = _checks.check_indices("indices", indices, self.num_samples, self.device, immediate)
        losses = _checks.check_losses("losses", losses, indices.numel(), self.device, immediate).detach()
        if immediate:
            self.check_unvisited(indices)
        if mode != _checks.DEFERRED:
            ema_update_(self.score, self.weight, indices, losses, self.beta1, self.beta2)
            self.mark_visited(indices)
            return
        guard = self.guard(indices, losses=losses)
        ema_update_(self.score, self.weight, guard.safe_ids, losses, self.beta1, self.beta2)
        self.settle(guard)

    # ----------------------------------------------------------------- deferred value checks

    def begin_call(self, counted: bool) -> None:
        """Raise any error that an earlier call's deferred checks found and that the host can read without waiting;
        ``counted`` calls (immediate checks) count here, deferred ones in :meth:`settle`."""
        if not torch.compiler.is_compiling():
            if self.device.type == "cpu":
                self.check()
            elif torch.cuda.is_current_stream_capturing():
                pass  # nothing may be read or queried while a CUDA graph records
            elif self._mirror_ready is not None and self._mirror_ready.query() and int(self._error_mirror[0]):
                self.check()  # the copy is done, so the device error is final: this read does not wait on work
        if counted:
            # A device counter, not a Python int: a compiled graph or a CUDA graph replay counts too, and
            # torch.compile would otherwise guard on (and recompile for) every new number.
            self._calls.add_(1)

    def guard(
        self, indices: torch.Tensor, *, losses=None, labels_a=None, labels_b=None, soft_targets=None,
        token_targets=None, classes: int = 0, ignore_index: int = -100,
    ) -> DeferredGuard:  # fmt: skip
        """Before a deferred-checked update: the call's input value checks, the ids clamped into range (what the
        update must use) and the old (score, weight) at them. Nothing is read on the host."""
        if _native_deferred_checks(self.device):
            safe, snapshot, status = torch.ops.es_kernels_C.deferred_guard(
                self.score, self.weight, indices, self._visited, labels_a, labels_b, classes, losses, soft_targets,
                token_targets, ignore_index,
            )  # fmt: skip
            return DeferredGuard(safe, snapshot, status=status)
        checks = _checks.DeviceChecks(self.device)
        checks.indices(indices, self.num_samples, self._visited)
        if losses is not None:
            checks.losses(losses, computed=False)
        elif token_targets is not None:
            checks.token_targets(token_targets, classes, ignore_index)
        elif soft_targets is not None:
            checks.soft_targets(soft_targets)
        elif labels_a is not None:
            checks.labels(labels_a, classes, 0 if labels_b is None else 1)
            if labels_b is not None:
                checks.labels(labels_b, classes, 2)
        safe = indices.clamp(0, self.num_samples - 1)
        snapshot = torch.stack((self.score.index_select(0, safe), self.weight.index_select(0, safe)))
        return DeferredGuard(safe, snapshot, checks=checks)

    def settle(self, guard: DeferredGuard, computed_losses: torch.Tensor | None = None, classes: int = 0) -> None:
        """After a deferred-checked update: check the losses the call computed, put the snapshot back if any check
        failed, mark the visits if none did, count the call and keep its failure (if none is pending) for
        :meth:`check`. Nothing is read on the host."""
        if guard.status is not None:
            torch.ops.es_kernels_C.deferred_settle(
                self.score, self.weight, guard.safe_ids, guard.snapshot, guard.status, computed_losses, self._visited,
                self._scored, self._deferred_error, self._calls, classes,
            )  # fmt: skip
            self._mirror_error()
            return
        if computed_losses is not None:
            guard.checks.losses(computed_losses, computed=True)
        safe, old, status = guard.safe_ids, guard.snapshot, guard.checks.status()
        passed = status[0] == 0
        with torch.no_grad():
            self.score.index_copy_(0, safe, torch.where(passed, self.score.index_select(0, safe), old[0]))
            self.weight.index_copy_(0, safe, torch.where(passed, self.weight.index_select(0, safe), old[1]))
            for marks in (self._scored, self._visited):
                if marks is not None:
                    marks.index_copy_(0, safe, marks.index_select(0, safe) | passed)
            self._calls.add_(1)
            code = status[0]
            record = torch.stack((code, status[1], self._calls, torch.full_like(code, classes)))
            first = (self._deferred_error[0] == 0) & ~passed
            self._deferred_error.copy_(torch.where(first, record, self._deferred_error))
        self._mirror_error()

    def _mirror_error(self) -> None:
        # A pinned host copy and an event let begin_call see a failure without waiting for the GPU.
        if self.device.type != "cuda" or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return
        if self._error_mirror is None:
            self._error_mirror = torch.zeros(4, dtype=torch.int64, pin_memory=True)
            self._mirror_ready = torch.cuda.Event()
        self._error_mirror.copy_(self._deferred_error, non_blocking=True)
        self._mirror_ready.record()

    def check(self) -> None:
        """Raise the first value error found by a deferred check since the last :meth:`check` (a ``ValueError``
        naming the call it came from; that call left the state as it was).

        With value checks deferred (the default on a GPU) nothing in a call reads a value on the host; the error of a
        bad call is raised at the next point where the host reads anyway: the start of a later call once the GPU has
        finished the bad one, :meth:`begin_epoch` (so ``set_epoch``), :meth:`state_dict`, :meth:`sync_epoch`, or
        here. One host synchronisation on a GPU.
        """
        if torch.compiler.is_compiling():
            return
        code, value, call, classes = self._deferred_error.tolist()
        if code == _checks.ValueCheck.OK:
            return
        self._deferred_error.zero_()
        message = _checks.value_check_message(
            code, value, num_samples=self.num_samples, num_classes=classes, epoch=self._visit_epoch
        )
        raise ValueError(
            f"{message} [found by the deferred value check of call {call} on this state, which left the state "
            "unchanged; check_values='immediate' raises at the call itself]"
        )

    # ----------------------------------------------------------------- which samples were ever scored

    @property
    def scored(self) -> torch.Tensor:
        """Bool (n,): the samples whose loss the state has recorded at least once (read-only view).

        Set by every update (``evolved_select``, :meth:`observe`, other ranks' updates in :meth:`sync_step`, the
        set-level methods' observations through :meth:`mark_scored`), merged across ranks by :meth:`sync_epoch`,
        saved by :meth:`state_dict`. The sampler's pruning keeps every sample not scored yet.
        """
        return self._scored.detach()

    def mark_scored(self, indices: torch.Tensor) -> None:
        """Record that ``indices`` (valid ids) have been scored; no host sync."""
        with torch.no_grad():
            self._scored.index_fill_(0, indices, True)

    # ----------------------------------------------------------------- per-epoch visit marks

    def begin_epoch(self, epoch: int) -> None:
        """Start marking visits for ``epoch``: from then on a sample updated twice before the next epoch is refused.

        Algorithm 1 visits each sample once per epoch; a loop that selects the same batch twice, or feeds rows to
        ``observe`` that ``evolved_select`` already scored, would apply the update rule twice without a word.
        ``EvolvedSampler.set_epoch`` (so also ``EvolvedTraining.set_epoch``) calls this; a loop using the op alone
        may call it at each epoch start to get the same check. Without any call nothing is marked or checked.

        The same ``epoch`` again keeps the marks (the ``set_epoch`` of a run resumed mid-epoch from
        :meth:`state_dict`); another epoch clears them. With ``check_values=True`` a revisit is refused before any
        write, naming the ids (one host sync, like the other value checks). With ``check_values=False`` nothing is
        read on the host per step: revisits are counted on the device and reported here, at the next epoch's start,
        as a warning.
        """
        epoch = _checks.check_int("epoch", epoch, low=0)
        self.check()
        if epoch == self._visit_epoch:
            return
        if self._unchecked_revisits is not None:
            revisits = int(self._unchecked_revisits)  # one host sync per epoch
            if revisits:
                warnings.warn(
                    f"{revisits} sample visit(s) of epoch {self._visit_epoch} repeated a sample already updated in "
                    "that epoch (with check_values=False they are only counted): Algorithm 1 visits a sample once "
                    "per epoch; select or observe each batch once, and call set_epoch at every epoch start. "
                    "check_values=True refuses the first repeat and names its ids.",
                    stacklevel=3,
                )
        if self._visited is None:
            self._visited = torch.zeros(self.num_samples, dtype=torch.bool, device=self.device)
            self._unchecked_revisits = torch.zeros((), dtype=torch.int64, device=self.device)
        else:
            self._visited.zero_()
            self._unchecked_revisits.zero_()
        self._visit_epoch = epoch

    def check_unvisited(self, indices: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the ids of ``indices`` already updated in this epoch (once one was begun).

        Reads the marks on the host (a sync on a GPU): call it only where value checks are on. Ids out of range are
        left to the range check, which may run later (inside a backend).
        """
        if self._visited is None:
            return
        inside = (indices >= 0) & (indices < self.num_samples)
        again = self._visited[indices.clamp(0, self.num_samples - 1)] & inside
        if bool(again.any()):
            raise ValueError(_checks.revisit_message(indices[again].tolist(), self._visit_epoch))

    def mark_visited(self, indices: torch.Tensor) -> None:
        """Mark ``indices`` (already applied to the state) as visited in this epoch, and as scored for good; no host
        sync.

        Revisits are also counted on the device, so that with value checks off :meth:`begin_epoch` can still report
        them. With value checks off the ids were never read, so they are clamped into range first: a bad id marks a
        wrong sample (undefined behaviour, as its update) but never indexes out of bounds.
        """
        indices = indices.clamp(0, self.num_samples - 1)
        self.mark_scored(indices)
        if self._visited is None:
            return
        with torch.no_grad():
            self._unchecked_revisits += self._visited.index_select(0, indices).sum()
            self._visited.index_fill_(0, indices, True)

    def _visits_state(self) -> dict[str, object]:
        if self._visited is None:
            return {}
        return {"visit_epoch": self._visit_epoch, "visited": self._visited.clone()}

    def _checked_visits(self, state_dict: dict[str, object]) -> tuple[int, torch.Tensor] | None:
        """The saved visit marks, checked (None for a state saved before an epoch was begun, or by older versions)."""
        if "visited" not in state_dict:
            return None
        epoch = _checks.check_int("state_dict['visit_epoch']", state_dict.get("visit_epoch"), low=0)
        visited = _checks.check_tensor("state_dict['visited']", state_dict["visited"])
        if visited.dtype != torch.bool or visited.shape != (self.num_samples,):
            raise ValueError(
                f"state_dict['visited'] must be bool of shape ({self.num_samples},), got {visited.dtype} "
                f"{tuple(visited.shape)}"
            )
        return epoch, visited

    def _load_visits(self, visits: tuple[int, torch.Tensor] | None) -> None:
        if visits is None:
            self._visit_epoch = self._visited = self._unchecked_revisits = None
            return
        self._visit_epoch = visits[0]
        self._visited = visits[1].to(self.device, copy=True)
        self._unchecked_revisits = torch.zeros((), dtype=torch.int64, device=self.device)

    def state_dict(self) -> dict[str, object]:
        """Tensors and plain numbers only, so ``torch.load(..., weights_only=True)`` reads it back.

        In a distributed run with ``sync="epoch"`` whose state moved since the last merge it also holds
        ``"sync_snapshot"``, the values all ranks agreed on at that merge: a rank's copy saved mid-epoch holds only
        its own updates since then, and the merge after resuming needs that merge base to stay exact. Save each rank's
        own dict (the sampler's shard is per rank too), or call :meth:`sync_epoch` on every rank first.
        A pending deferred value error is raised first (:meth:`check`).
        """
        self.check()
        saved = {
            "score": self.score.detach().clone(),
            "weight": self.weight.detach().clone(),
            "beta1": self.beta1,
            "beta2": self.beta2,
            "scored": self._scored.clone(),
            **self._visits_state(),
        }
        if self.sync_mode == "epoch" and self._world_size() > 1:
            merge_base = self._merge_base()
            # Right after a merge the merge base is the state itself: loading the values alone restores it then.
            if not (torch.equal(merge_base[0], self.score) and torch.equal(merge_base[1], self.weight)):
                saved["sync_snapshot"] = merge_base.clone()
        saved.update(self._sample_buffers_state_dict())
        return saved

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """Copy a saved state in place (the buffers keep their device and identity). Checks everything first."""
        missing = {"score", "weight", "beta1", "beta2"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        beta1 = _checks.check_fraction("state_dict['beta1']", state_dict["beta1"])
        beta2 = _checks.check_fraction("state_dict['beta2']", state_dict["beta2"])
        tensors = {}
        for key in ("score", "weight"):
            value = _checks.check_tensor(f"state_dict['{key}']", state_dict[key])
            if value.shape != self.score.shape:
                raise ValueError(
                    f"state_dict['{key}'] has shape {tuple(value.shape)}, expected ({self.num_samples},): "
                    "was it saved for another data set?"
                )
            if value.dtype != torch.float32:
                raise TypeError(f"state_dict['{key}'] must be float32, got {value.dtype}")
            if not _checks.all_finite_non_negative(value):
                raise ValueError(f"state_dict['{key}'] must be finite and non-negative (a corrupted checkpoint?)")
            tensors[key] = value
        snapshot = state_dict.get("sync_snapshot")
        if snapshot is not None:
            snapshot = _checks.check_tensor("state_dict['sync_snapshot']", snapshot)
            if snapshot.shape != (2, self.num_samples) or snapshot.dtype != torch.float32:
                raise ValueError(
                    f"state_dict['sync_snapshot'] must be float32 of shape (2, {self.num_samples}), got "
                    f"{snapshot.dtype} {tuple(snapshot.shape)}"
                )
        visits = self._checked_visits(state_dict)
        scored = state_dict.get("scored")
        if scored is not None:
            scored = _checks.check_tensor("state_dict['scored']", scored)
            if scored.dtype != torch.bool or scored.shape != (self.num_samples,):
                raise ValueError(
                    f"state_dict['scored'] must be bool of shape ({self.num_samples},), got {scored.dtype} "
                    f"{tuple(scored.shape)}"
                )
        buffers = self._check_sample_buffers(state_dict)
        # Nothing is assigned before this line: a rejected dict leaves the state (betas included) as it was.
        self.beta1, self.beta2 = beta1, beta2
        self._load_visits(visits)
        # A checkpoint written before the state kept the mask was written under the rule that any sample may be
        # pruned: every sample counts as scored.
        self._scored.copy_(scored if scored is not None else torch.ones_like(self._scored))
        self._load_sample_buffers(*buffers)
        self.score.copy_(tensors["score"])
        self.weight.copy_(tensors["weight"])
        # The loaded values replace everything a pending deferred error was about (its call left no trace anyway).
        self._deferred_error.zero_()
        self._pristine = False
        if snapshot is not None:
            self._sync_snapshot = snapshot.to(self.device, copy=True)
        elif self.sync_mode == "epoch" and self._world_size() > 1:
            # Every rank loaded the same values (one shared file), so they are the agreed merge base.
            self._sync_snapshot = torch.stack([self.score, self.weight])
        else:
            self._sync_snapshot = None

    # ----------------------------------------------------------------- distributed synchronisation

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _merge_base(self) -> torch.Tensor:
        if self._sync_snapshot is not None:
            return self._sync_snapshot
        if self._pristine:
            return torch.full((2, self.num_samples), 1.0 / self.num_samples, dtype=torch.float32, device=self.device)
        return torch.stack([self.score, self.weight])

    def sync_epoch(self) -> None:
        """Merge every rank's updates since the last merge so all ranks hold the same state (``sync="epoch"``).

        A collective: every rank of the group calls it at the same point, e.g. before the sampler plans the next
        epoch (``EvolvedTraining.set_epoch`` does). A no-op without ``torch.distributed``, with one rank, or in the
        ``"step"``/``"off"`` modes.

        Exactness: the sampler gives each sample to at most one rank per epoch, so at every position at most one
        rank's value moved away from the agreed merge base. Each rank contributes its value where it moved and -inf
        elsewhere; an all-reduce MAX of that (2, n) fp32 tensor returns, at every moved position, the moving rank's
        value bit for bit, and -inf where nobody moved (the merge base is kept). The result is bit-identical on all
        ranks and equal to a single process that saw the same samples with the same losses, because each visited
        value was computed from the same merge base. (Summing deltas ``new - old`` instead moves the same 8n bytes
        but adds a rounding: ``old + (new - old)`` is not ``new`` in fp32.) Were a sample moved by two ranks
        between merges, the larger value would win on every rank: ranks still agree, but that is not an exact
        merge; keep such samplers to ``sync="step"``.
        """
        self.check()
        if self.sync_mode != "epoch" or self._world_size() == 1:
            return
        device = communication_device(dist.get_backend(self.process_group), self.device)
        merge_base = self._merge_base()  # becomes the next merge base, overwritten in place
        with torch.no_grad():
            # The (2, n) contribution is the only full-size temporary besides two boolean masks: fresh memory is
            # slow to fault in on the host, and at n > 2**24 each extra buffer is 134 MB.
            moved = torch.stack([self.score, self.weight])
            moved.masked_fill_(moved == merge_base, -torch.inf)
            shipped = moved.to(device)
            dist.all_reduce(shipped, op=dist.ReduceOp.MAX, group=self.process_group)
            moved = shipped.to(self.device)
            torch.where(moved == -torch.inf, merge_base, moved, out=merge_base)
            self.score.copy_(merge_base[0])
            self.weight.copy_(merge_base[1])
        self._sync_snapshot = merge_base
        self._sync_scored(device)
        self._sync_sample_buffers(device)

    def _sync_scored(self, device: torch.device) -> None:
        # The marks only ever turn on, so the union over ranks (MAX over 0/1 bytes, n bytes) is the merged mask; it
        # cannot be read off the merged values, which a visit may leave unchanged (beta1 = beta2 = 1).
        marks = self._scored.to(device, torch.uint8)
        dist.all_reduce(marks, op=dist.ReduceOp.MAX, group=self.process_group)
        self._scored.copy_(marks.to(self.device, torch.bool))

    def sync_step(
        self, indices: torch.Tensor, losses: torch.Tensor, *, check_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Share this step's update with the other ranks and apply theirs (``sync="step"``).

        Call it after the local update (``evolved_select`` or ``observe``) with the same dataset ``indices`` and
        fp32 ``losses``, on every rank at every step (an empty ``indices`` when a rank has no rows). The ids travel
        as int64 and the losses as fp32 in two separate all-gathers: packing both in one float tensor would round
        ids above 2**24. Other ranks' updates are applied in rank order with the reference rule, which every backend
        reproduces bit for bit, so the states stay bit-identical on all ranks after every step.

        Returns the ids and losses of all ranks in rank order (this rank's included). Outside ``"step"`` mode, or
        without ``torch.distributed``, nothing is communicated and the checked local tensors come back.
        Bad arguments raise before any communication and leave the state untouched.
        """
        indices = _checks.check_step_indices("indices", indices, self.num_samples, self.device, check_values)
        losses = _checks.check_losses("losses", losses, indices.numel(), self.device, check_values)
        losses = losses.detach().to(torch.float32)
        world_size = self._world_size()
        if self.sync_mode != "step" or world_size == 1:
            return indices, losses
        group = self.process_group
        rank = dist.get_rank(group)
        device = communication_device(dist.get_backend(group), self.device)
        # Ranks may hold different row counts (padding rows dropped): gather the counts, pad to the largest.
        count = torch.tensor([indices.numel()], dtype=torch.int64, device=device)
        counts = [torch.empty_like(count) for _ in range(world_size)]
        dist.all_gather(counts, count, group=group)
        sizes = [int(c) for c in counts]
        width = max(sizes)
        padded_ids = torch.zeros(width, dtype=torch.int64, device=device)
        padded_ids[: indices.numel()] = indices.to(device)
        padded_losses = torch.zeros(width, dtype=torch.float32, device=device)
        padded_losses[: losses.numel()] = losses.to(device)
        all_ids = [torch.empty_like(padded_ids) for _ in range(world_size)]
        all_losses = [torch.empty_like(padded_losses) for _ in range(world_size)]
        dist.all_gather(all_ids, padded_ids, group=group)
        dist.all_gather(all_losses, padded_losses, group=group)
        all_ids = [ids[:size].to(self.device) for ids, size in zip(all_ids, sizes, strict=True)]
        all_losses = [values[:size].to(self.device) for values, size in zip(all_losses, sizes, strict=True)]
        with torch.no_grad():
            for other, (ids, values) in enumerate(zip(all_ids, all_losses, strict=True)):
                if other != rank and ids.numel() > 0:
                    ema_update_(self.score, self.weight, ids, values, self.beta1, self.beta2)
                    self.mark_scored(ids)
        return torch.cat(all_ids), torch.cat(all_losses)

    # ----------------------------------------------------------------- extra per-sample buffers (selection policies)
    # Policies other than ES keep their own per-sample quantities (InfoBatch's latest loss, UCB's loss EMAs,
    # KAKURENBO's loss, correctness and confidence) as named fp32 buffers of length n. They are saved, resumed and
    # merged across ranks exactly like score and weight: the same masked MAX merge against the agreed merge base.

    def _init_sample_buffers(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._buffer_initial: dict[str, float] = {}
        self._buffer_snapshot: torch.Tensor | None = None  # (len(buffers), n) merge_base, like _sync_snapshot

    def register_sample_buffer(self, name: str, initial: float) -> torch.Tensor:
        """Add a named fp32 per-sample buffer filled with ``initial`` (not NaN, not -inf); returns it.

        Register before training and before ``load_state_dict``; registering the same name twice raises.
        """
        if not isinstance(name, str) or not name or name in ("score", "weight"):
            raise ValueError(f"name must be a new non-empty string other than 'score'/'weight', got {name!r}")
        if name in self._buffers:
            raise ValueError(f"sample buffer {name!r} is already registered")
        initial = float(initial)
        if math.isnan(initial) or initial == -math.inf:
            raise ValueError(f"initial must not be NaN or -inf (the merge's 'unchanged' mark), got {initial}")
        self._buffers[name] = torch.full((self.num_samples,), initial, dtype=torch.float32, device=self.device)
        self._buffer_initial[name] = initial
        self._buffer_snapshot = None
        return self._buffers[name]

    def sample_buffer(self, name: str) -> torch.Tensor:
        """The registered per-sample buffer ``name`` (updated in place by its policy)."""
        if name not in self._buffers:
            raise KeyError(f"no sample buffer {name!r}; registered: {sorted(self._buffers)}")
        return self._buffers[name]

    @property
    def sample_buffer_names(self) -> tuple[str, ...]:
        return tuple(self._buffers)

    def _stacked_buffers(self) -> torch.Tensor:
        return torch.stack(list(self._buffers.values()))

    def _buffer_merge_base(self) -> torch.Tensor:
        if self._buffer_snapshot is not None:
            return self._buffer_snapshot
        if self._pristine:
            initial = torch.tensor(list(self._buffer_initial.values()), dtype=torch.float32, device=self.device)
            return initial.unsqueeze(1).expand(-1, self.num_samples).clone()
        return self._stacked_buffers()

    def _sample_buffers_state_dict(self) -> dict[str, object]:
        if not self._buffers:
            return {}
        saved: dict[str, object] = {"sample_buffers": {k: v.detach().clone() for k, v in self._buffers.items()}}
        if self.sync_mode == "epoch" and self._world_size() > 1:
            merge_base = self._buffer_merge_base()
            if not torch.equal(merge_base, self._stacked_buffers()):
                saved["sample_buffers_snapshot"] = merge_base.clone()
        return saved

    def _check_sample_buffers(self, state_dict: dict[str, object]) -> tuple[dict, torch.Tensor | None]:
        saved = state_dict.get("sample_buffers", {})
        if not isinstance(saved, dict) or set(saved) != set(self._buffers):
            names = sorted(saved) if isinstance(saved, dict) else saved
            raise ValueError(
                f"state_dict['sample_buffers'] holds {names} but this state has {sorted(self._buffers)}: was it "
                "saved by another method?"
            )
        for name, value in saved.items():
            value = _checks.check_tensor(f"state_dict['sample_buffers']['{name}']", value)
            if value.shape != (self.num_samples,) or value.dtype != torch.float32:
                raise ValueError(
                    f"state_dict['sample_buffers']['{name}'] must be float32 of shape ({self.num_samples},), got "
                    f"{value.dtype} {tuple(value.shape)}"
                )
            if bool(torch.isnan(value).any()) or bool((value == -math.inf).any()):
                raise ValueError(f"state_dict['sample_buffers']['{name}'] holds NaN or -inf (a corrupted checkpoint?)")
        snapshot = state_dict.get("sample_buffers_snapshot")
        if snapshot is not None:
            snapshot = _checks.check_tensor("state_dict['sample_buffers_snapshot']", snapshot)
            if snapshot.shape != (len(self._buffers), self.num_samples) or snapshot.dtype != torch.float32:
                raise ValueError(
                    f"state_dict['sample_buffers_snapshot'] must be float32 of shape ({len(self._buffers)}, "
                    f"{self.num_samples}), got {snapshot.dtype} {tuple(snapshot.shape)}"
                )
        return saved, snapshot

    def _load_sample_buffers(self, saved: dict, snapshot: torch.Tensor | None) -> None:
        for name, value in saved.items():
            self._buffers[name].copy_(value)
        if snapshot is not None:
            self._buffer_snapshot = snapshot.to(self.device, copy=True)
        elif self._buffers and self.sync_mode == "epoch" and self._world_size() > 1:
            self._buffer_snapshot = self._stacked_buffers()
        else:
            self._buffer_snapshot = None

    def _sync_sample_buffers(self, device: torch.device) -> None:
        """The masked MAX merge of :meth:`sync_epoch`, for the registered buffers (same exactness argument)."""
        if not self._buffers:
            return
        merge_base = self._buffer_merge_base()
        with torch.no_grad():
            moved = self._stacked_buffers()
            moved.masked_fill_(moved == merge_base, -torch.inf)
            shipped = moved.to(device)
            dist.all_reduce(shipped, op=dist.ReduceOp.MAX, group=self.process_group)
            moved = shipped.to(self.device)
            torch.where(moved == -torch.inf, merge_base, moved, out=merge_base)
            for row, buffer in enumerate(self._buffers.values()):
                buffer.copy_(merge_base[row])
        self._buffer_snapshot = merge_base
