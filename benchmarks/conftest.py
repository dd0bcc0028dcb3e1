"""Benchmarks run with 2 pinned threads; the size (ES_BENCH_SIZE=ci|full) is printed in the header; the load
average at the start and end goes into the JSON, so the report can say when the figures are not trustworthy."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.common import pin_threads, size


def pytest_report_header(config):
    return f"es_kernels benchmarks: ES_BENCH_SIZE={size().name}, {torch.get_num_threads()} threads at start"


def pytest_sessionstart(session):
    # The load before any row runs is other processes' alone; the load at the end includes this run's threads.
    session.config._es_load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


@pytest.fixture(scope="session", autouse=True)
def _pinned_threads():
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pin_threads()
    yield
    torch.set_num_threads(threads)
    if affinity is not None:
        os.sched_setaffinity(0, affinity)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Machine facts the report prints beside the table: size, threads, load when the run ended."""
    output_json["es_kernels"] = {
        "size": size().name,
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "loadavg_start": getattr(config, "_es_load_at_start", None),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
