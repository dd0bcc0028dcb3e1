"""The timm model of an es-vit run: its name and settings checked up front, initial weights, input transforms."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from es_kernels.train.vit.config import ConfigError


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
