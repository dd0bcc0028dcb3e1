"""Where an es-vit run executes: device, rank and precision, and the few collectives the loop needs.

Precision: ``--precision auto`` is bf16 autocast on CUDA (fp16 with a GradScaler where bf16 is unsupported) and
fp32 on the CPU, where bf16 autocast is slower than fp32 on most processors; ``--precision bf16`` forces it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

from es_kernels.train.vit.config import ConfigError


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    distributed: bool
    owns_group: bool  # we initialised torch.distributed, so we tear it down
    precision: str  # bf16, fp16 or fp32 (auto resolved)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def resolve_runtime(args: argparse.Namespace) -> Runtime:
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise ConfigError("--device cuda but no CUDA device is available")
    use_cuda = cuda if args.device == "auto" else args.device == "cuda"
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if use_cuda else "fp32"
    if precision == "fp16" and not use_cuda:
        raise ConfigError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if args.batch_size % world_size:
        raise ConfigError(f"--batch-size {args.batch_size} (global) must divide evenly over {world_size} ranks")
    return Runtime(device, rank, world_size, world_size > 1, False, precision)


def start_distributed(runtime: Runtime) -> None:
    if not runtime.distributed:
        return
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")
        runtime.owns_group = True


def all_sum(runtime: Runtime, *values: float) -> list[float]:
    """Sums over ranks (float64 on the wire: counts of up to 2**53 stay exact)."""
    if not runtime.distributed:
        return list(values)
    device = runtime.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(runtime: Runtime, value: Any) -> list[Any]:
    if not runtime.distributed:
        return [value]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value
