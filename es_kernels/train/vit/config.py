"""The settings of an es-vit run and their checks: every bad setting is a ``ConfigError`` raised before training.

``check_arguments`` needs the settings alone; ``check_data`` reads the data folder; the model's checks are in
:mod:`es_kernels.train.vit.model`. ``run_config`` is what a log records and a resume compares (``RESUME_KEYS``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A bad setting found before training; the CLI turns it into ``SystemExit`` with this message."""


# Settings a resumed run must share with the checkpoint (others, e.g. --workers or --no-progress, may change).
RESUME_KEYS = (
    "method",
    "model",
    "model_kwargs",
    "epochs",
    "batch_size",
    "lr",
    "pct_start",
    "weight_decay",
    "select_ratio",
    "prune_ratio",
    "betas",
    "method_settings",
    "anneal",
    "label_noise",
    "label_smoothing",
    "mixup",
    "cutmix",
    "seed",
    "world_size",
    "precision",
)


def check_arguments(args: argparse.Namespace) -> None:
    """Checks of the settings alone (no files, no model): all run before anything is built."""
    if args.data is None and not args.demo:
        raise ConfigError("--data is required (an ImageFolder root with train/ and val/), or run --demo")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0.0 < args.select_ratio <= 1.0:
        raise ConfigError(
            f"--select-ratio must be in (0, 1] (the fraction of each meta-batch trained), got {args.select_ratio}"
        )
    if args.prune_ratio is not None and not 0.0 <= args.prune_ratio < 1.0:
        raise ConfigError(
            f"--prune-ratio must be in [0, 1) (the fraction of the data set dropped per epoch; 1 would drop "
            f"everything), got {args.prune_ratio}"
        )
    if args.betas is not None and not all(0.0 <= b <= 1.0 for b in args.betas):
        raise ConfigError(f"--betas must both be in [0, 1], got {list(args.betas)}")
    unused = sorted({method for method, _, _ in getattr(args, "method_settings", [])} - set(args.method))
    if unused:
        raise ConfigError(f"--method-settings names {unused}, which --method does not run")
    start, end = args.anneal
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0 and start + end <= 1.0):
        raise ConfigError(f"--anneal START END must be fractions in [0, 1] with START + END <= 1, got {start} {end}")
    for name in ("lr", "weight_decay", "label_smoothing", "mixup", "cutmix", "drop_path", "hflip"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    if args.label_smoothing >= 1.0 or args.drop_path >= 1.0 or not 0.0 < args.pct_start < 1.0:
        raise ConfigError("--label-smoothing and --drop-path must be below 1, --pct-start in (0, 1)")
    if not 0.0 < args.scale[0] <= args.scale[1] <= 1.0:
        raise ConfigError(f"--scale MIN MAX must satisfy 0 < MIN <= MAX <= 1, got {list(args.scale)}")
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after must be at least 1, got {args.stop_after}")
    if args.pretrained and args.checkpoint is not None:
        raise ConfigError("--pretrained and --checkpoint both give initial weights; pass one")
    if args.workers < 0 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--workers must be >= 0 and --threads >= 1")
    if args.from_scratch and not args.demo:
        raise ConfigError("--from-scratch skips the demo's pre-training; it needs --demo")
    if args.pretrain_epochs < 1:
        raise ConfigError(f"--pretrain-epochs must be at least 1, got {args.pretrain_epochs}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be at least 1, got {args.eval_batch_size}")


def check_data(root: Path) -> tuple[Any, Any]:
    """The train and val ImageFolders (no transforms yet), or a ConfigError saying what is missing."""
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise ConfigError(f"data folder {root} does not exist (expected an ImageFolder root with train/ and val/)")
    sets = []
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"data folder {root} has no {split}/ subfolder (expected train/ and val/)")
        try:
            sets.append(ImageFolder(str(root / split)))
        except (FileNotFoundError, OSError) as error:
            raise ConfigError(f"{root / split} is not a usable ImageFolder: {error}") from None
    train_set, val_set = sets
    if train_set.classes != val_set.classes:
        raise ConfigError(f"train/ and val/ of {root} have different class folders")
    if len(train_set.classes) < 2:
        raise ConfigError(f"{root / 'train'} has {len(train_set.classes)} class folder(s); need at least 2")
    return train_set, val_set


def run_config(args: argparse.Namespace, method: str, world_size: int, precision: str) -> dict[str, Any]:
    """The settings that define a run, JSON-ready (logged, and compared when resuming)."""
    config = {key: value for key, value in vars(args).items() if key not in ("method", "demo")}
    # Only this method's settings, None when there are none: a checkpoint written before the option compares equal.
    config.update(method=method, world_size=world_size, precision=precision)
    config["method_settings"] = method_settings(args, method) or None
    return json.loads(json.dumps(config, default=str))


def method_settings(args: argparse.Namespace, method: str) -> dict[str, object]:
    """``--method-settings`` of ``method``, by setting name."""
    return {key: value for name, key, value in getattr(args, "method_settings", []) if name == method}


def check_resume(checkpoint: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    saved = json.loads(checkpoint["config"])
    changed = [
        f"{key}: {saved.get(key)!r} -> {config.get(key)!r}" for key in RESUME_KEYS if saved.get(key) != config.get(key)
    ]
    if changed:
        raise ConfigError(f"cannot resume {path} with different settings ({'; '.join(changed)})")


# --------------------------------------------------------------------------------------------- runtime
