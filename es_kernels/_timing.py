"""Whether wall-clock figures taken on this machine can be trusted: its load, and the spread of repeated timings.

On a shared machine other processes take cores from the timed code, and a torch run with as many threads as cores
then slows down out of proportion (a 2-thread reference measured 80x slower than idle on a loaded 2-core machine,
while a single-threaded kernel barely moved): a ratio of two such timings means nothing. The timed commands
(``python -m es_kernels.selfcheck``, ``python -m es_kernels.train.digits``, ``python -m benchmarks.report``) ask
:func:`unreliable_reason` and say so instead of printing figures they cannot stand behind.

Two measures of the load. The 1-minute load average lags: a job that starts beside a run of a few minutes barely
moves it, and it cannot tell this process's threads from others'. So the training commands (``es-compare``,
``es-vit --demo``, ``es-sft --demo``) hold a :class:`LoadMeter` over their timed section instead: the machine's busy
CPU time (``/proc/stat``) minus this process's own CPU time, over the wall-clock of the section, is the number of
cores other processes kept busy while the figures were taken. Live child processes (DataLoader workers) count as
others: they take cores from the timed threads all the same. Where ``/proc/stat`` is missing, the load average
decides.

The sources are injectable (``load_source=``/``busy_source=``, or monkeypatch :data:`LOAD_SOURCE`/
:data:`BUSY_SOURCE`) so the verdicts can be tested.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence

LoadSource = Callable[[], tuple[float, float, float]]


def _system_load() -> tuple[float, float, float]:
    return os.getloadavg()


LOAD_SOURCE: LoadSource | None = _system_load if hasattr(os, "getloadavg") else None

BusySource = Callable[[], "float | None"]


def _machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine spent busy since boot (user, nice, system, irq, softirq, steal: steal is
    time a hypervisor gave another guest), or None where ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / ticks


BUSY_SOURCE: BusySource | None = _machine_busy_seconds


def _own_cpu_seconds() -> float:
    """This process's CPU seconds (all its threads) and those of its children that have ended."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


class LoadMeter:
    """Cores that other processes kept busy from its construction (or :meth:`restart`) to each :meth:`others` call.

    ``(machine busy CPU time - own CPU time) / wall-clock``, both over the same span. ``busy_source`` defaults to
    :data:`BUSY_SOURCE` (``/proc/stat``); when it gives None the meter knows nothing and :meth:`others` is None.
    """

    def __init__(
        self,
        busy_source: BusySource | None = None,
        own_source: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._busy_source = busy_source if busy_source is not None else BUSY_SOURCE
        self._own_source = own_source if own_source is not None else _own_cpu_seconds
        self._clock = clock
        self.restart()

    def _busy(self) -> float | None:
        return None if self._busy_source is None else self._busy_source()

    def restart(self) -> None:
        self._wall = self._clock()
        self._own = self._own_source()
        self._machine = self._busy()

    def others(self) -> float | None:
        """Mean number of cores other processes used since the start, or None when the machine's counters are
        unreadable or no time has passed."""
        machine = self._busy()
        wall = self._clock() - self._wall
        if machine is None or self._machine is None or wall <= 0.0:
            return None
        return max(0.0, (machine - self._machine - (self._own_source() - self._own)) / wall)


class SpeedProbe:
    """The time of one fixed piece of work, sampled between timed runs (outside their clocks): how fast the machine
    itself was while the figures were taken.

    A virtual machine's cores can slow down with no other process on it to show for it: on the 2-core machines
    this project is developed on, a fixed single-threaded matmul ran 10-25% slower for 10-20 s at a time while
    the process's CPU time still equalled its wall-clock, so neither the load average nor :class:`LoadMeter` sees
    it (the host's other tenants share the physical cores). A run of a few seconds inside such a phase is that much
    slower, and the spread of the repeats shows it. Each sample is the fastest of ``tries`` timings of
    ``workload``, so a single preemption does not count as the machine slowing down. ``python3 -m
    benchmarks.machine_speed`` runs it back to back for a minute.
    """

    def __init__(
        self, workload: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter, tries: int = 3
    ) -> None:
        self._workload = workload if workload is not None else _matmul_workload()
        self._clock = clock
        self._tries = tries
        self.samples: list[float] = []

    def sample(self) -> None:
        best = math.inf
        for _ in range(self._tries):
            began = self._clock()
            self._workload()
            best = min(best, self._clock() - began)
        self.samples.append(best)

    def swing(self) -> float | None:
        """How much slower the slow samples were than the fast ones: the 90th percentile over the 10th, less 1 (the
        slowest over the fastest under 10 samples); None under 2 samples."""
        if len(self.samples) < 2:
            return None
        if len(self.samples) >= 10:
            deciles = statistics.quantiles(self.samples, n=10)
            fast, slow = deciles[0], deciles[-1]
        else:
            fast, slow = min(self.samples), max(self.samples)
        return slow / fast - 1.0 if fast > 0 else math.inf


def speed_line(probe: SpeedProbe, limit: float) -> str:
    """The line a timed command prints under its table: how much the machine's own speed moved during its runs
    (``limit``: the spread the command allows its figures)."""
    swing = probe.swing()
    if swing is None:
        return "machine speed: not sampled"
    return (
        f"machine speed between runs: a fixed workload's slow samples took {100 * swing:.0f}% longer than its fast "
        f"ones ({len(probe.samples)} samples; above {100 * limit:.0f}% the spreads above are the machine's, "
        "not the methods')"
    )


def _matmul_workload() -> Callable[[], None]:
    import torch  # here, not at the top: the load checks are read by commands that may not need torch at all

    matrix = torch.ones(256, 256)

    def workload() -> None:
        for _ in range(8):
            torch.mm(matrix, matrix)

    return workload


# Cores the timed threads may need beyond the free ones before the figures count as disturbed: half a core of
# competition already shows up in a 2-thread timing on a 2-core machine, but noise below it does not.
LOAD_MARGIN = 0.5
# The same for a load measured while the timed threads ran: the cores are shared then, so competing processes show
# only what the timed threads left them (two busy processes beside one timed thread on two cores measure about 1.3
# cores, not 2), and a smaller margin catches them.
MEASURED_MARGIN = 0.25
# A timing whose interquartile range exceeds this fraction of its median was disturbed while it ran.
SPREAD_LIMIT = 0.5


def cores() -> int:
    """Cores of the whole machine: the load average counts runnable threads machine-wide, not per affinity mask."""
    return os.cpu_count() or 1


def own_load(threads: int) -> float:
    """This process's own share of the 1-minute load average, at most: its CPU seconds spread over the average's
    60-second window, capped at its thread count. Subtracted so the timed command does not accuse itself."""
    return min(float(threads), time.process_time() / 60.0)


def load_reason(
    threads: int,
    *,
    load_source: LoadSource | None = None,
    own: float | None = None,
    num_cores: int | None = None,
    meter: LoadMeter | None = None,
) -> str | None:
    """Why the machine is too busy to time ``threads`` threads, or None when it is not (or the load is unknown).

    Busy when other processes' load plus ``threads`` exceeds the cores by more than :data:`LOAD_MARGIN`. With a
    ``meter`` that could read the machine's counters, other processes' load is the cores it measured them using;
    otherwise the 1-minute load average less ``own``, this process's share of it (default :func:`own_load`).
    ``num_cores`` is the machine's cores (default :func:`cores`; a report of figures taken elsewhere passes the
    recorded count).
    """
    available = cores() if num_cores is None else num_cores
    measured = None if meter is None else meter.others()
    if measured is not None:
        if measured + threads <= available + MEASURED_MARGIN:
            return None
        return (
            f"machine loaded: other processes kept {measured:.1f} of {available} cores busy on average while "
            f"{threads} thread(s) were timed"
        )
    source = LOAD_SOURCE if load_source is None else load_source
    if source is None:
        return None
    load = float(source()[0])
    others = max(0.0, load - (own_load(threads) if own is None else own))
    if others + threads <= available + LOAD_MARGIN:
        return None
    return (
        f"machine loaded: load average {load:.2f} over the last minute on {available} cores, about {others:.1f} "
        f"of it from other processes, while {threads} thread(s) were timed"
    )


@contextlib.contextmanager
def frozen_setup() -> Iterator[None]:
    """Collect garbage and freeze every object that survives, for the timed runs inside; thawed on the way out.

    A full collection walks every tracked object of the process, most of them the imports' (half a million in the
    Hugging Face demo: 0.25 s a collection on these cores), so its cost is the same whichever method's allocations
    set it off, and it lands in one repeat and not in the next. Frozen objects are not walked: a collection inside a
    timed run then costs what the run made. Enter it once the set-up is done. ``python3 -m
    benchmarks.machine_speed`` measures a collection's cost before and after.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def collect_before_timing() -> None:
    """Start a timed section with the collector's counters at zero, so each repeat meets its collections at the
    same points of its own work instead of inheriting the previous run's debt."""
    gc.collect()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (half its 64 MiB heap size): blocks up to it come from the heap.
_HELD_BLOCK_BYTES = 32 << 20
# Freed memory at the top of the heap is given back to the system only past this much.
_HELD_TOP_BYTES = 1 << 30


def hold_freed_memory() -> bool:
    """Keep the memory the process frees for its next allocations instead of giving it back to the system; True
    where the C library took the settings (glibc), False elsewhere (nothing changes there).

    glibc sets both thresholds from the largest block freed so far: a block above the mmap threshold is mapped and
    unmapped on each use, and free memory at the heap's top beyond twice that is returned at once. Each run then
    pays page faults (the kernel zeroing every page again) according to which run freed the largest block before
    it: in ``es-sft --demo`` 5 of 18 runs took 166,000-316,000 minor faults and 0.2-0.4 s of system time, the
    others at most 30,000. Fixed thresholds make every run reuse what the previous one freed. Process-wide, once set
    (glibc cannot go back to its moving thresholds); a process that times runs holds at most the top threshold of
    freed memory more.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows loads no library by None
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _HELD_BLOCK_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _HELD_TOP_BYTES))


class TimedRuns:
    """What a command that times repeated runs in one process holds around them: a :class:`LoadMeter` (other
    processes), a :class:`SpeedProbe` (the machine itself, sampled before each run and after the last), the
    set-up frozen for the garbage collector (:func:`frozen_setup`), each run starting with a collection, and the
    allocator's thresholds fixed (:func:`hold_freed_memory`) from construction on.

    Construct it before the untimed warm-up, so the heap the warm-up grows is the one the timed runs reuse; then
    ``with timed:``, ``timed.before_run()`` right before each run's clock starts, and ``timed.report(...)`` under
    the table.
    """

    def __init__(self) -> None:
        self.holds_freed_memory = hold_freed_memory()
        self.meter = LoadMeter()
        self.probe = SpeedProbe()
        self._frozen: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> TimedRuns:
        self._frozen = frozen_setup()
        self._frozen.__enter__()
        return self

    def __exit__(self, *exception) -> None:
        self.probe.sample()
        self._frozen.__exit__(*exception)

    def before_run(self) -> None:
        self.probe.sample()
        collect_before_timing()

    def report(self, threads: int, samples: Sequence[Sequence[float]], spread_limit: float) -> str | None:
        """Print the machine-speed line, then the warning if the figures are not trustworthy; return its reason."""
        print(speed_line(self.probe, spread_limit))
        return warn_if_unreliable(threads, samples, meter=self.meter, spread_limit=spread_limit, probe=self.probe)


def spread(samples: Sequence[float]) -> float:
    """Interquartile range over median of repeated timings (0 for fewer than 4 samples)."""
    if len(samples) < 4:
        return 0.0
    low, _, high = statistics.quantiles(samples, n=4)
    middle = statistics.median(samples)
    return (high - low) / middle if middle > 0 else math.inf


def relative_spread(samples: Sequence[float]) -> float | None:
    """The spread a training command prints beside a median: interquartile range over median from 4 samples, the
    whole range over median for 2 or 3 (the quartiles of so few mean nothing), None for fewer."""
    if len(samples) < 2:
        return None
    if len(samples) >= 4:
        return spread(samples)
    middle = statistics.median(samples)
    return (max(samples) - min(samples)) / middle if middle > 0 else math.inf


def with_spread(value: float | None, spread_value: float | None, digits: int) -> str:
    """``1.23 (4%)``: a median with its :func:`relative_spread` ("n/a" for a single sample, "—" for no value)."""
    if value is None:
        return "—"
    return f"{value:.{digits}f} ({'n/a' if spread_value is None else f'{100 * spread_value:.0f}%'})"


def spread_of_stats(stats: dict) -> float:
    """:func:`spread` from a pytest-benchmark ``stats`` record (its ``iqr`` and ``median``; 0 if absent)."""
    iqr, median = stats.get("iqr"), stats.get("median")
    if iqr is None or not median:
        return 0.0
    return iqr / median


def spread_reason(samples: Sequence[float], limit: float = SPREAD_LIMIT) -> str | None:
    """Why these repeated timings of one thing disagree too much to quote (:func:`relative_spread` above
    ``limit``), or None (also for a single timing: nothing to compare)."""
    value = relative_spread(samples)
    if value is None or value <= limit:
        return None
    measure = "interquartile range" if len(samples) >= 4 else "range"
    return f"timings spread: {measure} {100 * value:.0f}% of the median over {len(samples)} runs"


def unreliable_reason(
    threads: int,
    samples: Sequence[Sequence[float]] = (),
    *,
    load_source: LoadSource | None = None,
    meter: LoadMeter | None = None,
    spread_limit: float = SPREAD_LIMIT,
    probe: SpeedProbe | None = None,
) -> str | None:
    """The first reason the figures are not trustworthy (machine load, then each series' spread), or None. A
    ``probe`` that saw the machine's own speed swing beyond ``spread_limit`` adds that to a spread's reason."""
    reason = load_reason(threads, load_source=load_source, meter=meter)
    if reason is not None:
        return reason
    for series in samples:
        reason = spread_reason(series, spread_limit)
        if reason is not None:
            return reason + _swing_note(probe, spread_limit)
    return None


def _swing_note(probe: SpeedProbe | None, limit: float) -> str:
    swing = None if probe is None else probe.swing()
    if swing is None or swing <= limit:
        return ""
    return (
        f"; the machine itself ran up to {100 * swing:.0f}% slower at times (a fixed workload timed between the "
        f"runs, {len(probe.samples)} samples), with no other process to account for it"
    )


def warn_if_unreliable(
    threads: int,
    samples: Sequence[Sequence[float]] = (),
    *,
    load_source: LoadSource | None = None,
    meter: LoadMeter | None = None,
    spread_limit: float = SPREAD_LIMIT,
    probe: SpeedProbe | None = None,
    file=None,
) -> str | None:
    """Print one warning line when the figures just printed are not trustworthy; return the reason (or None)."""
    reason = unreliable_reason(
        threads, samples, load_source=load_source, meter=meter, spread_limit=spread_limit, probe=probe
    )
    if reason is not None:
        out = sys.stdout if file is None else file
        print(f"warning: the timings above are not trustworthy ({reason}); rerun on an idle machine", file=out)
    return reason
