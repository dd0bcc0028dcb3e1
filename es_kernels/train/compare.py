"""Every method on a compute-bound task: a small CNN fine-tuned on scikit-learn's digits, 3 seeds, repeated.

    es-compare                       # default: every method, 3 seeds, 2 interleaved repeats (minutes on 2 cores)
    es-compare --full                # twice the epochs: about twice that
    es-compare --noise uniform:0.4   # with label noise
    es-compare --pixels 8            # the original 8x8 digits: solved within the first epoch

The regime the paper claims: the step cost is forward and backward compute (a CNN on 24x24 images, not an MLP whose
steps are dominated by per-call overheads), and the model is fine-tuned from weights the command first trains and
caches on a different task built from the same shipped images (which pair {0,1}, {2,3}, ..., {8,9} a digit belongs
to). By default the digits are averaged down to 4x4 pixels before upsampling, so the task is not solved in its first
epoch (with the full 8x8 every method is within about a point of its final accuracy after one epoch, and the
curves would compare first epochs, not methods).

Timing: every (method, seed) run is repeated ``--repeats`` times, round-robin over repeats, seeds and methods, so a
load swing on a shared machine hits every method alike; the table prints each method's median over its runs and
the spread (interquartile range over the median; the range under 4 runs), and the median of its per-round ratios
to the baseline. Before the clock starts, every method trains two tiny epochs (the selection backend's first load or
compilation, Adam's first step, each policy's first plan): no first-call cost is charged to a method. A warning
follows the table when the spread exceeds 10% or other processes kept cores busy while the runs were timed.

Prints, per method: final clean test accuracy (mean ± std over seeds), training wall-clock (evaluation excluded),
the process's CPU time over the same spans, back-propagated samples, and the time to reach the target accuracy:
the lowest, over seeds, of the baseline's best accuracy, minus 0.5 point (the baseline reaches it in every seed by
construction). Writes the runs as JSON and a plot of test accuracy against wall-clock and against back-propagated
samples (mean over seeds, one curve per method).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from es_kernels import _timing
from es_kernels.command import HelpFormatter, prog_name
from es_kernels.policies import POLICIES
from es_kernels.train.data import cacheable_threads, corrupt_labels, parse_label_noise
from es_kernels.train.digits import NUM_CLASSES, ClassifierRun, load_digits_split
from es_kernels.train.progress import add_progress_argument

# The digits upsampled to 24x24: measured (interleaved, 1 thread) at 16x16 an ES step cost 0.67 of a baseline
# step and at 24x24 0.63, near the ~0.58 of compute alone (a no-grad forward on B rows plus forward and backward on
# B/4), while a whole fine-tuning run takes seconds rather than one, so it can be timed.
SIDE = 24
DEFAULT_PIXELS = 4
DEFAULT_EPOCHS, FULL_EPOCHS = 6, 12
DEFAULT_REPEATS = 2
TARGET_MARGIN = 0.005  # the target: the lowest over seeds of the baseline's best accuracy, minus 0.5 point
SPREAD_LIMIT = 0.10  # a median whose runs spread more than this is not quoted without a warning


def upsample(x: torch.Tensor, pixels: int = 8) -> torch.Tensor:
    """The 8x8 digits as SIDE x SIDE images; with ``pixels`` < 8 each image is first averaged down to pixels x
    pixels (detail is lost, the task gets harder), then brought back to 8x8."""
    images = x.view(-1, 1, 8, 8)
    if pixels != 8:
        coarse = F.adaptive_avg_pool2d(images, pixels)
        images = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    return F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False).contiguous()


class SmallCNN(torch.nn.Module):
    def __init__(self, num_outputs: int, width: int) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            torch.nn.ReLU(),
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(2 * width, 4 * width, 3, padding=1, stride=2),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(4 * width * (SIDE // 4) ** 2, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def pretrained_features(x_train: torch.Tensor, y_train: torch.Tensor, args) -> dict[str, torch.Tensor]:
    """Features trained on a coarser task over the same training images: which pair {0,1}, {2,3}, ... {8,9} a
    digit belongs to (5 classes). Cached by the settings and the labels' digest."""
    digest = hashlib.sha256(y_train.numpy().tobytes() + x_train.numpy().tobytes()).hexdigest()[:8]
    key = hashlib.sha256(f"{args.width}-{args.pretrain_epochs}-{SIDE}-{digest}-v3".encode()).hexdigest()[:12]
    path = args.cache_dir / f"pairs-cnn-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    model = SmallCNN(NUM_CLASSES // 2, args.width)
    images, labels = x_train, y_train // 2
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with cacheable_threads():
        for _ in range(args.pretrain_epochs):
            for rows in torch.randperm(len(images), generator=generator).split(64):
                loss = F.cross_entropy(model(images[rows]), labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    features = model.features.state_dict()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(features, temporary)
    temporary.replace(path)
    return features


def warm_up(methods: list[str], data, features, args) -> None:
    """Two tiny epochs of every method outside the clock, on a throwaway model: the selection backend's first call
    (loading the extension, or compiling Triton kernels on a GPU), Adam's first step (it imports torch._dynamo,
    seconds) and each policy's first plan must not be charged to whichever method runs first."""
    x_train, y_train = data[0], data[1]
    rows = 2 * args.batch_size  # two steps per epoch; the epoch after the first is where set-level plans prune
    tiny = copy.copy(args)
    tiny.epochs = 2
    for method in methods:
        model = SmallCNN(NUM_CLASSES, args.width)
        model.features.load_state_dict(features)
        run = ClassifierRun(method, model, x_train[:rows], y_train[:rows], tiny, seed=0)
        for epoch in range(tiny.epochs):
            run.train_epoch(epoch)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        parts = zip(x.split(512), y.split(512), strict=True)
        correct = sum(int((model(part).argmax(1) == labels).sum()) for part, labels in parts)
    model.train()
    return correct / len(y)


def train_one(method: str, data, features, args, seed: int, repeat: int, progress) -> dict[str, object]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # the new head's initialisation; selection draws come from the helper's generators
    model = SmallCNN(NUM_CLASSES, args.width)
    model.features.load_state_dict(features)
    run = ClassifierRun(method, model, x_train, y_train, args, seed)
    curve = [{"epoch": -1, "seconds": 0.0, "backprop_samples": 0, "test_accuracy": accuracy(model, x_test, y_test)}]
    seconds = cpu_seconds = 0.0
    for epoch in range(args.epochs):
        began, cpu_began = time.perf_counter(), time.process_time()
        run.train_epoch(epoch)
        seconds += time.perf_counter() - began
        cpu_seconds += time.process_time() - cpu_began
        test_accuracy = accuracy(model, x_test, y_test)
        curve.append(
            {
                "epoch": epoch,
                "seconds": seconds,
                "backprop_samples": run.training.trained_samples,
                "test_accuracy": test_accuracy,
            }
        )
        progress(
            f"{method} seed {seed} repeat {repeat + 1}/{args.repeats} epoch {epoch + 1}/{args.epochs}: "
            f"test accuracy {test_accuracy:.3f}"
        )
    return {
        "method": method,
        "seed": seed,
        "repeat": repeat,
        "test_accuracy": curve[-1]["test_accuracy"],
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        **run.sample_counts(),
        "curve": curve,
    }


def schedule(methods: list[str], seeds: list[int], repeats: int) -> list[tuple[int, int, str]]:
    """(repeat, seed, method) in the order they run: round-robin over repeats, then seeds, then methods, the methods'
    order rotated by one each round, so no method always runs first (or right after another one)."""
    order = []
    for repeat in range(repeats):
        for index, seed in enumerate(seeds):
            shift = (repeat * len(seeds) + index) % len(methods)
            order.extend((repeat, seed, method) for method in methods[shift:] + methods[:shift])
    return order


def seed_curve(group: list[dict[str, object]]) -> list[dict[str, object]]:
    """One seed's curve over its repeats: accuracy and samples of the first repeat (the runs are deterministic;
    ``summarise`` checks it), and at each epoch the median over repeats of the training seconds so far."""
    first = min(group, key=lambda r: r["repeat"])["curve"]
    return [
        {**point, "seconds": statistics.median(r["curve"][i]["seconds"] for r in group)}
        for i, point in enumerate(first)
    ]


def time_to_reach(curve: list[dict[str, object]], target: float) -> float | None:
    return next((point["seconds"] for point in curve if point["test_accuracy"] >= target), None)


def summarise(runs: list[dict[str, object]], methods: list[str]) -> list[dict[str, object]]:
    seeds = sorted({r["seed"] for r in runs})
    by = {(m, s): [r for r in runs if r["method"] == m and r["seed"] == s] for m in methods for s in seeds}
    curves = {key: seed_curve(group) for key, group in by.items()}
    target = None
    if "baseline" in methods:
        best = [max(p["test_accuracy"] for p in curves["baseline", s]) for s in seeds]
        target = min(best) - TARGET_MARGIN
    # Per round (repeat, seed): each method's seconds over the baseline's in the same round.
    baseline_seconds = {(r["repeat"], r["seed"]): r["seconds"] for r in runs if r["method"] == "baseline"}
    rows = []
    for method in methods:
        group = [r for r in runs if r["method"] == method]
        seconds = [r["seconds"] for r in group]
        accuracies = [curves[method, s][-1]["test_accuracy"] for s in seeds]
        ratios = [r["seconds"] / baseline_seconds[r["repeat"], r["seed"]] for r in group if baseline_seconds]
        reach = [time_to_reach(curves[method, s], target) for s in seeds] if target is not None else []
        reached = [t for t in reach if t is not None]
        rows.append(
            {
                "method": method,
                "test_accuracy_mean": statistics.fmean(accuracies),
                "test_accuracy_std": statistics.pstdev(accuracies),
                # Repeats of one seed must agree in accuracy: only their timings may differ.
                "repeats_agree": all(len({round(r["test_accuracy"], 12) for r in by[method, s]}) == 1 for s in seeds),
                "runs": len(group),
                "seconds_median": statistics.median(seconds),
                "seconds_spread": _timing.relative_spread(seconds),
                "seconds_samples": seconds,
                "ratio_median": statistics.median(ratios) if ratios else None,
                "ratio_spread": _timing.relative_spread(ratios) if ratios else None,
                "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in group),
                "backprop_samples": statistics.fmean(r["backprop_samples"] for r in group),
                "target_accuracy": target,
                # Median over the seeds that reached the target; None when none did.
                "seconds_to_target": statistics.median(reached) if reached else None,
                "seeds_reaching_target": len(reached),
                "seeds": len(seeds),
            }
        )
    return rows


TABLE_COLUMNS = (
    "method",
    "test accuracy (%)",
    "wall-clock (s), median (spread)",
    "/ baseline, median (spread)",
    "CPU time (s)",
    "back-propagated samples",
    "time to target (s)",
)


def format_table(rows: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        if row["target_accuracy"] is None:
            reach = "—"
        elif row["seconds_to_target"] is None:
            reach = "never"
        else:
            reach = f"{row['seconds_to_target']:.1f}"
            if row["seeds_reaching_target"] < row["seeds"]:
                reach += f" ({row['seeds_reaching_target']}/{row['seeds']} seeds; others never)"
        accuracy_text = f"{100 * row['test_accuracy_mean']:.1f} ± {100 * row['test_accuracy_std']:.1f}"
        if not row["repeats_agree"]:
            accuracy_text += " (repeats differ)"
        seconds = _timing.with_spread(row["seconds_median"], row["seconds_spread"], 1)
        ratio = _timing.with_spread(row["ratio_median"], row["ratio_spread"], 2)
        lines.append(
            f"| {row['method']} | {accuracy_text} | {seconds} | {ratio} | {row['cpu_seconds_median']:.1f} | "
            f"{row['backprop_samples']:,.0f} | {reach} |"
        )
    return "\n".join(lines)


def mean_curve(curves: list[list[dict[str, object]]], key: str) -> tuple[list[float], list[float]]:
    points = list(zip(*curves, strict=True))
    return (
        [statistics.fmean(p[key] for p in epoch) for epoch in points],
        [100 * statistics.fmean(p["test_accuracy"] for p in epoch) for epoch in points],
    )


def plot(runs: list[dict[str, object]], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    seeds = sorted({r["seed"] for r in runs})
    for method in methods:
        curves = [seed_curve([r for r in runs if r["method"] == method and r["seed"] == s]) for s in seeds]
        for axis, key in zip(axes, ("seconds", "backprop_samples"), strict=True):
            x, y = mean_curve(curves, key)
            axis.plot(x, y, marker=".", label=method)
    axes[0].set_xlabel("training wall-clock (s), median over repeats")
    axes[1].set_xlabel("back-propagated samples")
    for axis in axes:
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog_name("es_kernels.train.compare", "es-compare"),
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--methods", nargs="+", default=list(POLICIES), choices=list(POLICIES), help="methods (default: all)")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    epochs = f"fine-tuning epochs (default: {DEFAULT_EPOCHS}; with --full: {FULL_EPOCHS})"
    add("--epochs", type=int, default=None, help=epochs)
    add("--full", action="store_true", help=f"the full run: {FULL_EPOCHS} epochs")
    add(
        "--noise",
        type=parse_label_noise,
        default=None,
        help="label noise: none, uniform:RATE or flip:RATE (default: none)",
    )
    add("--batch-size", type=int, default=64, help="meta-batch size B (default: 64)")
    add("--select-ratio", type=float, default=0.25, help="k/B of the batch-level methods (default: 0.25)")
    add("--lr", type=float, default=2e-3, help="peak OneCycle learning rate of Adam (default: 2e-3)")
    add("--width", type=int, default=32, help="channels of the first convolution (default: 32)")
    pixels = "side the 8x8 digits are averaged down to before upsampling; 8 keeps them whole"
    add(
        "--pixels",
        type=int,
        default=DEFAULT_PIXELS,
        choices=range(2, 9),
        metavar="2..8",
        help=f"{pixels} (default: {DEFAULT_PIXELS})",
    )
    repeats = "runs of each (method, seed), interleaved round-robin; the table gives medians and spreads over them"
    add("--repeats", type=int, default=DEFAULT_REPEATS, help=f"{repeats} (default: {DEFAULT_REPEATS})")
    add("--pretrain-epochs", type=int, default=3, help="epochs of the pair pre-training (default: 3)")
    threads = "torch CPU threads; timings are per this count; 1 on a loaded machine, where 2 spin waiting for a core"
    add("--threads", type=int, default=2, help=f"{threads} (default: 2)")
    cache = Path.home() / ".cache" / "es_kernels"
    add("--cache-dir", type=Path, default=cache, help="pre-trained weights cache (default: %(default)s)")
    out_help = "folder for results.json and curves.png (default: %(default)s)"
    add("--out", type=Path, default=Path("runs/compare"), help=out_help)
    add_progress_argument(parser)
    return parser


def machine_line(threads: int) -> str:
    """What the figures were taken on: the CPU, its cores, the torch threads timed."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"machine: {name}, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    """The console script: a console script passes main's return value to sys.exit, so it returns nothing."""
    run(argv)


def run(argv: list[str] | None = None) -> list[dict[str, object]]:
    """The command without exiting: returns the summary rows."""
    args = build_parser().parse_args(argv)
    if args.epochs is None:
        args.epochs = FULL_EPOCHS if args.full else DEFAULT_EPOCHS
    for name in ("epochs", "batch_size", "width", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.pretrain_epochs < 0:
        raise SystemExit("--pretrain-epochs must be at least 0")
    if not 0.0 < args.select_ratio <= 1.0:
        raise SystemExit("--select-ratio must be in (0, 1]")
    args.methods = list(dict.fromkeys(args.methods))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal softmax tails would cost methods unevenly
    progress = (lambda message: None) if args.no_progress else (lambda m: print(m, file=sys.stderr, flush=True))
    x_train, y_train, x_test, y_test = load_digits_split()
    x_train, x_test = upsample(x_train, args.pixels), upsample(x_test, args.pixels)
    if args.noise is not None:
        mode, rate = args.noise
        y_train, _ = corrupt_labels(y_train, rate, num_classes=NUM_CLASSES, mode=mode, seed=0)
    began = time.perf_counter()
    features = pretrained_features(x_train, y_train, args)
    progress(f"pair pre-training ready ({time.perf_counter() - began:.1f} s, cached in {args.cache_dir})")
    data = (x_train, y_train, x_test, y_test)
    timed = _timing.TimedRuns()
    warm_up(args.methods, data, features, args)
    runs = []
    with timed:
        for repeat, seed, method in schedule(args.methods, args.seeds, args.repeats):
            timed.before_run()
            runs.append(train_one(method, data, features, args, seed, repeat, progress))
    rows = summarise(runs, args.methods)
    noise = "none" if args.noise is None else f"{args.noise[0]}:{args.noise[1]}"
    title = (
        f"digits {args.pixels}x{args.pixels} px shown at {SIDE}x{SIDE}, CNN fine-tuning, label noise {noise}, "
        f"{args.epochs} epochs, B={args.batch_size}, seeds {args.seeds}, {args.repeats} repeats"
    )
    print(f"\n{title}")
    print(machine_line(args.threads))
    print(
        "warm-up: every method trained two tiny epochs before the clock started (backend load or compilation, "
        "first optimizer step, first plan), not timed"
    )
    print(format_table(rows))
    target = rows[0]["target_accuracy"]
    runs_per_method = len(args.seeds) * args.repeats
    print(
        f"medians over {runs_per_method} runs per method ({len(args.seeds)} seeds x {args.repeats} repeats, "
        "interleaved); spread = interquartile range / median (range / median under 4 runs); / baseline = the run's "
        "time over the baseline's in the same round"
        + (
            ""
            if target is None
            else f"; target = lowest over seeds of the baseline's best accuracy - 0.5 pt = {100 * target:.1f}%"
        )
    )
    timed.report(args.threads, [row["seconds_samples"] for row in rows], SPREAD_LIMIT)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"config": config, "summary": rows, "runs": runs}, indent=2))
    try:
        plot(runs, args.methods, args.out / "curves.png", title)
        print(f"results and plot written to {args.out}")
    except ImportError:
        print(f"results written to {args.out} (no plot: matplotlib is not installed)")
    return rows


if __name__ == "__main__":
    main()
