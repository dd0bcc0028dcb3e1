"""How data-parallel ranks keep one EvolvedState: the exact epoch merge against the agreed merge base, the per-step
exchange of ids and losses, and where the collectives' tensors live. Knows tensors and process groups, not the
update rule: the state decides what its per-sample buffers are and how a step is applied."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

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


class RankSync:
    """One state's synchronisation over ``group`` in ``mode`` (see ``EvolvedState``'s ``sync``), and its merge base.

    ``merge_base`` is the (k, n) fp32 values of the state's k per-sample buffers that all ranks agreed on at the last
    merge, or None: then the state knows it (its initial values, or its values as loaded), and a single-process run
    never pays its 4kn bytes.
    """

    def __init__(self, mode: str, group: dist.ProcessGroup | None) -> None:
        if not isinstance(mode, str) or mode not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {mode!r}")
        if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
            )
        self.mode = mode
        self.group = group
        self.merge_base: torch.Tensor | None = None

    def world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def merges_epochs(self) -> bool:
        """Whether :meth:`merge_epoch` communicates (so the merge base must be kept, saved and restored)."""
        return self.mode == "epoch" and self.world_size() > 1

    def shares_steps(self) -> bool:
        return self.mode == "step" and self.world_size() > 1

    def _device(self, state_device: torch.device) -> torch.device:
        return communication_device(dist.get_backend(self.group), state_device)

    def merge_epoch(self, buffers: Sequence[torch.Tensor], merge_base: torch.Tensor, marks: torch.Tensor) -> None:
        """Merge every rank's moves of ``buffers`` away from ``merge_base`` (k, n) and the union of the bool
        ``marks``, in place; ``merge_base`` is overwritten with the merged values and kept as the next one.

        Exactness: the sampler gives each sample to at most one rank per epoch, so at every position at most one
        rank's value moved away from the agreed merge base. Each rank contributes its value where it moved and -inf
        elsewhere (no buffer may hold -inf); an all-reduce MAX of that (k, n) fp32 tensor returns, at every moved
        position, the moving rank's value bit for bit, and -inf where nobody moved (the merge base is kept). The
        result is bit-identical on all ranks and equal to a single process that saw the same samples with the same
        losses, because each visited value was computed from the same merge base. (Summing deltas ``new - old``
        instead moves the same bytes but adds a rounding: ``old + (new - old)`` is not ``new`` in fp32.) Were a
        sample moved by two ranks between merges, the larger value would win on every rank: ranks still agree, but
        that is not an exact merge.
        """
        device = self._device(merge_base.device)
        with torch.no_grad():
            # The (k, n) contribution is the only full-size temporary besides two boolean masks: fresh memory is
            # slow to fault in on the host, and at n > 2**24 each extra row is 67 MB.
            moved = torch.stack(list(buffers))
            moved.masked_fill_(moved == merge_base, -torch.inf)
            shipped = moved.to(device)
            dist.all_reduce(shipped, op=dist.ReduceOp.MAX, group=self.group)
            moved = shipped.to(merge_base.device)
            torch.where(moved == -torch.inf, merge_base, moved, out=merge_base)
            for row, buffer in zip(merge_base, buffers, strict=True):
                buffer.copy_(row)
            # Marks only ever turn on, so the union over ranks (MAX over 0/1 bytes) is the merged mask; it cannot be
            # read off the merged values, which a visit may leave unchanged (beta1 = beta2 = 1).
            shipped = marks.to(device, torch.uint8)
            dist.all_reduce(shipped, op=dist.ReduceOp.MAX, group=self.group)
            marks.copy_(shipped.to(marks.device, torch.bool))
        self.merge_base = merge_base

    def gather_step(self, indices: torch.Tensor, losses: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """Every rank's step ids (int64) and fp32 losses, in rank order, on the state's device; a collective.

        The ids travel as int64 and the losses as fp32 in two separate all-gathers: packing both in one float
        tensor would round ids above 2**24.
        """
        world_size, group = self.world_size(), self.group
        device = self._device(indices.device)
        # Ranks may hold different row counts (padding rows dropped): gather the counts, pad to the largest.
        count = torch.tensor([indices.numel()], dtype=torch.int64, device=device)
        counts = [torch.empty_like(count) for _ in range(world_size)]
        dist.all_gather(counts, count, group=group)
        sizes = torch.cat(counts).tolist()  # one host read, not one per rank
        width = max(sizes)
        gathered = []
        for local in (indices, losses):
            padded = torch.zeros(width, dtype=local.dtype, device=device)
            padded[: local.numel()] = local.to(device)
            parts = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(parts, padded, group=group)
            gathered.append([part[:size].to(indices.device) for part, size in zip(parts, sizes, strict=True)])
        return tuple(gathered)

    def rank(self) -> int:
        return dist.get_rank(self.group)
