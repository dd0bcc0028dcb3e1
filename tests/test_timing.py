"""The timing-trust verdict: machine load against cores and threads, and the spread of repeated timings."""

from __future__ import annotations

import io

import pytest

from es_kernels import _timing


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
