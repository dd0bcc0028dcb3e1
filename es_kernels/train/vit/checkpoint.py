"""Checkpoints of an es-vit run (written atomically, read with ``weights_only``) and the random streams they hold."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from es_kernels.train.vit.config import ConfigError
from es_kernels.train.vit.runtime import Runtime

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # mmap: every rank reads the file, and a ViT-L checkpoint with AdamW moments is ~3.6 GB
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConfigError(f"cannot read checkpoint {path} to resume: {type(error).__name__}: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not an es-vit checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename over the old checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk or an interrupt mid-write: the old checkpoint stands, and no half file is left beside it.
        tmp.unlink(missing_ok=True)
        raise


def seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Every global random stream seeded with ``seed`` inside (Python's too: timm's crops draw from it), each put
    back as it was on the way out."""
    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed_all(seed)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def rng_state(runtime: Runtime) -> dict[str, Any]:
    """All global random streams of this rank (augmentation, drop-path, mixup, loader seeds), in a form
    ``torch.load(weights_only=True)`` accepts (numpy's key array becomes a tensor)."""
    import numpy as np

    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def set_rng_state(runtime: Runtime, state: dict[str, Any]) -> None:
    import numpy as np

    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], runtime.device)
