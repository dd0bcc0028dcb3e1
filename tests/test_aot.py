"""The AOT compile gate (``python -m es_kernels.triton.aot``): compiles to cubin without a GPU, and fails when it must.

Each run is a subprocess without ``TRITON_INTERPRET``: the gate needs compiled-mode kernels, and this test session
has imported triton in interpreter mode (tests/conftest.py). The full gate (every variant, sm_80 and sm_90) takes
minutes on two cores and is marked slow; one variant per target keeps the default run short.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.compile,
]


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
    for variant, _, registers, spilled, shared, vector_loads, _, status in rows:
        assert variant == "fused labels logits=bf16 aligned"
        assert int(registers) > 0 and int(spilled) == 0 and int(shared) >= 0 and status == "ok"
        # Full column blocks load without a mask: 16-byte loads (eight bf16 per thread), not eight ld.global.b16.
        assert int(vector_loads) > 0


SCALAR_PTX = """
\t@%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
\tld.global.b16 { %rs2 }, [ %rd1 + 2 ];
\tld.global.cg.b64 { %rd3 }, [ %rd2 + 0 ];
\tst.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
"""
VECTOR_PTX = SCALAR_PTX + "\t@%p2 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd5 + 0 ];\n"


def test_gate_flags_an_aligned_variant_without_vector_loads():
    from es_kernels.triton import aot

    assert aot.vector_loads(SCALAR_PTX) == 0 and aot.vector_loads(VECTOR_PTX) == 1
    assert aot.vector_loads("\tld.global.nc.L1::evict_last.v2.f32 { %f1, %f2 }, [ %rd1 + 0 ];\n") == 1
    scalar = aot.Result("fused labels logits=bf16 aligned", 90, registers=40, spill_bytes=0, vector_loads=0,
                        vectorised=True)  # fmt: skip
    assert any("no vector load" in problem for problem in aot._failures(scalar))
    # The any-layout variants cannot vectorise and are not required to.
    assert aot._failures(aot.Result("fused labels logits=bf16 any-layout", 90, registers=40, spill_bytes=0,
                                    vector_loads=0)) == []  # fmt: skip
    vectorised = {v.name for v in aot.variants() if v.vectorised}
    assert "prune_keys values=fp32" in vectorised and "fused labels logits=bf16 aligned" in vectorised
    assert not any("any-layout" in name or "losses=" in name for name in vectorised)


def test_a_bf16_hidden_state_variant_runs_on_hopper_tensor_cores():
    done = run_gate("--only", "hidden_loss H,W=bf16 aligned bias=False softcap=False", "--arch", "90")
    assert done.returncode == 0, done.stdout + done.stderr
    [(variant, target, _, spilled, _, vector_loads, wgmma, status)] = table_rows(done.stdout)
    assert variant == "sequence hidden_loss H,W=bf16 aligned bias=False softcap=False"
    assert target == "sm_90" and int(spilled) == 0 and status == "ok"
    assert int(wgmma) > 0 and int(vector_loads) > 0


def test_gate_flags_a_half_precision_hidden_state_variant_without_wgmma():
    from es_kernels.triton import aot

    assert aot.wgmma_instructions("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;\n") == 1
    assert aot.wgmma_instructions("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2};\n") == 0
    name = "sequence hidden_loss H,W=bf16 aligned bias=False softcap=False"
    without = aot.Result(name, 90, registers=200, spill_bytes=0, vector_loads=4, wgmma=0, tensor_cores=True)
    assert any("no wgmma" in problem for problem in aot._failures(without))
    # sm_80 has no wgmma; fp32 (no TF32) never uses tensor cores.
    assert aot._failures(aot.Result(name, 80, registers=200, spill_bytes=0, wgmma=0, tensor_cores=True)) == []
    required = {v.name for v in aot.variants() if v.tensor_cores}
    assert name in required and not any("fp32" in n or "token" in n for n in required)
    assert len(required) == 16  # bf16/fp16 x aligned/any-layout x bias x softcap


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
    assert len(rows) >= 2 * 81 and all(row[-1] == "ok" for row in rows)
