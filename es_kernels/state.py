"""EvolvedState: the per-sample score ``s`` and weight ``w`` of Evolved Sampling, their update rule, and the selection
policies' per-sample buffers kept beside them in one table (saved, loaded and merged across ranks by one path)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist

from es_kernels import _checks
from es_kernels.distributed import RankSync
from es_kernels.reference.update import ema_update_

# The saved layout: score and weight at the top level with their merge-base rows under "sync_snapshot", the
# policies' buffers under "sample_buffers" with theirs under "sample_buffers_snapshot". Every checkpoint written so far
# uses it, so it stays, though in memory they are one table of buffers with one merge base.
ES_BUFFERS = ("score", "weight")
SNAPSHOT_ROWS = (
    ("sync_snapshot", slice(0, len(ES_BUFFERS))),
    ("sample_buffers_snapshot", slice(len(ES_BUFFERS), None)),
)


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
            the copies exactly at the epoch boundary with one all-reduce of 4 bytes per sample and per-sample buffer
            (8 for ``s`` and ``w`` alone) and one of 1 byte for the ``scored`` marks. ``"step"``: :meth:`sync_step`
            all-gathers every step's ids and losses and every rank applies every rank's update.
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
        self._sync = RankSync(sync, process_group)
        # Every per-sample fp32 quantity, ES's own first: one table, so saving, loading, checking and the epoch merge
        # have one path for all of them. Each keeps its tensor for good (kernels, CUDA graphs and compiled code
        # hold it), so nothing here is ever reallocated.
        self._buffers: dict[str, torch.Tensor] = {}
        self._initial: dict[str, float] = {}
        self.score = self._add_buffer("score", 1.0 / num_samples, num_samples, device)
        self.weight = self._add_buffer("weight", 1.0 / num_samples, num_samples, device)
        # Which samples have been scored at least once (any update, on any rank): pruning never drops one that has
        # not, since its 1/n weight says nothing about it (see ``scored``).
        self._scored = torch.zeros(num_samples, dtype=torch.bool, device=device)
        # The epoch merge's base where RankSync keeps none (a single process never pays for one): the initial values
        # until a load_state_dict, the values themselves after one.
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

    @property
    def sync_mode(self) -> str:
        return self._sync.mode

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return self._sync.group

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
        self, indices: torch.Tensor, *, losses=None, labels_a=None, labels_b=None, soft_targets=None, classes: int = 0
    ) -> DeferredGuard:
        """Before a deferred-checked update: the call's input value checks, the ids clamped into range (what the
        update must use) and the old (score, weight) at them. Nothing is read on the host."""
        if _native_deferred_checks(self.device):
            safe, snapshot, status = torch.ops.es_kernels_C.deferred_guard(
                self.score, self.weight, indices, self._visited, labels_a, labels_b, classes, losses, soft_targets,
                None, -100,  # token targets: language models' losses reach the op already computed
            )  # fmt: skip
            return DeferredGuard(safe, snapshot, status=status)
        checks = _checks.DeviceChecks(self.device)
        checks.indices(indices, self.num_samples, self._visited)
        if losses is not None:
            checks.losses(losses, computed=False)
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

    # ----------------------------------------------------------------- per-sample buffers
    # Policies other than ES keep their own per-sample quantities (InfoBatch's latest loss, UCB's loss EMAs,
    # KAKURENBO's loss, correctness and confidence) as named buffers beside score and weight, in the same table: saved,
    # resumed and merged across ranks exactly like them.

    def _add_buffer(self, name: str, initial: float, num_samples: int, device) -> torch.Tensor:
        buffer = torch.full((num_samples,), initial, dtype=torch.float32, device=device)
        self._buffers[name] = buffer
        self._initial[name] = initial
        base = self._sync.merge_base
        if base is not None:
            # Every rank registers the same buffer with the same initial value: that is what they agree on.
            self._sync.merge_base = torch.cat((base, buffer.unsqueeze(0)))
        return buffer

    def register_sample_buffer(self, name: str, initial: float) -> torch.Tensor:
        """Add a named fp32 per-sample buffer filled with ``initial`` (not NaN, not -inf); returns it.

        Register before training and before ``load_state_dict``; registering the same name twice raises.
        """
        if not isinstance(name, str) or not name or name in ES_BUFFERS:
            raise ValueError(f"name must be a new non-empty string other than 'score'/'weight', got {name!r}")
        if name in self._buffers:
            raise ValueError(f"sample buffer {name!r} is already registered")
        initial = float(initial)
        if math.isnan(initial) or initial == -math.inf:
            raise ValueError(f"initial must not be NaN or -inf (the merge's 'unchanged' mark), got {initial}")
        return self._add_buffer(name, initial, self.num_samples, self.device)

    def sample_buffer(self, name: str) -> torch.Tensor:
        """The registered per-sample buffer ``name`` (updated in place by its policy)."""
        if name in ES_BUFFERS or name not in self._buffers:  # the policies ask every step: no tuple built
            raise KeyError(f"no sample buffer {name!r}; registered: {sorted(self.sample_buffer_names)}")
        return self._buffers[name]

    @property
    def sample_buffer_names(self) -> tuple[str, ...]:
        """The buffers registered by :meth:`register_sample_buffer` (score and weight are not among them)."""
        return tuple(self._buffers)[len(ES_BUFFERS) :]

    def _stacked(self) -> torch.Tensor:
        return torch.stack(list(self._buffers.values()))

    def _merge_base(self) -> torch.Tensor:
        """(buffers, n): the values all ranks agreed on at the last merge (overwritten in place by the next)."""
        if self._sync.merge_base is not None:
            return self._sync.merge_base
        if self._pristine:
            initial = torch.tensor(list(self._initial.values()), dtype=torch.float32, device=self.device)
            return initial.unsqueeze(1).expand(-1, self.num_samples).clone()
        return self._stacked()

    # ----------------------------------------------------------------- saving and resuming

    def state_dict(self) -> dict[str, object]:
        """Tensors and plain numbers only, so ``torch.load(..., weights_only=True)`` reads it back.

        In a distributed run with ``sync="epoch"`` whose state moved since the last merge it also holds
        ``"sync_snapshot"`` (and ``"sample_buffers_snapshot"`` for the registered buffers), the values all ranks
        agreed on at that merge: a rank's copy saved mid-epoch holds only its own updates since then, and the merge
        after resuming needs that merge base to stay exact. Save each rank's own dict (the sampler's shard is per rank
        too), or call :meth:`sync_epoch` on every rank first. A pending deferred value error is raised first
        (:meth:`check`).
        """
        self.check()
        saved: dict[str, object] = {"beta1": self.beta1, "beta2": self.beta2, "scored": self._scored.clone()}
        saved.update(self._visits_state())
        for name, buffer in self._buffers.items():
            where = saved if name in ES_BUFFERS else saved.setdefault("sample_buffers", {})
            where[name] = buffer.detach().clone()
        if self._sync.merges_epochs():
            merge_base, values = self._merge_base(), self._stacked()
            for key, rows in SNAPSHOT_ROWS:
                # Right after a merge the merge base is the state itself: loading the values alone restores it then.
                if merge_base[rows].numel() and not torch.equal(merge_base[rows], values[rows]):
                    saved[key] = merge_base[rows].clone()
        return saved

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Copy a saved state in place (the buffers keep their device and identity). Checks everything first: a
        rejected dict raises naming its key and leaves the state as it was."""
        missing = {*ES_BUFFERS, "beta1", "beta2"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        beta1 = _checks.check_fraction("state_dict['beta1']", state_dict["beta1"])
        beta2 = _checks.check_fraction("state_dict['beta2']", state_dict["beta2"])
        values = self._checked_buffers(state_dict)
        snapshots = self._checked_snapshots(state_dict)
        visits = self._checked_visits(state_dict)
        scored = state_dict.get("scored")
        if scored is not None:
            scored = _checks.check_tensor("state_dict['scored']", scored)
            if scored.dtype != torch.bool or scored.shape != (self.num_samples,):
                raise ValueError(
                    f"state_dict['scored'] must be bool of shape ({self.num_samples},), got {scored.dtype} "
                    f"{tuple(scored.shape)}"
                )
        # Nothing is assigned before this line: a rejected dict leaves the state (betas included) as it was.
        self.beta1, self.beta2 = beta1, beta2
        self._load_visits(visits)
        # A checkpoint written before the state kept the mask was written under the rule that any sample may be
        # pruned: every sample counts as scored.
        self._scored.copy_(scored if scored is not None else torch.ones_like(self._scored))
        for name, value in values.items():
            self._buffers[name].copy_(value)
        # The loaded values replace everything a pending deferred error was about (its call left no trace anyway).
        self._deferred_error.zero_()
        self._pristine = False
        self._sync.merge_base = None
        if snapshots or self._sync.merges_epochs():
            # Every rank loaded the same values (one shared file), so where no merge base was saved they are it.
            merge_base = self._stacked()
            for key, rows in SNAPSHOT_ROWS:
                if key in snapshots:
                    merge_base[rows] = snapshots[key]
            self._sync.merge_base = merge_base

    def _checked_buffers(self, state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
        saved = state_dict.get("sample_buffers", {})
        registered = self.sample_buffer_names
        if not isinstance(saved, Mapping) or set(saved) != set(registered):
            names = sorted(saved) if isinstance(saved, Mapping) else saved
            raise ValueError(
                f"state_dict['sample_buffers'] holds {names} but this state has {sorted(registered)}: was it saved "
                "by another method?"
            )
        values = {}
        for name in self._buffers:
            if name in ES_BUFFERS:
                key, value = f"state_dict['{name}']", state_dict[name]
            else:
                key, value = f"state_dict['sample_buffers']['{name}']", saved[name]
            value = _checks.check_tensor(key, value)
            if value.shape != (self.num_samples,):
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}, expected ({self.num_samples},): was it saved for another "
                    "data set?"
                )
            if value.dtype != torch.float32:
                raise TypeError(f"{key} must be float32, got {value.dtype}")
            self._check_buffer_values(key, name, value)
            values[name] = value
        return values

    def _checked_snapshots(self, state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
        names = list(self._buffers)
        snapshots = {}
        for key, rows in SNAPSHOT_ROWS:
            snapshot = state_dict.get(key)
            if snapshot is None:
                continue
            snapshot = _checks.check_tensor(f"state_dict['{key}']", snapshot)
            expected = (len(names[rows]), self.num_samples)
            if snapshot.shape != expected or snapshot.dtype != torch.float32:
                raise ValueError(
                    f"state_dict['{key}'] must be float32 of shape {expected}, got {snapshot.dtype} "
                    f"{tuple(snapshot.shape)}"
                )
            for row, name in zip(snapshot, names[rows], strict=True):
                self._check_buffer_values(f"state_dict['{key}'] (the row of {name!r})", name, row)
            snapshots[key] = snapshot
        return snapshots

    @staticmethod
    def _check_buffer_values(key: str, name: str, value: torch.Tensor) -> None:
        # s and w are race weights; the policies' buffers may hold +inf ("never observed"), but -inf is the merge's
        # "unchanged" mark and NaN would never compare equal to the merge base.
        if name in ES_BUFFERS:
            if not _checks.all_finite_non_negative(value):
                raise ValueError(f"{key} must be finite and non-negative (a corrupted checkpoint?)")
        elif bool(torch.isnan(value).any()) or bool((value == -math.inf).any()):
            raise ValueError(f"{key} holds NaN or -inf (a corrupted checkpoint?)")

    # ----------------------------------------------------------------- distributed synchronisation (distributed.py)

    def sync_epoch(self) -> None:
        """Merge every rank's updates since the last merge so all ranks hold the same state (``sync="epoch"``).

        A collective: every rank of the group calls it at the same point, e.g. before the sampler plans the next
        epoch (``EvolvedTraining.set_epoch`` does). A no-op without ``torch.distributed``, with one rank, or in the
        ``"step"``/``"off"`` modes. Every per-sample buffer and the ``scored`` marks are merged exactly, as a single
        process that saw the same samples with the same losses would hold them, provided each sample moved on at
        most one rank since the last merge (what the sampler's shards give; see ``RankSync.merge_epoch``); samplers
        that hand a sample to several ranks in one epoch need ``sync="step"``.
        """
        self.check()
        if self._sync.merges_epochs():
            self._sync.merge_epoch(list(self._buffers.values()), self._merge_base(), self._scored)

    def sync_step(
        self, indices: torch.Tensor, losses: torch.Tensor, *, check_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Share this step's update with the other ranks and apply theirs (``sync="step"``).

        Call it after the local update (``evolved_select`` or ``observe``) with the same dataset ``indices`` and
        fp32 ``losses``, on every rank at every step (an empty ``indices`` when a rank has no rows). Other ranks'
        updates are applied in rank order with the reference rule, which every backend reproduces bit for bit, so
        the states stay bit-identical on all ranks after every step.

        Returns the ids and losses of all ranks in rank order (this rank's included). Outside ``"step"`` mode, or
        without ``torch.distributed``, nothing is communicated and the checked local tensors come back.
        Bad arguments raise before any communication and leave the state untouched.
        """
        indices = _checks.check_step_indices("indices", indices, self.num_samples, self.device, check_values)
        losses = _checks.check_losses("losses", losses, indices.numel(), self.device, check_values)
        losses = losses.detach().to(torch.float32)
        if not self._sync.shares_steps():
            return indices, losses
        all_ids, all_losses = self._sync.gather_step(indices, losses)
        rank = self._sync.rank()
        with torch.no_grad():
            for other, (ids, values) in enumerate(zip(all_ids, all_losses, strict=True)):
                if other != rank and ids.numel() > 0:
                    ema_update_(self.score, self.weight, ids, values, self.beta1, self.beta2)
                    self.mark_scored(ids)
        return torch.cat(all_ids), torch.cat(all_losses)
