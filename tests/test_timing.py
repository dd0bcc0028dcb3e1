"""The timing-trust verdict: machine load against cores and threads, and the spread of repeated timings."""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from es_kernels import _timing

ROOT = Path(__file__).resolve().parents[1]


def loaded(value):
    return lambda: (value, value, value)


@pytest.mark.parametrize(
    "load, own, threads, cores, busy",
    [
        (0.2, 0.0, 2, 2, False),  # idle 2-core machine, 2 threads timed
        (0.5, 0.0, 2, 2, False),  # at the margin: still fine
        (0.9, 0.0, 2, 2, True),  # another process holds most of a core
        (2.4, 2.0, 2, 2, False),  # the timed process's own threads are not held against it
        (11.7, 0.7, 2, 2, True),  # the trial's machine
        (10.0, 0.0, 2, 16, False),  # a big machine with cores to spare
    ],
)
def test_load_verdict(monkeypatch, load, own, threads, cores, busy):
    monkeypatch.setattr(_timing, "cores", lambda: cores)
    reason = _timing.load_reason(threads, load_source=loaded(load), own=own)
    assert (reason is not None) == busy
    if busy:
        assert reason.startswith(f"machine loaded: load average {load:.2f}") and f"on {cores} cores" in reason


def test_the_module_load_source_is_injectable(monkeypatch):
    monkeypatch.setattr(_timing, "LOAD_SOURCE", loaded(99.0))
    assert "load average 99.00" in _timing.unreliable_reason(2)
    monkeypatch.setattr(_timing, "LOAD_SOURCE", None)  # no load average on this platform: the spread still counts
    assert _timing.unreliable_reason(2) is None
    assert "timings spread" in _timing.unreliable_reason(2, [[1.0, 1.0, 5.0, 5.0, 9.0]])


def test_spread_is_the_interquartile_range_over_the_median():
    assert _timing.spread([1.0] * 10) == 0.0
    assert _timing.spread([1.0, 2.0, 3.0]) == 0.0  # too few to judge
    assert _timing.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.5 - 1.5) / 3.0)
    assert _timing.spread_of_stats({"iqr": 0.3, "median": 1.5}) == pytest.approx(0.2)


def test_warning_line(monkeypatch):
    out = io.StringIO()
    assert _timing.warn_if_unreliable(2, load_source=loaded(50.0), file=out) is not None
    assert out.getvalue().startswith("warning: the timings above are not trustworthy (machine loaded")
    quiet = io.StringIO()
    assert _timing.warn_if_unreliable(2, load_source=loaded(0.0), file=quiet) is None and quiet.getvalue() == ""


def counter(*values):
    """A source returning ``values`` one call after another."""
    items = iter(values)
    return lambda: next(items)


def test_meter_counts_the_cores_other_processes_kept_busy(monkeypatch):
    monkeypatch.setattr(_timing, "cores", lambda: 2)
    # 10 s of wall-clock; the machine's cores were busy 21 s, of which this process 9 s: others held 1.2 cores.
    meter = _timing.LoadMeter(busy_source=counter(100.0, 121.0), own_source=counter(5.0, 14.0), clock=counter(0, 10))
    assert meter.others() == pytest.approx(1.2)
    meter = _timing.LoadMeter(busy_source=counter(100.0, 121.0), own_source=counter(5.0, 14.0), clock=counter(0, 10))
    reason = _timing.load_reason(2, meter=meter, load_source=loaded(0.0))  # the meter wins over the load average
    assert reason.startswith("machine loaded: other processes kept 1.2 of 2 cores busy")
    # Only the timed process working: not loaded, whatever the lagging load average says.
    meter = _timing.LoadMeter(busy_source=counter(100.0, 118.0), own_source=counter(5.0, 23.0), clock=counter(0, 10))
    assert _timing.load_reason(2, meter=meter, load_source=loaded(40.0)) is None
    # Counters unreadable (no /proc/stat): the load average decides.
    meter = _timing.LoadMeter(busy_source=lambda: None)
    assert _timing.load_reason(2, meter=meter, load_source=loaded(40.0)).startswith("machine loaded: load average")


def test_meter_sees_a_cpu_burning_process_started_beside_the_timed_code():
    """The 1-minute load average barely moves in a second; the machine's CPU counters do."""
    if _timing.BUSY_SOURCE is None or _timing.BUSY_SOURCE() is None:
        pytest.skip("no /proc/stat on this platform")
    burners = [
        subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 4\nwhile time.time() < end: pass"])
        for _ in range(_timing.cores())
    ]
    try:
        time.sleep(0.3)  # the burners are running
        meter = _timing.LoadMeter()
        time.sleep(1.0)  # the "timed" code waits, so every busy core is another process's
        others = meter.others()
        reason = _timing.load_reason(1, meter=meter)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert others > _timing.cores() - 1
    assert reason is not None and reason.startswith("machine loaded: other processes kept")


def test_spread_limit_is_the_callers():
    samples = [1.0, 1.0, 1.2, 1.2]  # interquartile range 0.2 over the median 1.1: 18%
    assert _timing.spread_reason(samples) is None
    assert "timings spread" in _timing.spread_reason(samples, limit=0.10)


def test_relative_spread_of_a_few_repeats():
    assert _timing.relative_spread([2.0]) is None  # nothing to compare
    assert _timing.relative_spread([1.0, 1.2, 1.1]) == pytest.approx(0.2 / 1.1)  # the range, under 4
    assert _timing.relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == _timing.spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert "range 18% of the median over 3 runs" in _timing.spread_reason([1.0, 1.2, 1.1], limit=0.10)
    assert _timing.with_spread(1.234, 0.041, 2) == "1.23 (4%)" and _timing.with_spread(1.0, None, 1) == "1.0 (n/a)"


def probe_with(durations, tries=1):
    """A SpeedProbe whose workload takes the given durations, one per try, on a fake clock."""
    now = [0.0]
    queue = list(durations)

    def workload():
        now[0] += queue.pop(0)

    return _timing.SpeedProbe(workload, clock=lambda: now[0], tries=tries)


def test_speed_probe_keeps_the_fastest_try_and_measures_the_swing():
    probe = probe_with([1.0, 3.0, 1.2, 9.0, 1.5, 1.5], tries=2)
    for _ in range(3):
        probe.sample()
    assert probe.samples == pytest.approx([1.0, 1.2, 1.5])  # a slow try (a preemption) is not a slow machine
    assert probe.swing() == pytest.approx(0.5)  # under 10 samples: slowest over fastest
    many = probe_with([1.0] * 8 + [2.0, 100.0])
    for _ in range(10):
        many.sample()
    deciles = statistics.quantiles(many.samples, n=10)
    assert many.swing() == pytest.approx(deciles[-1] / deciles[0] - 1)
    single = probe_with([1.0])
    single.sample()
    assert single.swing() is None and "not sampled" in _timing.speed_line(single, 0.1)


def test_a_spread_warning_names_the_machine_s_own_swing_and_only_then():
    spread_out = [[1.0, 1.0, 1.5, 1.5, 2.0]]
    swung = probe_with([1.0, 1.3])
    swung.sample(), swung.sample()
    steady = probe_with([1.0, 1.02])
    steady.sample(), steady.sample()
    idle = loaded(0.0)
    reason = _timing.unreliable_reason(1, spread_out, load_source=idle, spread_limit=0.1, probe=swung)
    assert reason.startswith("timings spread") and "ran up to 30% slower at times" in reason
    assert "slower" not in _timing.unreliable_reason(1, spread_out, load_source=idle, spread_limit=0.1, probe=steady)
    assert _timing.unreliable_reason(1, [[1.0] * 5], load_source=idle, spread_limit=0.1, probe=swung) is None
    assert "took 30% longer than its fast ones (2 samples" in _timing.speed_line(swung, 0.1)


def test_default_probe_times_real_work():
    probe = _timing.SpeedProbe()
    probe.sample()
    assert len(probe.samples) == 1 and probe.samples[0] > 0.0


def test_frozen_setup_freezes_the_set_up_and_thaws_it_after():
    import gc

    assert gc.get_freeze_count() == 0
    with _timing.frozen_setup():
        assert gc.get_freeze_count() > 0  # the imports' objects are no longer walked by a collection
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), _timing.frozen_setup():
        raise RuntimeError
    assert gc.get_freeze_count() == 0


FAULTS_SCRIPT = """
import ctypes, resource, sys
from es_kernels import _timing
if sys.argv[1] == "held" and not _timing.hold_freed_memory():
    sys.exit(3)
libc = ctypes.CDLL(None)  # malloc itself: torch's CPU tensors come from it too, with other allocations in between
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touched(size):
    address = libc.malloc(size)
    ctypes.memset(address, 1, size)
    return address
libc.free(touched(4 << 20))  # a 4 MiB block, mapped and unmapped: glibc's moving thresholds follow it
faults = 0
for repeat in range(10):  # 24 MiB from the heap, freed: past the moving trim threshold, given back to the system
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for address in reversed([touched(3 << 20) for _ in range(8)]):
        libc.free(address)
    faults += 0 if repeat == 0 else resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts and glibc's mallopt")
def test_held_freed_memory_is_reused_instead_of_faulted_in_again():
    def faults(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        if result.returncode == 3:
            pytest.skip("the C library has no mallopt (not glibc)")
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    pages = 9 * (24 << 20) // 4096  # the nine repeats after the first
    assert faults("moving") > pages // 2  # glibc's own thresholds: every repeat faults its 24 MiB in again
    assert faults("held") < pages // 20


def test_timed_runs_hold_freed_memory_from_construction(monkeypatch):
    calls = []
    monkeypatch.setattr(_timing, "hold_freed_memory", lambda: calls.append(True) or True)
    timed = _timing.TimedRuns()  # before the warm-up: the heap it grows is the one the timed runs reuse
    assert calls == [True] and timed.holds_freed_memory


def test_timed_runs_freeze_the_set_up_sample_the_machine_around_each_run_and_report(monkeypatch, capsys):
    import gc

    monkeypatch.setattr(_timing, "BUSY_SOURCE", None)  # no load verdict: only the spread and the probe speak
    monkeypatch.setattr(_timing, "LOAD_SOURCE", None)
    with _timing.TimedRuns() as timed:
        assert gc.get_freeze_count() > 0
        for _ in range(3):
            timed.before_run()
    assert gc.get_freeze_count() == 0
    assert len(timed.probe.samples) == 4  # before each of the 3 runs and after the last
    timed.probe.samples[:] = [1.0, 1.3, 1.0, 1.0]
    reason = timed.report(1, [[1.0, 1.0, 1.5, 1.5, 2.0]], 0.1)
    printed = capsys.readouterr().out
    assert "took 30% longer than its fast ones (4 samples" in printed
    assert reason.startswith("timings spread") and "ran up to 30% slower" in reason and "warning:" in printed


def test_machine_speed_benchmark_runs():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.machine_speed", "--seconds", "0.5", "--window", "0.25", "--no-imports"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "relative speed per 0.25 s window" in result.stdout and "full collection over" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.machine_speed", "--seconds", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--seconds and --window must be positive" in bad.stderr
