"""``evolved_prune`` (ESWP's set-level draw) per backend against the reference at n = 1e6, 1e7, 1e8.

Keeps round(0.8 n) ids (the paper's r = 0.2) drawn ∝ w, with w uniform in [0.1, 1) so the race has work to do.
The bytes of a row are the n fp32 weights read. A 1e8 state is 800 MB and the reference's keys and top-k take
about 12 bytes per sample more; rows that would not fit in the available memory are skipped with the figure.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import available_memory, backends, devices, run, size
from es_kernels import EvolvedState, evolved_prune

KEEP_FRACTION = 0.8


def _cases():
    for device in devices():
        for n in size().prune_sizes:
            for backend, reason in backends(device):
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                yield pytest.param(device, n, backend, marks=marks, id=f"{device}-n{n:.0e}-{backend}")


@pytest.mark.parametrize("device, n, backend", list(_cases()))
def test_prune(benchmark, device, n, backend):
    needed = 24 * n + (1 << 30)
    if device == "cpu" and needed > available_memory():
        pytest.skip(f"needs about {needed / 2**30:.1f} GiB, {available_memory() / 2**30:.1f} GiB available")
    generator = torch.Generator(device=device).manual_seed(0)
    state = EvolvedState(n, device=device)
    state.weight.uniform_(0.1, 1.0, generator=generator)
    keep = round(KEEP_FRACTION * n)
    benchmark.group = f"prune {device} n={n:.0e}"
    benchmark.extra_info.update(suite="prune", device=device, backend=backend, n=n, keep=keep, bytes=4 * n)

    kept = run(benchmark, lambda: evolved_prune(state, keep, generator=generator, backend=backend), device)
    assert kept.numel() == keep
    assert bool((kept[1:] > kept[:-1]).all())
