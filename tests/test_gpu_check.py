"""The prepared GPU run (benchmarks/gpu_check.sh): its CPU-runnable parts — argument handling, the dry run, the
refusal without a GPU, and the report and exit decision built from a recorded summary (synthetic fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "gpu_check_summary.json"


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *arguments], capture_output=True,
                          text=True, env=environment, cwd="/", timeout=120)  # fmt: skip


def test_dry_run_lists_every_step_and_exits_zero(tmp_path):
    done = run_script("--dry-run", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    for step in gpu_check.steps(tmp_path / "out"):
        assert f"] {step.name} " in done.stdout
    assert "es_kernels.selfcheck --device cuda" in done.stdout
    assert "benchmarks.call_path --sections per_call" in done.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_without_a_gpu_the_run_refuses_with_a_reason(tmp_path):
    done = run_script(str(tmp_path / "out"))
    assert done.returncode == 2 and "FAILED setup: no CUDA device" in done.stderr


def test_output_folder_is_required():
    assert run_script().returncode != 0


def test_time_limits_fit_in_eight_minutes_and_correctness_comes_first():
    plan = gpu_check.steps(Path("out"))
    assert sum(step.timeout for step in plan) <= 8 * 60
    kinds = [step.kind for step in plan]
    assert kinds == sorted(kinds, key=lambda kind: kind != "correctness")


def test_report_from_the_recorded_summary():
    summary = json.loads(FIXTURE.read_text())
    text = gpu_check.report(summary)
    assert "**Correctness: passed**" in text
    assert "triton: 3 per call" in text
    # 256 x 32000 bf16 logits (16.4 MB) in 20.48 µs: 800 GB/s, 39% of the fixture's 2039 GB/s peak.
    assert "| 256 | 32000 | bf16 | triton | 20.5 µs | 800 | 39% |" in text
    assert "| 100000000 | 50000000 | triton | 4.00 ms | 100 |" in text
    assert "BENCHMARK FAILED vit_step: timed out after 60 s" in text and "\nFAILED" not in text


def test_a_correctness_failure_is_named_and_fails_the_run():
    summary = json.loads(FIXTURE.read_text())
    summary["steps"]["cuda_graph"].update(status="failed", reason="exit status 1")
    summary["steps"]["cuda_graph"]["result"]["problems"] = ["triton: 20 replays gave only 1 distinct draws"]
    correctness, benchmarks = gpu_check.failures(summary)
    assert correctness == ["cuda_graph: triton: 20 replays gave only 1 distinct draws"]
    assert benchmarks == ["vit_step: timed out after 60 s"]
    assert "**Correctness: FAILED**" in gpu_check.report(summary)


def test_report_command_prints_the_markdown(capsys):
    assert gpu_check.main(["--report", str(FIXTURE)]) == 0
    assert capsys.readouterr().out.startswith("# es_kernels GPU check")


def test_benchmark_rows_keep_cuda_rows_only():
    data = {"benchmarks": [
        {"extra_info": {"suite": "select", "device": "cpu", "backend": "torch"}, "stats": {"median": 1.0}},
        {"extra_info": {"suite": "prune", "device": "cuda", "backend": "triton", "n": 10, "keep": 5, "bytes": 40},
         "stats": {"median": 2.0}},
    ]}  # fmt: skip
    assert gpu_check.benchmark_rows(data) == [
        {"suite": "prune", "backend": "triton", "n": 10, "keep": 5, "bytes": 40, "median_s": 2.0}
    ]


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_script_is_executable():
    assert os.access(ROOT / "benchmarks" / "gpu_check.sh", os.X_OK)


def test_compile_check_runs_and_passes_where_it_can_here():
    # The CUDA step compiles the Triton backend with inductor; the same check on CPU, through the reference.
    outcome = gpu_check.check_compile(device="cpu", backends=("torch",), compiler="aot_eager")
    same = {"same_draw_losses_and_state": True}
    assert outcome == {"backends": {"torch, checks off": same, "torch, checks default": same}, "problems": []}


def test_a_check_that_raises_is_reported_by_name(tmp_path, monkeypatch, capsys):
    def broken():
        raise RuntimeError("capture failed")

    monkeypatch.setitem(gpu_check.CHECKS, "cuda_graph", broken)
    assert gpu_check.run_check("cuda_graph", tmp_path) == 1
    assert "cuda_graph: RuntimeError: capture failed" in capsys.readouterr().out
    assert json.loads((tmp_path / "cuda_graph.json").read_text())["problems"] == ["RuntimeError: capture failed"]
