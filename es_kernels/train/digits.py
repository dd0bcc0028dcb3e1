"""The embedded default run: baseline vs ES vs ESWP on scikit-learn's digits (ships with scikit-learn, no download).

    python3 -m es_kernels.train.digits                     # 40% uniform label noise, 3 seeds, all methods
    python3 -m es_kernels.train.digits --noise none --seeds 0
    es-digits --no-progress > digits.log                   # the installed command; no progress bar in a log

Prints a table of clean test accuracy, wall-clock, back-propagated samples and time saved against the baseline, and
writes the same as JSON. Every method runs through ``EvolvedTraining``, so they differ only in the selection.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from es_kernels import _timing
from es_kernels.command import HelpFormatter, prog_name
from es_kernels.train.data import IndexedDataset, corrupt_labels, parse_label_noise
from es_kernels.train.loop import METHODS, EvolvedTraining
from es_kernels.train.progress import add_progress_argument, progress_bar

NUM_CLASSES = 10


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1347 training and 450 test images (8x8, scaled to [0, 1]), stratified, fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=450, stratify=digits.target, random_state=seed
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def make_model(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, NUM_CLASSES),
    )


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train()
    return correct / len(y)


def warm_up(hidden: int) -> None:
    """One throwaway optimizer step: the first ``Adam.step`` imports torch._dynamo (seconds), which must not be
    charged to whichever method happens to run first."""
    model = make_model(hidden)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(2, 64)).sum().backward()
    optimizer.step()


class ClassifierRun:
    """One method's training of a classifier through ``EvolvedTraining`` with Adam and a OneCycle schedule: the loop
    es-digits and es-compare share (``args`` gives lr, epochs, batch_size and select_ratio). The caller seeds and
    builds the model, times the epochs and evaluates."""

    def __init__(self, method: str, model: torch.nn.Module, x_train, y_train, args, seed: int) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        self.training = EvolvedTraining(method, len(x_train), args.epochs, select_ratio=args.select_ratio, seed=seed)
        self.loader = DataLoader(
            IndexedDataset(TensorDataset(x_train, y_train)), batch_size=args.batch_size, sampler=self.training.sampler
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, args.lr, total_steps=self.training.total_steps(args.batch_size)
        )

    def train_epoch(self, epoch: int) -> None:
        model, training, optimizer = self.model, self.training, self.optimizer
        training.set_epoch(epoch)
        for indices, inputs, targets in self.loader:
            batch = training.select(model, indices, inputs, targets)
            logits = model(batch.inputs)
            losses = F.cross_entropy(logits, batch.targets, reduction="none")
            loss = training.observe(batch, losses, outputs=logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with training.scaled_lr(optimizer):
                optimizer.step()
            self.scheduler.step()

    def sample_counts(self) -> dict[str, int]:
        return {"backprop_samples": self.training.trained_samples, "scored_samples": self.training.scored_samples}


def train_one(method: str, data, args, seed: int, progress) -> dict[str, object]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # model initialisation only; ES draws come from the helper's own generator
    run = ClassifierRun(method, make_model(args.hidden), x_train, y_train, args, seed)
    curve = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        run.train_epoch(epoch)
        elapsed = time.perf_counter() - start
        test_accuracy = accuracy(run.model, x_test, y_test)
        curve.append({"epoch": epoch, "test_accuracy": test_accuracy, "seconds": elapsed})
        progress.set_postfix(method=method, seed=seed, epoch=epoch, acc=f"{test_accuracy:.3f}")
        progress.update(1)
    return {
        "method": method,
        "seed": seed,
        "test_accuracy": curve[-1]["test_accuracy"],
        "seconds": time.perf_counter() - start,
        **run.sample_counts(),
        "curve": curve,
    }


def summary_row(method: str, group: list[dict[str, object]]) -> dict[str, object]:
    """The columns es-digits and es-compare share, over one method's runs (one per seed)."""
    accuracies = [r["test_accuracy"] for r in group]
    return {
        "method": method,
        "test_accuracy_mean": statistics.fmean(accuracies),
        "test_accuracy_std": statistics.pstdev(accuracies),
        "seconds_mean": statistics.fmean(r["seconds"] for r in group),
        "backprop_samples": statistics.fmean(r["backprop_samples"] for r in group),
    }


def summarise(runs: list[dict[str, object]], methods: list[str]) -> list[dict[str, object]]:
    rows = [summary_row(method, [r for r in runs if r["method"] == method]) for method in methods]
    baseline = next((row for row in rows if row["method"] == "baseline"), None)
    for row in rows:
        row["time_saved_vs_baseline"] = 1.0 - row["seconds_mean"] / baseline["seconds_mean"] if baseline else None
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| method | test accuracy | wall-clock (s) | back-propagated samples | time saved vs baseline |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        saved = "—" if row["time_saved_vs_baseline"] is None else f"{100 * row['time_saved_vs_baseline']:+.0f}%"
        lines.append(
            f"| {row['method']} | {100 * row['test_accuracy_mean']:.1f} ± {100 * row['test_accuracy_std']:.1f} | "
            f"{row['seconds_mean']:.1f} | {row['backprop_samples']:,.0f} | {saved} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    prog = prog_name("es_kernels.train.digits", "es-digits")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add(
        "--methods",
        nargs="+",
        default=["baseline", "es", "eswp"],
        choices=sorted(METHODS),
        help="methods to compare, each trained once per seed",
    )
    add(
        "--noise",
        type=parse_label_noise,
        default="uniform:0.4",
        help="training label noise: none, uniform:RATE or flip:RATE",
    )
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and method; the table averages them")
    add("--epochs", type=int, default=40, help="training epochs per run")
    add("--batch-size", type=int, default=64, help="meta-batch size B")
    add("--select-ratio", type=float, default=0.25, help="k/B, the fraction of each meta-batch back-propagated")
    add("--hidden", type=int, default=512, help="units in each of the MLP's two hidden layers")
    add("--lr", type=float, default=1e-3, help="OneCycle maximum learning rate (Adam)")
    add("--threads", type=int, default=2, help="torch CPU threads (timings are per this count)")
    add("--out", type=Path, default=Path("runs/digits/results.json"), help="JSON file for the table and every run")
    add_progress_argument(parser)
    return parser


def run(argv: list[str] | None = None) -> list[dict[str, object]]:
    """The command's run: the table's rows (one per method), also written to ``--out``."""
    args = build_parser().parse_args(argv)
    if isinstance(args.noise, str):  # argparse does not run `type` on defaults given as strings in all versions
        args.noise = parse_label_noise(args.noise)
    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    torch.set_num_threads(args.threads)
    # Confidently classified samples put denormal probabilities in the softmax; on CPUs without flush-to-zero these
    # cost up to 50% of an epoch, unevenly across methods, which would distort the wall-clock comparison.
    torch.set_flush_denormal(True)
    x_train, y_train, x_test, y_test = load_digits_split()
    if args.noise is not None:
        mode, rate = args.noise
        y_train, _ = corrupt_labels(y_train, rate, num_classes=NUM_CLASSES, mode=mode, seed=0)
    data = (x_train, y_train, x_test, y_test)
    warm_up(args.hidden)
    runs = []
    total = len(args.seeds) * len(args.methods) * args.epochs
    with progress_bar(wanted=not args.no_progress, total=total, unit="epoch") as progress:
        for seed in args.seeds:
            for method in args.methods:
                runs.append(train_one(method, data, args, seed, progress))
    rows = summarise(runs, args.methods)
    noise = "none" if args.noise is None else f"{args.noise[0]}:{args.noise[1]}"
    print(f"\ndigits, label noise {noise}, {args.epochs} epochs, B={args.batch_size}, seeds {args.seeds}")
    print(format_table(rows))
    _timing.warn_if_unreliable(args.threads)  # wall-clock and "time saved" mean nothing on a loaded machine
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"config": config, "summary": rows, "runs": runs}, indent=2))
    print(f"results written to {args.out}")
    return rows


def main(argv: list[str] | None = None) -> None:
    """The ``es-digits`` console script: returns nothing, so a finished run exits with status 0."""
    run(argv)


if __name__ == "__main__":
    main()
