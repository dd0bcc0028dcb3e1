"""Self-check for a new machine: every available backend against the pure-PyTorch reference, and a timing table.

    python -m es_kernels.selfcheck [--device cpu|cuda|all] [--no-timing]

Per backend and device: per-sample losses on a few shapes and dtypes within the tolerances of es_kernels.testing
(the test suite's), the state after the update equal bit for bit to the reference update applied to the backend's
own losses (untouched ids unchanged), valid and reproducible selections, the selection law on a small case
(inclusion frequencies against the exact successive-sampling law; zero weights never drawn while enough are
positive), and pruning's output.
Prints PASS/FAIL per backend and the time per call; exits 1 if any available backend fails. On a loaded machine
(load average against cores and threads) or when repeated timings spread widely, the times are shown but the
speed-ups are withheld as unreliable, with the reason.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from es_kernels import EvolvedState, _timing, backend_status, evolved_prune, evolved_select, reference
from es_kernels.command import HelpFormatter
from es_kernels.testing import LOSS_TOLERANCES, frequency_bound, inclusion_probabilities
from es_kernels.triton import interpreter_requested

# (B, C, logits dtype, label smoothing): small, the C of ImageNet, and an LLM-like vocabulary at moderate B.
SHAPES = [
    (64, 10, torch.float32, 0.0),
    (256, 1000, torch.bfloat16, 0.1),
    (128, 32000, torch.float32, 0.0),
    (32, 1000, torch.float16, 0.0),
]
NUM_SAMPLES = 100_000
LAW_DRAWS = 4000


class CheckFailed(AssertionError):
    pass


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _inputs(batch: int, classes: int, dtype: torch.dtype, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, classes, generator=generator) * 3).to(dtype).to(device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    indices = torch.randperm(NUM_SAMPLES, generator=generator)[:batch].to(device)
    return logits, labels, indices


def _state(device: str) -> EvolvedState:
    state = EvolvedState(NUM_SAMPLES, device=device)
    # Distinct prior scores, so the update's use of the old s is visible.
    state.score.copy_(torch.rand(NUM_SAMPLES, generator=torch.Generator().manual_seed(1)).to(device))
    return state


def check_losses_and_state(backend: str, device: str) -> None:
    for batch, classes, dtype, smoothing in SHAPES:
        where = f"B={batch} C={classes} {str(dtype)[6:]} label_smoothing={smoothing}"
        logits, labels, indices = _inputs(batch, classes, dtype, device)
        state = _state(device)
        score0, weight0 = state.score.clone(), state.weight.clone()
        generator = torch.Generator(device=device).manual_seed(0)
        k = batch // 4
        positions, losses = evolved_select(
            state, indices, k, logits=logits, targets=labels, label_smoothing=smoothing,
            generator=generator, backend=backend, return_losses=True,
        )  # fmt: skip
        expected = reference.per_sample_cross_entropy(logits, labels, smoothing)
        _expect(losses.dtype == torch.float32, f"{where}: losses are {losses.dtype}, not float32")
        tolerance = LOSS_TOLERANCES[dtype]
        close = torch.isclose(losses, expected, **tolerance)
        if not bool(close.all()):
            worst = int((losses - expected).abs().argmax())
            raise CheckFailed(
                f"{where}: losses differ from the reference beyond {tolerance} "
                f"(row {worst}: {float(losses[worst]):.7g} vs {float(expected[worst]):.7g})"
            )
        reference.ema_update_(score0, weight0, indices, losses, state.beta1, state.beta2)
        _expect(torch.equal(state.score, score0), f"{where}: s after the update differs from the reference update")
        _expect(torch.equal(state.weight, weight0), f"{where}: w after the update differs from the reference update")
        _check_positions(positions, batch, k, where)
        again = evolved_select(
            _state(device), indices, k, logits=logits, targets=labels, label_smoothing=smoothing,
            generator=torch.Generator(device=device).manual_seed(0), backend=backend,
        )  # fmt: skip
        _expect(torch.equal(again, positions), f"{where}: same seed and inputs gave a different selection")


def _check_positions(positions: torch.Tensor, batch: int, k: int, where: str) -> None:
    _expect(positions.dtype == torch.int64 and positions.shape == (k,), f"{where}: selection is not k int64 ids")
    values = positions.cpu()
    _expect(bool((values[1:] > values[:-1]).all()), f"{where}: selection is not strictly ascending")
    _expect(int(values[0]) >= 0 and int(values[-1]) < batch, f"{where}: selection out of [0, B)")


def check_law(backend: str, device: str) -> None:
    # Plain loss sampling (b1 = b2 = 0) makes w the given losses, so the law is known exactly.
    weights, k = [1.0, 2.0, 3.0, 4.0, 6.0], 2
    losses = torch.tensor(weights, device=device)
    indices = torch.arange(len(weights), device=device)
    state = EvolvedState(len(weights), 0.0, 0.0, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    counts = torch.zeros(len(weights), dtype=torch.int64)
    for _ in range(LAW_DRAWS):
        drawn = evolved_select(state, indices, k, losses=losses, generator=generator, backend=backend)
        counts[drawn.cpu()] += 1
    for item, p in enumerate(inclusion_probabilities(weights, k)):
        frequency = int(counts[item]) / LAW_DRAWS
        _expect(
            abs(frequency - p) <= frequency_bound(p, LAW_DRAWS),
            f"selection law: item {item} (weight {weights[item]}) drawn with frequency {frequency:.4f}, exact {p:.4f}",
        )
    zeros = torch.tensor([0.0, 2.0, 0.0, 1.0, 3.0, 0.0], device=device)
    zero_state = EvolvedState(6, 0.0, 0.0, device=device)
    for _ in range(50):
        drawn = evolved_select(
            zero_state, torch.arange(6, device=device), 3, losses=zeros, generator=generator, backend=backend
        )
        _expect(drawn.cpu().tolist() == [1, 3, 4], f"selection law: drew {drawn.tolist()}, zero weights must lose")


def check_prune(backend: str, device: str) -> None:
    n, keep = 50_000, 30_000
    state = EvolvedState(n, device=device)
    values = torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.01
    values[::3] = 0.0  # 16,667 zeros: the 33,333 positive weights are enough, so no zero may be kept
    state.weight.copy_(values.to(device))
    kept = evolved_prune(state, keep, generator=torch.Generator(device=device).manual_seed(0), backend=backend)
    _expect(kept.dtype == torch.int64 and kept.shape == (keep,), "prune: not keep int64 ids")
    kept = kept.cpu()
    _expect(bool((kept[1:] > kept[:-1]).all()), "prune: ids not strictly ascending")
    _expect(int(kept[0]) >= 0 and int(kept[-1]) < n, "prune: ids out of range")
    _expect(not bool((kept % 3 == 0).any()), "prune: kept an id of weight 0 while enough weights were positive")


CHECKS: list[tuple[str, Callable[[str, str], None]]] = [
    ("losses and state", check_losses_and_state),
    ("selection law", check_law),
    ("pruning", check_prune),
]


def time_select(
    backend: str, device: str, batch: int, classes: int, dtype: torch.dtype, calls: int = 20
) -> list[float]:
    """Seconds of each of ``calls`` timed ``evolved_select`` calls (value checks off: the backend's own work),
    synchronised, after two untimed warm-up calls."""
    logits, labels, indices = _inputs(batch, classes, dtype, device)
    state = _state(device)
    generator = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(calls + 2):
        sync()
        start = time.perf_counter()
        evolved_select(
            state, indices, batch // 4, logits=logits, targets=labels, generator=generator,
            backend=backend, check_values=False,
        )  # fmt: skip
        sync()
        times.append(time.perf_counter() - start)
    return times[2:]


def print_timings(device: str, backends: list[str], out, load_source: _timing.LoadSource | None = None) -> None:
    """The timing table of ``device``; speed-ups over the reference only when the machine allowed fair timings."""
    threads = torch.get_num_threads()
    before = _timing.load_reason(threads, load_source=load_source)
    rows = [(shape, {b: time_select(b, device, *shape[:3]) for b in backends}) for shape in SHAPES]
    series = [samples for _, timings in rows for samples in timings.values()]
    # The load before and after the timings: a burst of other work during them raises the second.
    reason = before or _timing.unreliable_reason(threads, series, load_source=load_source)
    print(f"\n  evolved_select on {device}, median per call, value checks off, k = B/4:", file=out)
    if reason is not None:
        print(f"  speed-ups unreliable ({reason}): times shown, ratios withheld", file=out)
    print("  | B | C | logits | " + " | ".join(backends) + " |", file=out)
    print("  |---:|---:|:---|" + "---:|" * len(backends), file=out)
    for (batch, classes, dtype, _), timings in rows:
        seconds = {b: statistics.median(samples) for b, samples in timings.items()}
        cells = []
        for b in backends:
            cell = f"{seconds[b] * 1e6:.0f} µs"
            if b != "torch" and "torch" in seconds:
                cell += " (unreliable)" if reason is not None else f" ({seconds['torch'] / seconds[b]:.1f}x)"
            cells.append(cell)
        print(f"  | {batch} | {classes} | {str(dtype)[6:]} | " + " | ".join(cells) + " |", file=out)


def run(devices: list[str], timing: bool = True, out=None) -> bool:
    """Run every check on every available backend of each device; print the results; True if all passed."""
    out = sys.stdout if out is None else out  # looked up per call, so redirected output is honoured
    print(f"es_kernels selfcheck: torch {torch.__version__}, {torch.get_num_threads()} threads", file=out)
    all_passed = True
    for device in devices:
        print(f"\ndevice {device}", file=out)
        available = []
        for backend, status in backend_status(device).items():
            if status != "available":
                print(f"  {backend:<10} not available: {status}", file=out)
                continue
            failures = []
            for name, check in CHECKS:
                try:
                    check(backend, device)
                except Exception as error:  # any exception is a failure of this backend, reported, not raised
                    failures.append(f"{name}: {type(error).__name__}: {error}")
            verdict = "PASS" if not failures else "FAIL"
            print(f"  {backend:<10} {verdict}", file=out)
            for failure in failures:
                print(f"      {failure}", file=out)
            all_passed &= not failures
            available.append(backend)
        # The reference first, so the other columns read as speed-ups over it; the Triton interpreter is not timed.
        available.sort(key=lambda b: b != "torch")
        timed = [b for b in available if not (b == "triton" and interpreter_requested())]
        if timing and timed:
            print_timings(device, timed, out)
    print(f"\n{'PASS' if all_passed else 'FAIL'}: every available backend agrees with the reference"
          if all_passed else "\nFAIL: see the failures above", file=out)  # fmt: skip
    return all_passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m es_kernels.selfcheck", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (every device present)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    args = parser.parse_args(argv)
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = present if args.device == "all" else [args.device]
    return 0 if run(devices, timing=not args.no_timing) else 1


if __name__ == "__main__":
    sys.exit(main())
