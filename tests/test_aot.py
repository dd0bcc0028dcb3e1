"""The AOT compile gate (``python -m es_kernels.triton.aot``): compiles to cubin without a GPU, and fails when it must.

Each run is a subprocess without ``TRITON_INTERPRET``: the gate needs compiled-mode kernels, and this test session
may have imported triton in interpreter mode (test_triton.py). The full gate (every variant, sm_80 and sm_90) takes
minutes on two cores and is marked slow; one variant per target keeps the default run short.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def run_gate(*arguments: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "es_kernels.triton.aot", *arguments]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=1800)


def table_rows(output: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_one_fused_variant_compiles_for_sm80_and_sm90_without_spills():
    done = run_gate("--only", "fused labels logits=bf16 aligned", "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert [row[1] for row in rows] == ["sm_80", "sm_90"]
    for variant, _, registers, spilled, shared, status in rows:
        assert variant == "fused labels logits=bf16 aligned"
        assert int(registers) > 0 and int(spilled) == 0 and int(shared) >= 0 and status == "ok"


def test_gate_fails_on_a_fused_multiply_add_in_the_update():
    done = run_gate("--only", "fused losses=fp32", "--arch", "80", "--enable-fp-fusion")
    assert done.returncode == 1
    assert "fma in the state update" in done.stdout


def test_every_user_like_launch_compiles_a_checked_variant():
    done = run_gate("--coverage-only")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "launch coverage: 0 of " in done.stdout


def test_coverage_check_sees_a_launch_the_variants_miss():
    # Without the any-layout variants, transposed or offset logits would compile something the gate never checked.
    script = (
        "from es_kernels.triton import aot\n"
        "everything = aot.variants\n"
        "aot.variants = lambda: (v for v in everything() if 'any-layout' not in v.name)\n"
        "missed, _ = aot.uncovered_launches()\n"
        "assert any('transposed' in name for name in missed), 'nothing missed'\n"
        "assert not any(n.startswith('labels ') and 'contiguous B=16 C=64' in n for n in missed), 'aligned missed'\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_full_gate():
    done = run_gate("--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert len(rows) >= 2 * 45 and all(row[-1] == "ok" for row in rows)
