"""The ViT fine-tuning run behind ``es-vit``: checks, data, model, the ES/ESWP training loop, checkpoints, logs.

Every setting is checked before the first step (``ConfigError``); then each method runs through the same loop,
``EvolvedTraining`` being the only place where methods differ. Under ``torchrun`` the model is wrapped in DDP and
the ES state is merged across ranks by the library (``EvolvedTraining.set_epoch``), with one extra merge at each
epoch end so the checkpoint and the log describe one agreed state.

Precision: ``--precision auto`` is bf16 autocast on CUDA (fp16 with a GradScaler where bf16 is unsupported) and
fp32 on the CPU, where bf16 autocast is slower than fp32 on most processors; ``--precision bf16`` forces it.

Mixup/cutmix mix the *selected* rows (the scores belong to the original images). In annealing epochs the state is
fed the training forward's losses, which with mixup on are the mixed rows' losses: an approximation that saves a
second forward pass (annealing epochs are few: 5% at each end by default).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from es_kernels.reference import per_sample_cross_entropy
from es_kernels.train.data import IndexedDataset, corrupt_labels
from es_kernels.train.loop import EvolvedTraining
from es_kernels.train.vit import demo, logs
from es_kernels.train.vit.cli import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

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
    "anneal",
    "label_noise",
    "label_smoothing",
    "mixup",
    "cutmix",
    "seed",
    "world_size",
    "precision",
)


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


# --------------------------------------------------------------------------------------------- checks at start


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


def model_kwargs(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    return {**dict(args.model_kwargs), "num_classes": num_classes, "drop_path_rate": args.drop_path}


def check_model_name(name: str) -> None:
    """Before the data folder is scanned (minutes on ImageNet): a typo in the model name fails at once."""
    import timm
    from timm.models import split_model_name_tag

    architecture, _ = split_model_name_tag(name)
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture[:8]}*")[:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown timm model {name!r}{hint}")


def check_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """Build the model on the meta device (no memory, no download) to check the keyword arguments; the name itself
    was checked by :func:`check_model_name` before the data folder was read."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(args.model, pretrained=False, **model_kwargs(args, num_classes))
    except Exception as error:  # timm raises TypeError/ValueError/AssertionError for bad architecture settings
        raise ConfigError(f"cannot build timm model {args.model!r} with {dict(args.model_kwargs)}: {error}") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (a plain one, or under 'model'/'state_dict' as training scripts save it)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, unreadable, not a torch file, or holds code (rejected by weights_only)
        raise ConfigError(f"cannot read --checkpoint {path}: {type(error).__name__}: {error}") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"--checkpoint {path} does not hold a model state dict")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def match_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The weights to load into ``model``: all must fit, except the classifier, dropped when its shape differs
    (fine-tuning to another label set keeps the fresh head, as timm does)."""
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    is_head = lambda key: any(key == c or key.startswith(c + ".") for c in classifiers)  # noqa: E731
    unexpected = sorted(set(weights) - set(own))
    mismatched = sorted(k for k in set(weights) & set(own) if weights[k].shape != own[k].shape)
    bad = [k for k in mismatched if not is_head(k)]
    missing = sorted(k for k in set(own) - set(weights) if not is_head(k))
    if unexpected or bad or missing:
        details = [
            f"{label}: {keys[:5]}"
            for label, keys in (("unexpected", unexpected), ("shape mismatch", bad), ("missing", missing))
            if keys
        ]
        raise ConfigError(f"{source} does not fit {type(model).__name__} ({'; '.join(details)})")
    return {k: v for k, v in weights.items() if k not in mismatched}


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # mmap: every rank reads the file, and a ViT-L checkpoint with AdamW moments is ~3.6 GB
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConfigError(f"cannot read checkpoint {path} to resume: {type(error).__name__}: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not an es-vit checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint


def run_config(args: argparse.Namespace, method: str, world_size: int, precision: str) -> dict[str, Any]:
    """The settings that define a run, JSON-ready (logged, and compared when resuming)."""
    config = {key: value for key, value in vars(args).items() if key not in ("method", "demo")}
    config.update(method=method, world_size=world_size, precision=precision)
    return json.loads(json.dumps(config, default=str))


def check_resume(checkpoint: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    saved = json.loads(checkpoint["config"])
    changed = [
        f"{key}: {saved.get(key)!r} -> {config.get(key)!r}" for key in RESUME_KEYS if saved.get(key) != config.get(key)
    ]
    if changed:
        raise ConfigError(f"cannot resume {path} with different settings ({'; '.join(changed)})")


# --------------------------------------------------------------------------------------------- runtime


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


def seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# --------------------------------------------------------------------------------------------- the run


def run_all(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Check everything, then run each method of ``args.method`` in turn. Returns the epoch records per method."""
    check_arguments(args)
    runtime = resolve_runtime(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start_distributed(runtime)
    try:
        return _run_all(args, runtime)
    finally:
        if runtime.owns_group:
            dist.destroy_process_group()


def _run_all(args: argparse.Namespace, runtime: Runtime) -> dict[str, list[dict[str, Any]]]:
    check_model_name(args.model)
    if args.demo and args.data is None:
        args.data = args.out / "data"
        if runtime.main:
            demo.write_digits_imagefolder(args.data)
        if runtime.distributed:
            dist.barrier()
    datasets = check_data(args.data)  # scanned once: listing ImageNet's 1.3M files takes a while
    train_set = datasets[0]
    num_classes = len(train_set.classes)
    meta_model = check_model(args, num_classes)
    weights = None
    if args.checkpoint is not None:
        weights = match_weights(meta_model, read_weights(args.checkpoint), f"--checkpoint {args.checkpoint}")
    baseline_log = None
    for path in [args.baseline_log, *args.compare]:
        if path is not None:
            try:
                logs.read_log(path)
            except ValueError as error:
                raise ConfigError(str(error)) from None
    if args.baseline_log is not None:
        baseline_log = logs.read_log(args.baseline_log)
    for method in args.method:
        path = args.out / method / CHECKPOINT_NAME
        if path.exists() and not args.resume:
            raise ConfigError(
                f"{path.parent} already holds a run; pass --resume to continue it or choose another --out"
            )
        if path.exists():
            check_resume(load_checkpoint(path), run_config(args, method, runtime.world_size, runtime.precision), path)
        # The training helper checks its own settings (e.g. too few samples left after pruning for the ranks).
        try:
            make_training(args, method, len(train_set), runtime)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"method {method}: {error}") from None
    del meta_model

    results: dict[str, list[dict[str, Any]]] = {}
    log_paths: list[Path] = []
    for method in args.method:
        baseline = baseline_log
        own_baseline = args.out / "baseline" / logs.LOG_NAME
        if baseline is None and method != "baseline" and own_baseline.exists():
            baseline = logs.read_log(own_baseline)
        records = run_method(args, method, runtime, datasets, weights, baseline, log_paths)
        results[method] = records if runtime.main else []
        log_paths.append(args.out / method / logs.LOG_NAME)
    if runtime.main and len(args.method) > 1:
        logs.plot_logs(plot_inputs(args, log_paths), args.out)
    if runtime.main:
        print_summary(results)
    return results


def plot_inputs(args: argparse.Namespace, log_paths: list[Path]) -> list[Path]:
    extra = [args.baseline_log] if args.baseline_log is not None else []
    return [path for path in [*extra, *log_paths, *args.compare] if path.exists()]


def make_training(args: argparse.Namespace, method: str, num_samples: int, runtime: Runtime) -> EvolvedTraining:
    beta1, beta2 = args.betas if args.betas is not None else (None, None)
    return EvolvedTraining(
        method,
        num_samples,
        args.epochs,
        select_ratio=args.select_ratio,
        prune_ratio=args.prune_ratio,
        beta1=beta1,
        beta2=beta2,
        anneal_start=args.anneal[0],
        anneal_end=args.anneal[1],
        label_smoothing=args.label_smoothing,
        scoring_mode=args.scoring_mode,
        seed=args.seed,
        device=runtime.device,
        backend=args.backend,
        sync=args.sync,
        num_replicas=runtime.world_size,
        rank=runtime.rank,
    )


def build_model(args: argparse.Namespace, num_classes: int, weights: dict[str, torch.Tensor] | None):
    import timm

    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs(args, num_classes))
    except Exception as error:  # only pretrained=True can fail here (the meta build passed): hub unreachable
        raise ConfigError(
            f"cannot get pretrained weights for {args.model!r} through timm ({type(error).__name__}: {error}); "
            "check access to the Hugging Face hub (or its cache), or pass local weights with --checkpoint PATH"
        ) from None
    if weights is not None:
        model.load_state_dict(weights, strict=False)  # match_weights left out only a classifier of another shape
    return model


def transforms(args: argparse.Namespace, model: torch.nn.Module) -> tuple[Any, Any]:
    """timm's train and eval transforms for the model's input size (the model's own, unless --input-size)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    if args.input_size is not None:
        config["input_size"] = (3, args.input_size, args.input_size)
    elif getattr(getattr(model, "patch_embed", None), "img_size", None) is not None:
        # img_size given as a model kwarg is not reflected in the pretrained config
        config["input_size"] = (3, *model.patch_embed.img_size)
    common = {k: config[k] for k in ("input_size", "interpolation", "mean", "std")}
    train = create_transform(
        **common,
        is_training=True,
        scale=tuple(args.scale),
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        auto_augment=args.auto_augment,
    )
    evaluation = create_transform(**common, is_training=False, crop_pct=config.get("crop_pct"))
    return train, evaluation


def mix_rows(mixer: Any, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, smoothing: float):
    """timm's Mixup on the selected rows; it needs an even count, so an odd last row keeps its (smoothed) label."""
    from timm.data.mixup import mixup_target

    count = inputs.shape[0]
    if count % 2 == 0:
        return mixer(inputs, labels)
    last = mixup_target(labels[-1:], num_classes, lam=1.0, smoothing=smoothing)
    if count == 1:
        return inputs, last
    mixed, soft = mixer(inputs[:-1], labels[:-1])
    return torch.cat([mixed, inputs[-1:]]), torch.cat([soft, last.to(soft.dtype)])


def evaluate(model: torch.nn.Module, loader: Any, runtime: Runtime) -> tuple[float, float, float]:
    """(loss, top-1, top-5 accuracy) on the whole validation set, each rank scoring its own slice."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top-1, top-5, count
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(runtime.device), labels.to(runtime.device)
            with runtime.autocast():
                logits = model(images)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals[0] += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            totals[1] += (top[:, 0] == labels).sum()
            totals[2] += (top == labels[:, None]).any(dim=1).sum()
            totals[3] += labels.numel()
    model.train(was_training)
    loss_sum, correct1, correct5, count = all_sum(runtime, *totals.tolist())
    count = max(count, 1.0)
    return loss_sum / count, correct1 / count, correct5 / count


def run_method(
    args: argparse.Namespace,
    method: str,
    runtime: Runtime,
    datasets: tuple[Any, Any],
    weights: dict[str, torch.Tensor] | None,
    baseline: dict[str, Any] | None,
    earlier_logs: list[Path],
) -> list[dict[str, Any]]:
    import copy

    from torch.utils.data import DataLoader, Subset

    out = args.out / method
    checkpoint_path = out / CHECKPOINT_NAME
    config = run_config(args, method, runtime.world_size, runtime.precision)
    checkpoint = load_checkpoint(checkpoint_path) if args.resume and checkpoint_path.exists() else None
    if checkpoint is not None and checkpoint["epoch"] >= args.epochs:
        if runtime.main:
            print(f"{method}: already finished ({checkpoint_path})")
        return list(checkpoint["records"])

    seed_all(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    # Copies: this method's label noise and transforms must not leak into the next method's run.
    train_set, val_set = (copy.copy(dataset) for dataset in datasets)
    num_classes = len(train_set.classes)
    if args.label_noise is not None:
        mode, rate = args.label_noise
        noisy, _ = corrupt_labels(
            torch.tensor(train_set.targets), rate, num_classes=num_classes, mode=mode, seed=args.seed
        )
        train_set.targets = noisy.tolist()
        train_set.samples = [
            (path, label) for (path, _), label in zip(train_set.samples, train_set.targets, strict=True)
        ]
    model = build_model(args, num_classes, weights).to(runtime.device)
    train_set.transform, val_set.transform = transforms(args, model)

    training = make_training(args, method, len(train_set), runtime)
    per_rank_batch = args.batch_size // runtime.world_size
    pin = runtime.device.type == "cuda"
    loader = DataLoader(
        IndexedDataset(train_set),
        batch_size=per_rank_batch,
        sampler=training.sampler,
        num_workers=args.workers,
        pin_memory=pin,
    )
    val_loader = DataLoader(
        Subset(val_set, range(runtime.rank, len(val_set), runtime.world_size)),
        batch_size=args.eval_batch_size or per_rank_batch,
        num_workers=args.workers,
        pin_memory=pin,
    )
    from timm.optim import param_groups_weight_decay

    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=no_decay), lr=args.lr
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=args.lr,
        total_steps=training.total_steps(per_rank_batch),
        pct_start=args.pct_start,
        anneal_strategy="cos",
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    mixer = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup

        mixer = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            label_smoothing=args.label_smoothing,
            num_classes=num_classes,
        )

    records: list[dict[str, Any]] = []
    start_epoch, train_seconds, wall_clock = 0, 0.0, 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        training.load_state_dict(checkpoint["training"][runtime.rank])
        set_rng_state(runtime, checkpoint["rng"][runtime.rank])
        records = list(checkpoint["records"])
        start_epoch = int(checkpoint["epoch"])
        train_seconds, wall_clock = float(checkpoint["train_seconds"]), float(checkpoint["wall_clock"])
        if runtime.main:
            print(f"{method}: resuming after epoch {start_epoch} from {checkpoint_path}")
    else:
        seed_all(args.seed * 1_000_003 + runtime.rank + 1)  # per-rank augmentation, drop-path and mixup streams
    del checkpoint

    bare = model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    stop = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start_epoch, stop):
        began = time.perf_counter()
        training.set_epoch(epoch)
        loss_sum, rows, seconds = train_epoch(
            args,
            method,
            epoch,
            model,
            bare,
            training,
            loader,
            optimizer,
            scheduler,
            scaler,
            mixer,
            num_classes,
            runtime,
        )
        if training.policy.keeps_state:  # merge this epoch's updates now: the checkpoint and log hold the agreed state
            training.state.sync_epoch()
        test_loss, top1, top5 = evaluate(bare, val_loader, runtime)
        loss_sum, rows, scored, trained, seconds = all_sum(
            runtime, loss_sum, rows, training.scored_samples, training.trained_samples, seconds
        )
        seconds /= runtime.world_size  # ranks run in lockstep; the mean is the epoch's time
        train_seconds += seconds
        record = {
            "epoch": epoch,
            "method": method,
            "selecting": training.selecting,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": loss_sum / max(rows, 1.0),
            "test_loss": test_loss,
            "test_accuracy": top1,
            "test_top5": top5,
            "epoch_seconds": seconds,
            "train_seconds": train_seconds,
            "wall_clock": 0.0,
            "scored_samples": int(scored),
            "backprop_samples": int(trained),
            "time_saved_vs_baseline": time_saved(train_seconds, epoch, baseline, method),
        }
        training_states = gather(runtime, to_cpu(training.state_dict()))
        rng_states = gather(runtime, rng_state(runtime))
        wall_clock += time.perf_counter() - began
        record["wall_clock"] = wall_clock
        records.append(record)
        if runtime.main:
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                checkpoint_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch + 1,
                    "config": json.dumps(config),
                    "model": bare.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "training": training_states,
                    "rng": rng_states,
                    "records": records,
                    "train_seconds": train_seconds,
                    "wall_clock": wall_clock,
                },
            )
            log_path = logs.write_log(out, config, records)
            base = [args.baseline_log] if args.baseline_log is not None else []
            plotted = [*base, *earlier_logs, log_path, *args.compare]
            logs.plot_logs([p for p in plotted if p.exists()], out)
            print(epoch_line(record), flush=True)
    return records


def time_saved(seconds: float, epoch: int, baseline: dict[str, Any] | None, method: str) -> float | None:
    if method == "baseline":
        return 0.0 if baseline is None else logs.time_saved(seconds, epoch, baseline)
    return logs.time_saved(seconds, epoch, baseline)


def train_epoch(
    args, method, epoch, model, bare, training, loader, optimizer, scheduler, scaler, mixer, num_classes, runtime
) -> tuple[float, float, float]:
    """One epoch; returns (sum of trained rows' losses, trained rows, seconds) of this rank."""
    from tqdm import tqdm

    model.train()
    steps = len(loader)
    bar = tqdm(
        total=steps,
        desc=f"{method} {epoch + 1}/{args.epochs}",
        unit="step",
        leave=False,
        disable=args.no_progress or not runtime.main,
        dynamic_ncols=True,
    )
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    rows = 0
    scored0, trained0 = training.scored_samples, training.trained_samples
    seen = 0
    began = time.perf_counter()
    for step, (indices, images, labels) in enumerate(loader):
        images = images.to(runtime.device, non_blocking=True)
        labels = labels.to(runtime.device, non_blocking=True)
        seen += labels.numel()
        with runtime.autocast():
            # Score on the bare module: a DDP forward would prepare a gradient reduction that never comes.
            batch = training.select(bare, indices, images, labels)
        inputs, targets, smoothing = batch.inputs, batch.targets, args.label_smoothing
        if mixer is not None:
            inputs, targets = mix_rows(mixer, inputs, targets, num_classes, args.label_smoothing)
            smoothing = 0.0  # already in the mixed soft targets
        with runtime.autocast():
            logits = model(inputs)
        losses = per_sample_cross_entropy(logits, targets, smoothing)
        training.observe(batch, losses, outputs=logits)
        weighted = losses  # set-level plans may re-weight rows (InfoBatch); the log keeps the plain losses
        if batch.loss_weights is not None:
            weighted = losses * batch.loss_weights.to(losses.device, losses.dtype)
        # sum / count, not mean(): a rank whose rows were all sharding padding still joins DDP's reduction with 0
        loss = weighted.sum() / max(losses.numel(), 1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        with training.scaled_lr(optimizer):
            scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += losses.detach().sum()
        rows += losses.numel()
        bar.update(1)
        if not bar.disable and (step % 10 == 0 or step == steps - 1):
            elapsed = max(time.perf_counter() - began, 1e-9)
            scored = training.scored_samples - scored0
            trained = training.trained_samples - trained0
            bar.set_postfix(
                loss=f"{loss_sum.item() / max(rows, 1):.3f}",
                img_s=f"{seen / elapsed:.0f}",
                sel=f"{trained / scored:.2f}" if scored else "1.00",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
            )
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    seconds = time.perf_counter() - began
    bar.close()
    return float(loss_sum.item()), float(rows), seconds


def epoch_line(record: dict[str, Any]) -> str:
    saved = record["time_saved_vs_baseline"]
    saved_text = "" if saved is None else f", time saved {100 * saved:+.0f}%"
    return (
        f"{record['method']} epoch {record['epoch'] + 1}: test acc {100 * record['test_accuracy']:.2f}%, "
        f"train loss {record['train_loss']:.3f}, {record['backprop_samples']:,} back-propagated, "
        f"{record['train_seconds']:.1f}s training{saved_text}"
    )


def print_summary(results: dict[str, list[dict[str, Any]]]) -> None:
    lines = [
        "| method | test accuracy | back-propagated samples | training time (s) | time saved vs baseline |",
        "|---|---|---|---|---|",
    ]
    for method, records in results.items():
        if not records:
            continue
        last = records[-1]
        saved = last["time_saved_vs_baseline"]
        saved_text = "—" if saved is None else f"{100 * saved:+.0f}%"
        lines.append(
            f"| {method} | {100 * last['test_accuracy']:.2f}% | {last['backprop_samples']:,} | "
            f"{last['train_seconds']:.1f} | {saved_text} |"
        )
    print("\n".join(lines))


__all__ = ["ConfigError", "run_all"]
