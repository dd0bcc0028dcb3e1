"""The command lines as a user meets them: each console script of pyproject.toml exits 0 after a short successful
run, every option of every parser has help and shows its default, the program names are what the user types, and no
progress-bar carriage returns land in a log. (setup.py's own tests are in test_build.py.)"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from es_kernels import _timing
from es_kernels.command import format_default

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")

# A short successful run of each console script (seconds on one thread). A script added to pyproject.toml needs a
# line here: test_every_console_script_has_a_short_run fails until it has one.
SHORT_RUNS = {
    "es-digits": lambda out: [
        "--methods", "baseline", "es", "--seeds", "0", "--epochs", "2", "--hidden", "16", "--threads", "1",
        "--out", str(out / "results.json"),
    ],
    "es-vit": lambda out: [
        "--demo", "--out", str(out), "--method", "es", "--epochs", "1", "--batch-size", "512", "--threads", "1",
        "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=16", "depth=1", "num_heads=1",
        "--pretrain-epochs", "1", "--cache-dir", str(out / "cache"),
    ],
    "es-sft": lambda out: ["--demo", "--quick", "--out", str(out)],
    "es-compare": lambda out: [
        "--methods", "baseline", "es", "--seeds", "0", "--epochs", "1", "--width", "2", "--pretrain-epochs", "0",
        "--repeats", "1", "--threads", "1", "--out", str(out), "--cache-dir", str(out / "cache"),
    ],
}  # fmt: skip

# Every command line with a parser: (how the user runs it, the module whose main() builds the parser).
COMMANDS = {
    "python3 -m es_kernels.train.digits": "es_kernels.train.digits",
    "python3 -m es_kernels.train.vit": "es_kernels.train.vit.cli",
    "python3 -m es_kernels.train.sft": "es_kernels.train.sft",
    "python3 -m es_kernels.train.compare": "es_kernels.train.compare",
    "python3 -m es_kernels.selfcheck": "es_kernels.selfcheck",
    "python3 -m es_kernels.triton.aot": "es_kernels.triton.aot",
    "python3 -m benchmarks.report": "benchmarks.report",
}


def environment() -> dict[str, str]:
    """This checkout first on the path (also for the subprocess), one thread."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def needs(script: str) -> None:
    if script == "es-sft":
        for module in ("transformers", "accelerate", "matplotlib"):
            pytest.importorskip(module)
    if script == "es-vit":
        for module in ("timm", "torchvision", "matplotlib"):
            pytest.importorskip(module)
    pytest.importorskip("sklearn")


def run_entry_point(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """What the console script's wrapper does, ``sys.exit(main())``, for the target pyproject.toml names."""
    module, _, function = SCRIPTS[script].partition(":")
    code = f"import sys; from {module} import {function} as main; sys.argv[0] = {script!r}; sys.exit(main())"
    command = [sys.executable, "-c", code, *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment(), cwd=ROOT)


def test_every_console_script_has_a_short_run():
    assert SCRIPTS, "pyproject.toml declares no [project.scripts]"
    missing = sorted(set(SCRIPTS) - set(SHORT_RUNS))
    assert not missing, f"add a short successful run of {missing} to SHORT_RUNS in tests/test_cli.py"


# es-compare's and es-vit's short runs are also tested in process in the fast tier (test_policies, test_vit): here
# they are slow; every other command's successful run is tested only here, so it stays fast.
IN_PROCESS_ALSO = {"es-compare", "es-vit"}


@pytest.mark.parametrize(
    "script",
    [pytest.param(name, marks=pytest.mark.slow if name in IN_PROCESS_ALSO else ()) for name in sorted(SCRIPTS)],
)
def test_console_script_target_exits_zero_after_a_successful_run(script, tmp_path):
    """A console script passes main()'s return value to sys.exit: anything but None or an int exits 1."""
    needs(script)
    done = run_entry_point(script, [*SHORT_RUNS[script](tmp_path), "--no-progress"])
    assert done.returncode == 0, f"{script} exited {done.returncode}: {done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_installed_console_script_exits_zero(script, tmp_path):
    """The script pip installed (CI installs the package before the tests; a local checkout may not have)."""
    needs(script)
    path = shutil.which(script)
    if path is None:
        message = f"console script {script} is not installed (pip install --no-build-isolation -e .)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    command = [path, *SHORT_RUNS[script](tmp_path), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment(), cwd=tmp_path)
    assert done.returncode == 0, f"{script} exited {done.returncode}: {done.stderr[-3000:]}"


def test_entry_points_return_nothing(tmp_path, monkeypatch):
    from es_kernels.train import digits
    from es_kernels.train.vit import cli, recipe

    pytest.importorskip("sklearn")
    argv = [*SHORT_RUNS["es-digits"](tmp_path), "--methods", "es", "--epochs", "1", "--no-progress"]
    assert digits.main(argv) is None
    assert len(digits.run(argv)) == 1  # the rows stay available to Python callers
    records = {"es": [{"epoch": 0}]}
    monkeypatch.setattr(recipe, "run_all", lambda args: records)
    assert cli.main(["--data", str(tmp_path)]) is None
    assert cli.run(["--data", str(tmp_path)]) is records


class ParserBuilt(Exception):
    pass


def built_parser(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command's main() builds, caught at its parse_args (nothing runs)."""
    module = importlib.import_module(module_name)
    caught = []

    def capture(self, *args, **kwargs):
        caught.append(self)
        raise ParserBuilt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(ParserBuilt):
        module.main([])
    monkeypatch.undo()
    return caught[0]


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(prog, monkeypatch):
    if "vit" in prog:
        pytest.importorskip("timm")
    parser = built_parser(COMMANDS[prog], monkeypatch)
    assert parser.prog == prog
    assert parser.description and parser.description.strip()
    text = " ".join(parser.format_help().split())
    assert text.startswith(f"usage: {prog} ")
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{prog}: {name} has no help"
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))
        if action.option_strings and not switch and action.default not in (None, "", []):
            shown = f"(default: {format_default(action.default)})" if "vit" in prog or "digits" in prog else "default"
            assert any(" ".join(shown.split()) in part for part in text.split(name)[1:]), f"{prog}: {name} default"


def test_program_name_is_the_console_script_when_that_runs(monkeypatch):
    from es_kernels.train import digits
    from es_kernels.train.vit import cli

    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/es-digits"])
    assert digits.build_parser().prog == "es-digits"
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/es-vit"])
    assert cli.build_parser().prog == "es-vit"
    monkeypatch.setattr(sys, "argv", ["/somewhere/es_kernels/train/vit/__main__.py"])
    assert cli.build_parser().prog == "python3 -m es_kernels.train.vit"


def test_digits_help_from_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "es_kernels.train.digits", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python3 -m es_kernels.train.digits ")
    assert "(default: 0 1 2)" in " ".join(done.stdout.split())


def test_vit_help_shows_the_demo_settings():
    pytest.importorskip("timm")
    from es_kernels.train.vit import cli

    text = " ".join(cli.build_parser().format_help().split())
    assert "--demo sets these defaults" in text
    for name, value in cli.DEMO_DEFAULTS.items():
        shown = " ".join(f"{k}={v}" for k, v in value) if name == "model_kwargs" else format_default(value)
        assert f"--{name.replace('_', '-')} {shown}" in text, name


# --------------------------------------------------------------------------------------------- progress


def test_no_carriage_returns_in_a_log(tmp_path):
    """Output redirected to a file (no terminal) gets no tqdm redraws, even without --no-progress."""
    pytest.importorskip("sklearn")
    log = tmp_path / "run.log"
    argv = SHORT_RUNS["es-digits"](tmp_path)
    with open(log, "w") as handle:
        command = [sys.executable, "-m", "es_kernels.train.digits", *argv]
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=600, env=environment())
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and "| method |" in text


def test_progress_bar_only_on_a_terminal_and_when_wanted(monkeypatch):
    import io

    from es_kernels.train import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress.progress_bar(total=3), progress.NoProgress)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(progress.progress_bar(wanted=False, total=3), progress.NoProgress)
    pytest.importorskip("tqdm")
    with progress.progress_bar(total=3) as bar:
        assert not isinstance(bar, progress.NoProgress)
        bar.update(3)
    assert "3/3" in sys.stderr.getvalue()


def test_no_progress_switch_is_on_every_training_command(monkeypatch):
    for module in ("es_kernels.train.digits", "es_kernels.train.vit.cli"):
        if "vit" in module and importlib.util.find_spec("timm") is None:
            continue
        parser = built_parser(module, monkeypatch)
        assert "--no-progress" in parser._option_string_actions, module


# ----------------------------------------------------------------------------------------- es-compare's evidence


def tiny_compare(out: Path, *extra: str) -> list[str]:
    return ["--width", "2", "--pretrain-epochs", "0", "--threads", "1", "--no-progress", "--out", str(out / "out"),
            "--cache-dir", str(out / "cache"), *extra]  # fmt: skip


def test_compare_runs_interleave_methods_seeds_and_repeats():
    from es_kernels.train import compare

    order = compare.schedule(["a", "b", "c"], [0, 1], 2)
    assert len(order) == 12 and len(set(order)) == 12
    assert order[:6] == [(0, 0, "a"), (0, 0, "b"), (0, 0, "c"), (0, 1, "b"), (0, 1, "c"), (0, 1, "a")]
    # Every method runs first in some round: none is always the one that starts after evaluation or a load swing.
    firsts = {order[i][2] for i in range(0, 12, 3)}
    assert firsts == {"a", "b", "c"}


def test_compare_prints_medians_with_their_spread_and_says_it_warmed_up(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from es_kernels.train import compare

    argv = tiny_compare(tmp_path, "--methods", "baseline", "es", "--seeds", "0", "1", "--epochs", "1", "--repeats", "2")
    rows = compare.run(argv)
    printed = capsys.readouterr().out
    assert "| " + " | ".join(compare.TABLE_COLUMNS) + " |" in printed
    assert "warm-up: every method trained two tiny epochs before the clock started" in printed
    assert "medians over 4 runs per method (2 seeds x 2 repeats, interleaved)" in printed
    assert printed.startswith("\n") and "machine: " in printed and "1 torch thread(s)" in printed
    for row in rows:
        assert row["runs"] == 4 and row["repeats_agree"]  # repeats differ in time only
        samples = row["seconds_samples"]
        assert row["seconds_median"] == pytest.approx(statistics.median(samples))
        assert row["seconds_spread"] == pytest.approx(_timing.spread(samples))
        assert f"{row['seconds_median']:.1f} ({100 * row['seconds_spread']:.0f}%)" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted((r["repeat"], r["seed"]) for r in results["runs"] if r["method"] == "es") == [
        (0, 0), (0, 1), (1, 0), (1, 1)
    ]  # fmt: skip


def test_compare_target_is_reached_by_the_baseline_in_every_seed():
    """The old target (the baseline's mean final accuracy - 0.5 pt) was out of reach of a seed that ended lower."""
    from es_kernels.train import compare

    def run(method, seed, accuracies):
        curve = [{"epoch": e, "seconds": float(e + 1), "backprop_samples": 10 * e, "test_accuracy": a}
                 for e, a in enumerate(accuracies)]  # fmt: skip
        return {"method": method, "seed": seed, "repeat": 0, "test_accuracy": accuracies[-1], "seconds": 3.0,
                "cpu_seconds": 3.0, "backprop_samples": 20, "curve": curve}  # fmt: skip

    runs = [run("baseline", 0, [0.5, 0.90, 0.89]), run("baseline", 1, [0.5, 0.95, 0.97]),
            run("es", 0, [0.5, 0.80, 0.96]), run("es", 1, [0.5, 0.70, 0.80])]  # fmt: skip
    rows = compare.summarise(runs, ["baseline", "es"])
    assert rows[0]["target_accuracy"] == pytest.approx(0.90 - compare.TARGET_MARGIN)
    assert rows[0]["seeds_reaching_target"] == 2 and rows[0]["seconds_to_target"] == 2.0
    assert rows[1]["seeds_reaching_target"] == 1 and rows[1]["seconds_to_target"] == 3.0


@pytest.mark.slow  # a training-length run of the default task (12 s)
def test_compare_default_task_is_not_solved_in_its_first_epoch(tmp_path):
    """With the full 8x8 digits every method was within about a point of its final accuracy after one epoch."""
    pytest.importorskip("sklearn")
    from es_kernels.train import compare

    argv = ["--methods", "baseline", "--seeds", "0", "--repeats", "1", "--threads", "1", "--no-progress"]
    compare.run([*argv, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    curve = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]["curve"]
    after_first, final = curve[1]["test_accuracy"], curve[-1]["test_accuracy"]
    assert final - after_first > 0.05, (after_first, final)


def test_compare_pre_training_is_the_same_whatever_the_run_s_thread_count(tmp_path):
    """The cached features are built by whichever run comes first: at 2 threads they differed from 1 thread's, so
    the main table's accuracies depended on the --threads of an earlier run."""
    pytest.importorskip("sklearn")
    from es_kernels.train import compare
    from es_kernels.train.digits import load_digits_split

    x_train, y_train, _, _ = load_digits_split()
    x_train = compare.upsample(x_train, compare.DEFAULT_PIXELS)
    features = []
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            args = argparse.Namespace(width=32, pretrain_epochs=1, cache_dir=tmp_path / f"cache-{threads}")
            features.append(compare.pretrained_features(x_train, y_train, args))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(features[0][key], features[1][key]) for key in features[0])


@pytest.mark.skipif(_timing.BUSY_SOURCE is None or _timing.BUSY_SOURCE() is None, reason="no /proc/stat")
def test_compare_warns_when_a_cpu_burning_process_runs_beside_it(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from es_kernels.train import compare

    burn = "import time\nend = time.time() + 120\nwhile time.time() < end: pass"
    # Twice as many busy processes as cores: the timed thread then keeps clearly less than its core.
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2 * _timing.cores())]
    try:
        compare.run(tiny_compare(tmp_path, "--methods", "baseline", "es", "--seeds", "0", "--epochs", "2",
                                 "--repeats", "1"))  # fmt: skip
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert "warning: the timings above are not trustworthy (machine loaded" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- es-sft --demo's timing


def test_sft_demo_charges_no_first_call_cost_to_a_method(tmp_path, monkeypatch, capsys):
    """On an H200, ES's first scoring call compiled Triton kernels for 3.8 s of a quick run the baseline finished in
    0.2 s: the demo printed ES "time saved -1918%". The fake run below costs 40 s on a method's first call only."""
    needs("es-sft")
    from es_kernels.train import sft

    first_calls, calls = set(), []

    def run_method(method, model, train, held_out, options):
        compiling = method not in first_calls
        first_calls.add(method)
        calls.append((method, len(train)))
        seconds = (40.0 if compiling else 0.0) + {"baseline": 2.0}.get(method, 1.0) + 0.1 * (len(calls) % 2)
        return {"method": method, "batch": 16, "held_out_loss": 2.0, "perplexity": math.e**2, "seconds": seconds,
                "sequences": 10, "tokens": 100, "scoring_path": "x", "curve": [{"seconds": seconds, "tokens": 100,
                "loss": 2.0}]}  # fmt: skip

    monkeypatch.setattr(sft, "run_method", run_method)
    results = sft.run(["--demo", "--quick", "--repeats", "2", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    # One warm-up step per method on one meta-batch (B = 16 / 0.25 rows), then two rounds, the order rotated.
    assert calls[:3] == [("baseline", 64), ("es", 64), ("eswp", 64)]
    assert [method for method, _ in calls[3:]] == ["baseline", "es", "eswp", "es", "eswp", "baseline"]
    es = results[1]
    assert max(es["seconds_samples"]) < 2.0 and 0.4 < es["ratio"] < 0.6  # no 40 s compile charged to ES
    assert "no first-call cost is charged to a method" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| es |"))
    assert f"{_timing.with_spread(es['seconds'], es['seconds_spread'], 1)} |" in row
    assert row.endswith(f"| {1 - es['ratio']:.0%} |")
