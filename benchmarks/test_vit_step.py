"""The end-to-end ViT step parts (see benchmarks/vit_step.py) as pytest-benchmark rows.

The report derives the selection overhead, the ES/baseline ratio and the analytic limit from these rows' medians.
Rows are timed one after another, so load changes during a run skew them against each other; the figures in the
README come from ``python -m benchmarks.vit_step``, which interleaves the parts round by round.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import devices, run, size
from benchmarks.vit_step import CONFIGS, PARTS, StepBench

_benches: dict[str, StepBench] = {}


def _bench(device: str) -> StepBench:
    if device not in _benches:
        _benches[device] = StepBench(CONFIGS[size().name], device)
    return _benches[device]


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("device", devices())
def test_vit_step(benchmark, device, part):
    pytest.importorskip("timm")
    bench = _bench(device)
    call, setup = bench.parts()[part]
    config = bench.config
    benchmark.group = f"vit step {device} B={config.batch} k={config.keep}"
    benchmark.extra_info.update(suite="vit_step", device=device, part=part, batch=config.batch, keep=config.keep)
    run(benchmark, call, device, setup=setup)
    # A part that trains must leave no gradients behind (each round starts from the same state).
    assert all(p.grad is None for p in bench.model.parameters())
    assert torch.isfinite(bench.logits).all()
