"""es-vit: fine-tune a timm model (default ViT-Large/16) on an ImageFolder with ES, ESWP or a baseline.

Paper setting (ImageNet-1K, one GPU or torchrun):
    es-vit --data /data/imagenet --pretrained --method baseline es eswp --out runs/vit-l
    torchrun --nproc_per_node 8 -m es_kernels.train.vit --data /data/imagenet --pretrained --method eswp

The embedded demo (digits rendered as 32x32 images, a 4-block ViT pre-trained once on another task built from the
same images and cached, then fine-tuned by every method, epochs interleaved across methods; CPU, minutes):
    es-vit --demo
    es-vit --demo --from-scratch --epochs 20      # no pre-training: where selection costs accuracy

Each method writes OUT/<method>/{log.json, log.csv, checkpoint.pt} and the plots (test accuracy against
back-propagated samples and against training wall-clock) next to its log; with several methods, the plots with all
curves are also written to OUT. ``--resume`` continues every method from its checkpoint (exactly: model, optimizer,
schedule, ES state, sampler position and all random streams).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from es_kernels.command import HelpFormatter, format_default, prog_name
from es_kernels.train.data import parse_label_noise
from es_kernels.train.loop import METHODS, SCORING_MODES
from es_kernels.train.progress import add_progress_argument
from es_kernels.train.vit.config import ConfigError
from es_kernels.train.vit.demo import DEMO_MODEL, DEMO_MODEL_KWARGS

# What --demo changes; any option given explicitly on the command line still wins.
DEMO_DEFAULTS = {
    "method": ["baseline", "es", "eswp"],
    "epochs": 8,
    "batch_size": 64,
    "lr": 5e-4,
    "interleave": True,
    "weight_decay": 0.05,
    "drop_path": 0.0,
    "label_smoothing": 0.1,
    "scale": (0.75, 1.0),
    "hflip": 0.0,  # digits are not mirror-symmetric
    "workers": 0,
    "out": Path("runs/vit-demo"),
    "device": "cpu",
    "model": DEMO_MODEL,
    "model_kwargs": list(DEMO_MODEL_KWARGS.items()),
}


def parse_model_kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, lists; anything else stays a string
    except json.JSONDecodeError:
        return key, value


def parse_method_setting(text: str) -> tuple[str, str, object]:
    method, sep, setting = text.partition(":")
    if not sep or method not in METHODS:
        raise argparse.ArgumentTypeError(f"expected METHOD:KEY=VALUE, METHOD one of {sorted(METHODS)}, got {text!r}")
    return (method, *parse_model_kwarg(setting))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog_name("es_kernels.train.vit", "es-vit"),
        description=__doc__,
        epilog=demo_epilog(),
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--demo", action="store_true", help="run the embedded CPU demo (writes its data; settings below)")
    add("--data", type=Path, help="ImageFolder root holding train/ and val/ (required unless --demo)")
    add("--out", type=Path, default=Path("runs/vit"), help="output folder; each method writes OUT/<method>/")
    add("--method", nargs="+", default=["es"], choices=sorted(METHODS), help="one or more, run one after another")
    add(
        "--method-settings",
        nargs="*",
        type=parse_method_setting,
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="a method's own settings (es_kernels.policies), e.g. infobatch:delta=0.9 kakurenbo:confidence=0.8 ucb:c=2",
    )

    group = parser.add_argument_group("model and weights")
    group.add_argument("--model", default="vit_large_patch16_224", help="any timm model name")
    group.add_argument(
        "--model-kwargs",
        nargs="*",
        type=parse_model_kwarg,
        default=[],
        metavar="KEY=VALUE",
        help="extra timm.create_model arguments; VALUE is read as JSON when it parses (numbers, booleans, lists)",
    )
    group.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub)")
    group.add_argument("--checkpoint", type=Path, help="initial weights from a local file (weights_only load)")
    group.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    group.add_argument(
        "--from-scratch",
        action="store_true",
        help="--demo only: skip the demo's pre-training and train from random weights",
    )
    group.add_argument(
        "--pretrain-epochs", type=int, default=30, help="--demo only: epochs of the cached pre-training on digit pairs"
    )
    cache = Path.home() / ".cache" / "es_kernels"
    group.add_argument("--cache-dir", type=Path, default=cache, help="--demo only: where pre-trained weights are kept")

    group = parser.add_argument_group("optimisation (paper: Adam, OneCycle cosine, max lr 2e-5, 10 epochs, B=256)")
    group.add_argument("--epochs", type=int, default=10, help="training epochs E")
    group.add_argument("--batch-size", type=int, default=256, help="global meta-batch B (split across ranks)")
    group.add_argument("--lr", type=float, default=2e-5, help="OneCycle maximum learning rate")
    group.add_argument("--pct-start", type=float, default=0.3, help="OneCycle warm-up fraction")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled decay (0: Adam, as paper)")
    group.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (off by default)")
    group.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU",
    )
    group.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    group.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off); applied after selection")
    group.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off); applied after selection")

    group = parser.add_argument_group("evolved sampling")
    group.add_argument("--select-ratio", type=float, default=0.25, help="k/B, fraction back-propagated")
    group.add_argument("--prune-ratio", type=float, default=None, help="r (default: 0.2 for eswp, 0 otherwise)")
    group.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=None,
        metavar=("B1", "B2"),
        help="default: es (0.2, 0.9), eswp (0.2, 0.8), loss/order (0, 0)",
    )
    group.add_argument(
        "--anneal",
        type=float,
        nargs=2,
        default=(0.05, 0.05),
        metavar=("START", "END"),
        help="fractions of epochs without selection at the start and the end",
    )
    group.add_argument(
        "--label-noise",
        type=parse_label_noise,
        default=None,
        metavar="{uniform,flip}:RATE",
        help="corrupt this fraction of training labels (robustness experiments; off by default)",
    )
    group.add_argument(
        "--scoring-mode", choices=SCORING_MODES, default="eval", help="module mode of the scoring forward pass"
    )
    group.add_argument("--sync", choices=["epoch", "step"], default="epoch", help="how ranks share the ES state")
    group.add_argument(
        "--backend",
        choices=["auto", "torch", "triton", "extension"],
        default="auto",
        help="kernel backend of the selection (auto: the fastest available)",
    )

    group = parser.add_argument_group("data")
    group.add_argument("--input-size", type=int, default=None, help="default: the model's own image size")
    group.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=(0.08, 1.0),
        metavar=("MIN", "MAX"),
        help="RandomResizedCrop scale range",
    )
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    group.add_argument("--color-jitter", type=float, default=None, help="colour jitter strength (off by default)")
    group.add_argument("--auto-augment", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    group.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank")
    group.add_argument("--eval-batch-size", type=int, default=None, help="default: the per-rank meta-batch")

    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=0, help="seed of weights, data order, selection and augmentation")
    group.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available, else the CPU"
    )
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    group.add_argument("--resume", action="store_true", help="continue each method from OUT/<method>/checkpoint.pt")
    group.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="stop after this many epochs in all (time-limited jobs; continue with --resume)",
    )
    group.add_argument(
        "--interleave",
        action="store_true",
        help="train the methods epoch by epoch in turn (all models held at once), so a load swing hits every method "
        "alike; the summary then gives steady-epoch medians with their spread",
    )
    group.add_argument("--baseline-log", type=Path, default=None, help="log.json of a baseline run (time saved)")
    group.add_argument("--compare", type=Path, nargs="*", default=[], help="more log.json files to plot alongside")
    add_progress_argument(group)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    args.method = list(dict.fromkeys(args.method))  # each method once
    return args


def demo_epilog() -> str:
    """The settings ``--demo`` changes, one line of options per 90 columns."""
    options = [
        f"--{name.replace('_', '-')} "
        + (" ".join(f"{k}={v}" for k, v in value) if name == "model_kwargs" else format_default(value))
        for name, value in DEMO_DEFAULTS.items()
    ]
    lines = [""]
    for option in options:
        if lines[-1] and len(lines[-1]) + len(option) > 90:
            lines.append("")
        lines[-1] = f"{lines[-1]} {option}".strip()
    text = "\n  ".join(lines)
    return f"--demo sets these defaults (an option given on the command line still wins):\n  {text}"


def run(argv: list[str] | None = None) -> dict[str, list[dict[str, object]]]:
    """The command's run: each method's epoch records (rank 0; other ranks get empty lists).

    A bad setting ends it with ``SystemExit`` and the message, before any training.
    """
    from es_kernels.train.vit import recipe

    args = parse_args(argv)
    try:
        return recipe.run_all(args)
    except ConfigError as error:
        raise SystemExit(f"{build_parser().prog}: error: {error}") from None


def main(argv: list[str] | None = None) -> None:
    """The ``es-vit`` console script: returns nothing, so a finished run exits with status 0."""
    run(argv)
