"""``evolved_select`` per backend against the reference ("torch"), over B, C, logits dtype and value checks.

Each row times one call (k = B/4, labels, 1e6-sample state) and records what the report needs: the bytes of
logits the call reads (for the effective bandwidth) and the keys that pair it with its reference row (for the
ratio). ``check_values=True`` is the default of the API (it reads the logits once more for NaN/inf);
``check_values=False`` times the backends' own work.

Skips: a backend that cannot run on the device (the reason is the skip message; Triton on CPU, and never under
TRITON_INTERPRET=1, which is for correctness only), and a row whose logits plus the reference's fp32 temporaries
would not fit in the memory available at the time (B=4096 x C=151936 fp32 logits alone are 2.5 GB; the reference
makes about two more fp32 copies). On a 24 GiB machine every row runs.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import DTYPES, available_memory, backends, devices, run, size
from es_kernels import EvolvedState, evolved_select

NUM_SAMPLES = 1_000_000


def _cases():
    # Shape-major order, so the logits of one shape are made once and shared by its backends and check modes.
    config = size()
    for device in devices():
        for batch in config.batches:
            for classes in config.classes:
                for dtype in DTYPES:
                    for backend, reason in backends(device):
                        for checks in (False, True):
                            marks = [pytest.mark.skip(reason=reason)] if reason else []
                            name = f"{device}-B{batch}-C{classes}-{dtype}-{backend}-checks{'on' if checks else 'off'}"
                            yield pytest.param(device, batch, classes, dtype, backend, checks, marks=marks, id=name)


_cache: dict[tuple, tuple] = {}


def _inputs(device: str, batch: int, classes: int, dtype: str):
    key = (device, batch, classes, dtype)
    if key not in _cache:
        _cache.clear()  # one shape at a time: the largest logits are gigabytes
        generator = torch.Generator().manual_seed(0)
        # Uniform logits in [-4, 4): values do not change the work, and torch.rand is faster to make than randn.
        logits = (torch.rand(batch, classes, generator=generator) * 8 - 4).to(DTYPES[dtype])
        labels = torch.randint(0, classes, (batch,), generator=generator)
        indices = torch.randperm(NUM_SAMPLES, generator=generator)[:batch]
        _cache[key] = (logits.to(device), labels.to(device), indices.to(device))
    return _cache[key]


@pytest.mark.parametrize("device, batch, classes, dtype, backend, check_values", list(_cases()))
def test_select(benchmark, device, batch, classes, dtype, backend, check_values):
    logits_bytes = batch * classes * DTYPES[dtype].itemsize
    # The reference's peak: the logits, an fp32 upcast and the log-softmax (each B x C x 4 bytes), plus slack.
    needed = logits_bytes + 2 * batch * classes * 4 + (1 << 30)
    if device == "cpu" and needed > available_memory():
        pytest.skip(f"needs about {needed / 2**30:.1f} GiB, {available_memory() / 2**30:.1f} GiB available")
    logits, labels, indices = _inputs(device, batch, classes, dtype)
    state = EvolvedState(NUM_SAMPLES, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    benchmark.group = f"select {device} B={batch} C={classes} {dtype} checks {'on' if check_values else 'off'}"
    benchmark.extra_info.update(
        suite="select", device=device, backend=backend, batch=batch, classes=classes, dtype=dtype,
        check_values=check_values, bytes=logits_bytes,
    )  # fmt: skip

    def call():
        return evolved_select(
            state, indices, batch // 4, logits=logits, targets=labels, generator=generator,
            backend=backend, check_values=check_values,
        )  # fmt: skip

    chosen = run(benchmark, call, device)
    # The harness must time real selections: k distinct ascending positions in [0, B).
    assert chosen.numel() == batch // 4
    assert bool((chosen[1:] > chosen[:-1]).all()) and int(chosen[0]) >= 0 and int(chosen[-1]) < batch
