"""How steady this machine is, in the two ways the timed commands guard against (runs on any machine).

    python3 -m benchmarks.machine_speed [--seconds S] [--window W] [--no-imports]

1. Its own speed: the speed probe's fixed matmul (``es_kernels._timing.SpeedProbe``) run back to back for
   ``--seconds``; each ``--window``-second window's mean time over the whole run's median (1.00 = typical, 1.20 = 20%
   slower), with this process's CPU time against its wall-clock: a slow phase at equal CPU and wall time is the
   machine itself (the host's other tenants), not another process here.
2. A full garbage collection's cost once the Hugging Face demo's modules are imported (what ``es-sft --demo``
   carries), before and after ``gc.freeze()`` (``es_kernels._timing.frozen_setup``). ``--no-imports`` measures the
   bare interpreter instead.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from es_kernels import _timing


def speed_windows(seconds: float, window: float) -> tuple[list[float], float, float]:
    """Relative speed per window, and the CPU and wall-clock seconds the measurement took."""
    probe = _timing.SpeedProbe(tries=1)
    wall_began, cpu_began = time.perf_counter(), time.process_time()
    stamps = []
    while time.perf_counter() - wall_began < seconds:
        probe.sample()
        stamps.append(time.perf_counter() - wall_began)
    wall, cpu = time.perf_counter() - wall_began, time.process_time() - cpu_began
    typical = statistics.median(probe.samples)
    windows: dict[int, list[float]] = {}
    for stamp, sample in zip(stamps, probe.samples, strict=True):
        windows.setdefault(int(stamp // window), []).append(sample)
    return [statistics.fmean(samples) / typical for _, samples in sorted(windows.items())], cpu, wall


def collection_cost(repeats: int = 3) -> tuple[int, float, float]:
    """Tracked objects, and the fastest full collection's seconds before and after freezing them."""

    def fastest() -> float:
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            gc.collect()
            best = min(best, time.perf_counter() - began)
        return best

    objects = len(gc.get_objects())
    before = fastest()
    with _timing.frozen_setup():
        after = fastest()
    return objects, before, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.machine_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to time the probe (default: 60)")
    parser.add_argument("--window", type=float, default=1.0, help="seconds per reported window (default: 1)")
    parser.add_argument("--no-imports", action="store_true", help="measure the collection without the HF modules")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.window <= 0:
        parser.error("--seconds and --window must be positive")
    import torch

    torch.set_num_threads(1)  # the probe is single-threaded, like the demos' default
    windows, cpu, wall = speed_windows(args.seconds, args.window)
    print(f"relative speed per {args.window:g} s window (1.00 = the run's median sample):")
    print(" ".join(f"{value:.2f}" for value in windows))
    print(
        f"slowest window {max(windows):.2f}, fastest {min(windows):.2f}; CPU time {cpu:.1f} s over {wall:.1f} s "
        "wall-clock"
    )
    if not args.no_imports:
        import importlib

        for module in ("transformers", "es_kernels.train.hf", "es_kernels.train.sft"):  # what es-sft --demo imports
            importlib.import_module(module)
    objects, before, after = collection_cost()
    print(f"full collection over {objects:,} tracked objects: {1e3 * before:.0f} ms; frozen: {1e3 * after:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
