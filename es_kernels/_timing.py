"""Whether wall-clock figures taken on this machine can be trusted: its load, and the spread of repeated timings.

On a shared machine other processes take cores from the timed code, and a torch run with as many threads as cores
then slows down out of proportion (a 2-thread reference measured 80x slower than idle on a loaded 2-core machine,
while a single-threaded kernel barely moved): a ratio of two such timings means nothing. The timed commands
(``python -m es_kernels.selfcheck``, ``python -m es_kernels.train.digits``, ``python -m benchmarks.report``) ask
:func:`unreliable_reason` and say so instead of printing figures they cannot stand behind.

The load source is injectable (``load_source=``, or monkeypatch :data:`LOAD_SOURCE`) so the verdict can be tested.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

LoadSource = Callable[[], tuple[float, float, float]]


def _system_load() -> tuple[float, float, float]:
    return os.getloadavg()


LOAD_SOURCE: LoadSource | None = _system_load if hasattr(os, "getloadavg") else None

# Cores the timed threads may need beyond the free ones before the figures count as disturbed: half a core of
# competition already shows up in a 2-thread timing on a 2-core machine, but noise below it does not.
LOAD_MARGIN = 0.5
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
) -> str | None:
    """Why the machine is too busy to time ``threads`` threads, or None when it is not (or the load is unknown).

    Busy when the 1-minute load of other processes plus ``threads`` exceeds the cores by more than
    :data:`LOAD_MARGIN`. ``own`` is this process's share of that load (default :func:`own_load`); ``num_cores``
    the machine's cores (default :func:`cores`; a report of figures taken elsewhere passes the recorded count).
    """
    source = LOAD_SOURCE if load_source is None else load_source
    if source is None:
        return None
    load = float(source()[0])
    others = max(0.0, load - (own_load(threads) if own is None else own))
    available = cores() if num_cores is None else num_cores
    if others + threads <= available + LOAD_MARGIN:
        return None
    return (
        f"machine loaded: load average {load:.2f} over the last minute on {available} cores, about {others:.1f} "
        f"of it from other processes, while {threads} thread(s) were timed"
    )


def spread(samples: Sequence[float]) -> float:
    """Interquartile range over median of repeated timings (0 for fewer than 4 samples)."""
    if len(samples) < 4:
        return 0.0
    low, _, high = statistics.quantiles(samples, n=4)
    middle = statistics.median(samples)
    return (high - low) / middle if middle > 0 else math.inf


def spread_of_stats(stats: dict) -> float:
    """:func:`spread` from a pytest-benchmark ``stats`` record (its ``iqr`` and ``median``; 0 if absent)."""
    iqr, median = stats.get("iqr"), stats.get("median")
    if iqr is None or not median:
        return 0.0
    return iqr / median


def spread_reason(samples: Sequence[float]) -> str | None:
    """Why these repeated timings of one thing disagree too much to quote, or None."""
    value = spread(samples)
    if value <= SPREAD_LIMIT:
        return None
    return f"timings spread: interquartile range {100 * value:.0f}% of the median over {len(samples)} runs"


def unreliable_reason(
    threads: int, samples: Sequence[Sequence[float]] = (), *, load_source: LoadSource | None = None
) -> str | None:
    """The first reason the figures are not trustworthy (machine load, then each series' spread), or None."""
    reason = load_reason(threads, load_source=load_source)
    if reason is not None:
        return reason
    for series in samples:
        reason = spread_reason(series)
        if reason is not None:
            return reason
    return None


def warn_if_unreliable(
    threads: int, samples: Sequence[Sequence[float]] = (), *, load_source: LoadSource | None = None, file=None
) -> str | None:
    """Print one warning line when the figures just printed are not trustworthy; return the reason (or None)."""
    reason = unreliable_reason(threads, samples, load_source=load_source)
    if reason is not None:
        out = sys.stdout if file is None else file
        print(f"warning: the timings above are not trustworthy ({reason}); rerun on an idle machine", file=out)
    return reason
