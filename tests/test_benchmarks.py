"""The benchmark harness at its reduced size (ES_BENCH_SIZE=ci): the suites run and the report reads their JSON.

This checks the harness, not speed: no figure here is compared with a target (those live in the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a package of the checkout, not of the installed es_kernels: importable from the root only.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SUITES = ["benchmarks/test_select.py", "benchmarks/test_prune.py", "benchmarks/test_vit_step.py"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "ci.json"
    env = {**os.environ, "ES_BENCH_SIZE": "ci"}
    command = [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider", f"--benchmark-json={path}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return path


@pytest.mark.slow
def test_reduced_suites_record_every_row(results):
    benchmarks = json.loads(results.read_text())["benchmarks"]
    suites = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        suites.setdefault(info["suite"], []).append(info)
        assert bench["stats"]["rounds"] >= 2 and bench["stats"]["median"] > 0
    # Reduced grid: B (64, 256) x C (10, 1000) x (fp32, bf16) x checks (off, on), per CPU backend present.
    select_rows = {(r["backend"], r["batch"], r["classes"], r["dtype"], r["check_values"]) for r in suites["select"]}
    assert {("torch", b, c, d, v) for b in (64, 256) for c in (10, 1000) for d in ("fp32", "bf16") for v in (0, 1)} <= {
        (backend, b, c, d, int(v)) for backend, b, c, d, v in select_rows
    }
    from es_kernels import backend_status

    if backend_status("cpu")["extension"] is None:  # built here: its rows must be there too, not silently skipped
        assert {("extension", b, c, d, v) for b in (64, 256) for c in (10, 1000) for d in ("fp32", "bf16")
                for v in (0, 1)} <= {(backend, b, c, d, int(v)) for backend, b, c, d, v in select_rows}  # fmt: skip
    assert all(r["bytes"] == r["batch"] * r["classes"] * (4 if r["dtype"] == "fp32" else 2) for r in suites["select"])
    assert {r["n"] for r in suites["prune"]} == {10**6}
    assert {r["part"] for r in suites["vit_step"]} == {
        "baseline", "es", "select", "score_B", "fwd_B", "bwd_B", "fwd_k", "bwd_k"
    }  # fmt: skip


@pytest.mark.slow
def test_report_tables_plot_and_compare(results, tmp_path, capsys):
    from benchmarks import report

    plot = tmp_path / "select.png"
    assert report.main([str(results), "--plot", str(plot), "--compare", str(results)]) == 0
    text = capsys.readouterr().out
    assert "### evolved_select" in text and "### evolved_prune" in text and "### ViT step" in text
    assert "| cpu | 256 | 1000 | fp32 | off |" in text
    assert "analytic limit" in text
    # Comparing a file with itself: every row present in both, each ratio exactly 1.
    comparison = text.split("### Comparison")[1]
    ratios = [line.rsplit("|", 2)[1].strip() for line in comparison.splitlines() if line.startswith("| test_")]
    assert ratios and set(ratios) == {"1.00"}
    assert plot.stat().st_size > 10_000
    assert "| cuda | all | all | all | all | unmeasured (no GPU in this run) |" in text

    # A "before" twice as slow: every row reads 0.50, so before and after are not swapped.
    slower = json.loads(results.read_text())
    for bench in slower["benchmarks"]:
        bench["stats"]["median"] *= 2
    before = tmp_path / "before.json"
    before.write_text(json.dumps(slower))
    assert report.main([str(results), "--compare", str(before)]) == 0
    comparison = capsys.readouterr().out.split("### Comparison")[1]
    ratios = [line.rsplit("|", 2)[1].strip() for line in comparison.splitlines() if line.startswith("| test_")]
    assert ratios and set(ratios) == {"0.50"}


def test_report_rejects_other_json(tmp_path):
    from benchmarks import report

    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        report.main([str(path)])


@pytest.mark.slow
def test_vit_step_command_measures_every_part_and_reports(tmp_path, capsys):
    from benchmarks import vit_step

    out = tmp_path / "vit.json"
    assert vit_step.main(["--size", "ci", "--rounds", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert "analytic limit" in printed and "measured ES / baseline step" in printed
    text = json.dumps(saved)
    for part in vit_step.PARTS:
        assert part in text


def test_vit_step_summary_is_the_analytic_formula():
    from benchmarks.vit_step import summarize

    times = {"baseline": 10.0, "es": 6.0, "select": 0.01, "score_B": 3.0, "fwd_B": 3.5, "bwd_B": 6.5,
             "fwd_k": 1.0, "bwd_k": 1.8}  # fmt: skip
    figures = summarize(times)
    assert figures["analytic_limit"] == pytest.approx((3.0 + 1.0 + 1.8) / (3.5 + 6.5))
    assert figures["es_over_baseline"] == pytest.approx(0.6)
    assert figures["gap_percent"] == pytest.approx(100 * (0.6 / 0.58 - 1))
    assert figures["select_percent_of_es_step"] == pytest.approx(100 * 0.01 / 6.0)


def _fake_results(tmp_path, meta, spread=0.0):
    def row(backend, median):
        info = {"suite": "select", "backend": backend, "batch": 64, "classes": 10, "dtype": "fp32",
                "check_values": False, "device": "cpu", "bytes": 2560}  # fmt: skip
        stats = {"median": median, "min": median, "mean": median, "rounds": 50, "iqr": spread * median}
        return {"name": f"test_select[{backend}]", "extra_info": info, "stats": stats}

    path = tmp_path / "fake.json"
    path.write_text(json.dumps({"benchmarks": [row("torch", 2e-4), row("extension", 5e-5)], "es_kernels": meta}))
    return str(path)


def test_report_warns_about_a_loaded_run_and_withholds_spread_ratios(tmp_path, capsys):
    from benchmarks import report

    idle = {"threads": 2, "cores": 2, "loadavg": [2.1, 1.5, 1.0], "loadavg_start": [0.1, 0.1, 0.1]}
    assert report.main([_fake_results(tmp_path, idle)]) == 0
    text = capsys.readouterr().out
    assert "not trustworthy" not in text and "| 4.0x |" in text
    loaded = dict(idle, loadavg_start=[9.5, 9.0, 8.0])  # other processes already ran when the suites started
    assert report.main([_fake_results(tmp_path, loaded)]) == 0
    assert "**Warning: these figures are not trustworthy (machine loaded: load average 9.50" in capsys.readouterr().out
    busy_end = dict(idle, loadavg=[6.0, 5.0, 4.0])  # 2 of the 6 are the suites' own threads: 4 from others
    assert report.main([_fake_results(tmp_path, busy_end)]) == 0
    assert "not trustworthy" in capsys.readouterr().out
    assert report.main([_fake_results(tmp_path, idle, spread=0.8)]) == 0
    text = capsys.readouterr().out
    assert "unreliable (spread)" in text and "4.0x" not in text
