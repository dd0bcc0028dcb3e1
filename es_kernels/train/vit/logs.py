"""Per-epoch logs of a ViT run (JSON and CSV, written atomically) and the comparison plots drawn from them."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOG_NAME = "log.json"
CSV_NAME = "log.csv"
PLOT_NAMES = ("accuracy_vs_samples.png", "accuracy_vs_time.png")

# Column order of the CSV (and the keys of every epoch record in the JSON).
FIELDS = (
    "epoch",
    "method",
    "selecting",
    "lr",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "test_top5",
    "epoch_seconds",
    "train_seconds",
    "wall_clock",
    "scored_samples",
    "backprop_samples",
    "time_saved_vs_baseline",
)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a reader (or a crash) never sees half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_log(directory: Path, config: dict[str, Any], records: Sequence[dict[str, Any]]) -> Path:
    """Rewrite ``log.json`` and ``log.csv`` in ``directory`` with all epochs so far; returns the JSON path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOG_NAME
    atomic_write(path, json.dumps({"config": config, "epochs": list(records)}, indent=2).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write(directory / CSV_NAME, text.getvalue().encode())
    return path


def read_log(path: Path) -> dict[str, Any]:
    """A log written by :func:`write_log`; ``ValueError`` with the reason if it is not one."""
    try:
        log = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read log {path}: {error}") from None
    if not isinstance(log, dict) or not isinstance(log.get("epochs"), list) or "config" not in log:
        raise ValueError(f"{path} is not an es-vit log (expected keys 'config' and 'epochs')")
    return log


def time_saved(train_seconds: float, epoch: int, baseline: dict[str, Any] | None) -> float | None:
    """1 - (this run's training seconds) / (the baseline's) after the same epoch; None without a baseline epoch."""
    if baseline is None:
        return None
    for record in baseline["epochs"]:
        if record["epoch"] == epoch and record["train_seconds"] > 0:
            return 1.0 - train_seconds / record["train_seconds"]
    return None


def plot_logs(log_paths: Sequence[Path], directory: Path) -> list[Path]:
    """Test accuracy against back-propagated samples and against training wall-clock, one curve per log.

    Curves are labelled by method (plus the run's folder when two logs share a method). Uses the Agg canvas
    directly, so it never touches pyplot's global state or needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logs = []
    for path in dict.fromkeys(Path(p).resolve() for p in log_paths):  # each log once, in order
        log = read_log(path)
        if log["epochs"]:
            logs.append((path, log))
    methods = [log["config"].get("method", "?") for _, log in logs]
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    axes_spec = (
        ("backprop_samples", "back-propagated samples", PLOT_NAMES[0]),
        ("train_seconds", "training wall-clock (s)", PLOT_NAMES[1]),
    )
    for key, xlabel, name in axes_spec:
        figure = Figure(figsize=(6, 4), dpi=120)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for (path, log), method in zip(logs, methods, strict=True):
            label = method if methods.count(method) == 1 else f"{method} ({path.parent.name})"
            xs = [record[key] for record in log["epochs"]]
            ys = [100.0 * record["test_accuracy"] for record in log["epochs"]]
            axes.plot(xs, ys, marker="o", markersize=3, label=label)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("test accuracy (%)")
        axes.grid(alpha=0.3)
        if logs:
            axes.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        atomic_write(directory / name, buffer.getvalue())
        written.append(directory / name)
    return written
