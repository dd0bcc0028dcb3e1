"""Data utilities: ids that travel with the batch, reproducible label noise for robustness runs, and cached
pre-training that comes out the same on every machine."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from es_kernels import _checks


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so each item starts with its dataset id: ``(id, *item)``.

    The ids travel inside the batch through any DataLoader (workers, prefetching, pinning), so the state is always
    updated for the samples that were actually scored; no side channel, no patched DataLoader internals.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (index, *item) if isinstance(item, tuple) else (index, item)


@contextlib.contextmanager
def cacheable_threads() -> Iterator[None]:
    """One torch thread inside, the caller's count restored after: for a pre-training whose weights are cached.

    A CPU kernel splits its sums by thread, so the same seeded pre-training gives other weights at another thread
    count (the demo ViT's differed after 2 epochs at 1 and 2 threads). The cache key cannot hold the count of the
    run that happens to build the cache, so every later run, whatever its ``--threads``, would fine-tune from
    weights that depend on the first run's: the demos' accuracies then moved by up to 4 points between machines
    with the same command. At one thread they are the same everywhere the kernels are.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


NOISE_MODES = ("uniform", "flip")


def parse_label_noise(text: str) -> tuple[str, float] | None:
    """The ``--noise`` option of every training command: ``none`` or ``MODE:RATE`` -> None or ``(mode, rate)``."""
    if text == "none":
        return None
    mode, _, rate = text.partition(":")
    if mode not in NOISE_MODES or not rate:
        raise argparse.ArgumentTypeError(f"must be 'none' or MODE:RATE with MODE in {NOISE_MODES}, got {text!r}")
    try:
        value = float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate must be a number, got {rate!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"rate must be in [0, 1), got {value}")
    return mode, value


def corrupt_labels(
    labels: torch.Tensor, rate: float, *, num_classes: int, mode: str = "uniform", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(noisy_labels, corrupted_mask)`` with exactly ``round(rate * n)`` labels changed.

    ``uniform``: each corrupted label becomes one of the other ``num_classes - 1`` classes, uniformly.
    ``flip``: each corrupted label becomes the next class, ``(y + 1) % num_classes`` (class-dependent noise).
    The chosen samples and new labels depend only on ``seed``; the global RNG is untouched.
    """
    labels = _checks.check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise TypeError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    rate = _checks.check_fraction("rate", rate)
    num_classes = _checks.check_int("num_classes", num_classes, low=2)
    if mode not in NOISE_MODES:
        raise ValueError(f"mode must be one of {NOISE_MODES}, got {mode!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    generator = torch.Generator().manual_seed(seed)
    labels_cpu = labels.cpu().to(torch.int64)
    count = round(rate * labels_cpu.numel())
    chosen = torch.randperm(labels_cpu.numel(), generator=generator)[:count]
    if mode == "uniform":
        shift = torch.randint(1, num_classes, (count,), generator=generator)
    else:
        shift = torch.ones(count, dtype=torch.int64)
    noisy = labels_cpu.clone()
    noisy[chosen] = (labels_cpu[chosen] + shift) % num_classes
    mask = torch.zeros(labels_cpu.numel(), dtype=torch.bool)
    mask[chosen] = True
    return noisy.to(device=labels.device, dtype=labels.dtype), mask.to(labels.device)
