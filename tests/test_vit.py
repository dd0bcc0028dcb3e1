"""The es-vit recipe on a tiny ImageFolder: every method end to end, logs, plots, checkpoints, exact resume,
a 2-process torchrun (gloo) run, and bad configurations failing before any training."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

from es_kernels.train.loop import EvolvedTraining
from es_kernels.train.vit import checkpoint, cli, config, logs, model, recipe

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE = 3, 8, 3, 16
N_TRAIN = CLASSES * TRAIN_PER_CLASS
BATCH = 8
METHODS = ["baseline", "es", "eswp", "loss", "order"]
# A one-block ViT on 16x16 images (4 patches): each step takes milliseconds on one thread.
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16", "patch_size=8", "embed_dim=32", "depth=1"]
TINY += ["num_heads=2"]


def write_image_folder(root: Path) -> Path:
    """Class c is a noisy image tinted by channel c, so the tiny model can learn something in 2 epochs."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label in range(CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.rand(SIZE, SIZE, 3, generator=generator) * 0.5
                pixels[..., label] += 0.5
                Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), *TINY, "--epochs", "2", "--batch-size", str(BATCH),
        "--lr", "1e-3", "--workers", "0", "--threads", "1", "--device", "cpu", "--no-progress",
        "--anneal", "0.5", "0",  # epoch 1 anneals (observe path), epoch 2 selects
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def all_methods(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    results = cli.run(cli_args(data, out, "--method", *METHODS))
    return out, results


def expected_backprop(method: str) -> list[int]:
    """Cumulative back-propagated samples after each epoch, from the helper's own plan arithmetic."""
    training = EvolvedTraining(method, N_TRAIN, 2, anneal_start=0.5, anneal_end=0.0)
    counts, total = [], 0
    for epoch in range(2):
        size = training.sampler.epoch_size(epoch)
        rows = [min(BATCH, size - start) for start in range(0, size, BATCH)]
        selecting = training.selects and training.sampler.is_selecting(epoch)
        total += sum(training.num_selected(r) for r in rows) if selecting else size
        counts.append(total)
    return counts


def test_every_method_trains_and_logs(all_methods):
    out, results = all_methods
    assert list(results) == METHODS
    for method in METHODS:
        records = results[method]
        assert [r["epoch"] for r in records] == [0, 1]
        assert [r["backprop_samples"] for r in records] == expected_backprop(method)
        assert all(math.isfinite(r["train_loss"]) and 0.0 <= r["test_accuracy"] <= 1.0 for r in records)
        assert [r["selecting"] for r in records] == [False, method != "baseline"]
        log = json.loads((out / method / logs.LOG_NAME).read_text())
        assert log["config"]["method"] == method and log["epochs"] == records
        with open(out / method / logs.CSV_NAME) as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == list(logs.FIELDS) and len(rows) == 2
        assert float(rows[1]["backprop_samples"]) == records[1]["backprop_samples"]
        if method != "baseline":  # the baseline ran first into the same --out: its log is the reference
            assert records[1]["time_saved_vs_baseline"] is not None
    assert results["es"][1]["scored_samples"] == N_TRAIN  # epoch 2 scored every sample once
    assert results["baseline"][1]["scored_samples"] == 0


def test_plots_are_written_next_to_each_log_and_for_all_methods(all_methods):
    out, _ = all_methods
    for folder in [out, *(out / m for m in METHODS)]:
        for name in logs.PLOT_NAMES:
            png = (folder / name).read_bytes()
            assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_checkpoint_holds_everything_to_continue(all_methods):
    out, results = all_methods
    saved = torch.load(out / "eswp" / checkpoint.CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 2 and saved["records"] == results["eswp"]
    assert {"model", "optimizer", "scheduler", "scaler", "training", "rng"} <= set(saved)
    (state,) = saved["training"]  # one rank
    assert state["method"] == "eswp" and state["sampler"]["epoch"] == 1
    assert state["trained_samples"] == results["eswp"][1]["backprop_samples"]
    assert not torch.all(state["state"]["weight"] == 1.0 / N_TRAIN)  # the state moved
    steps = EvolvedTraining("eswp", N_TRAIN, 2, anneal_start=0.5, anneal_end=0.0).total_steps(BATCH)
    assert saved["scheduler"]["last_epoch"] == steps  # OneCycle told the exact step count and ran all of it
    assert len(saved["optimizer"]["state"]) > 0
    assert not list(out.glob("**/.*.tmp*"))  # atomic writes left no temporary file


def test_resume_after_epoch_one_continues_exactly(data, tmp_path, all_methods):
    out, results = all_methods
    args = cli_args(data, tmp_path, "--method", "eswp")
    first = cli.run([*args, "--stop-after", "1"])
    assert [r["epoch"] for r in first["eswp"]] == [0]
    with pytest.raises(SystemExit, match="already holds a run"):  # never silently overwrite a run
        cli.main(args)
    resumed = cli.run([*args, "--resume"])
    reference = torch.load(out / "eswp" / checkpoint.CHECKPOINT_NAME, weights_only=True)
    again = torch.load(tmp_path / "eswp" / checkpoint.CHECKPOINT_NAME, weights_only=True)
    ref_state, state = reference["training"][0], again["training"][0]
    for key in ("score", "weight"):
        assert torch.equal(state["state"][key], ref_state["state"][key])
    assert torch.equal(state["generator"], ref_state["generator"])
    assert torch.equal(state["sampler"]["shard"], ref_state["sampler"]["shard"])  # same epoch-2 pruning plan
    assert state["trained_samples"] == ref_state["trained_samples"]
    for name, tensor in reference["model"].items():
        assert torch.equal(again["model"][name], tensor), name
    for key in ("train_loss", "test_loss", "test_accuracy", "backprop_samples"):
        assert [r[key] for r in resumed["eswp"]] == [r[key] for r in results["eswp"]]


def test_mixup_and_cutmix_after_selection_under_bf16_autocast(data, tmp_path):
    extra = ["--method", "es", "--mixup", "0.8", "--cutmix", "1.0", "--precision", "bf16"]
    results = cli.run(cli_args(data, tmp_path, *extra))
    assert json.loads((tmp_path / "es" / logs.LOG_NAME).read_text())["config"]["precision"] == "bf16"
    assert [r["backprop_samples"] for r in results["es"]] == expected_backprop("es")
    assert all(math.isfinite(r["train_loss"]) for r in results["es"])


def test_mix_rows_keeps_an_odd_last_row_unmixed():
    from timm.data import Mixup

    mixer = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=4)
    inputs, labels = torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 2])
    last = inputs[-1].clone()
    mixed, soft = recipe.mix_rows(mixer, inputs, labels, 4, 0.0)
    assert mixed.shape == (3, 3, 4, 4) and soft.shape == (3, 4)
    assert torch.equal(mixed[-1], last) and soft[-1].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert torch.allclose(soft.sum(dim=1), torch.ones(3))
    _, single_soft = recipe.mix_rows(mixer, inputs[:1], labels[:1], 4, 0.0)
    assert single_soft.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_two_ranks_share_one_state(data, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "es_kernels.train.vit",
        *cli_args(data, tmp_path, "--method", "eswp"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "eswp" / checkpoint.CHECKPOINT_NAME, weights_only=True)
    rank0, rank1 = saved["training"]
    assert (rank0["sampler"]["rank"], rank1["sampler"]["rank"]) == (0, 1)
    assert not torch.equal(rank0["sampler"]["shard"], rank1["sampler"]["shard"])  # each rank its own shard
    for key in ("score", "weight"):
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    # Each rank saw half the ids in the annealing epoch; only the merge makes every sample's entry move on both.
    assert torch.all(rank0["state"]["score"] != 1.0 / N_TRAIN)
    records = saved["records"]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["backprop_samples"] == N_TRAIN  # summed over the ranks
    assert records[1]["scored_samples"] - records[0]["scored_samples"] == round(0.8 * N_TRAIN)  # ESWP keeps 80%


def test_demo_writes_its_data_and_runs(tmp_path):
    results = cli.run(
        ["--demo", "--out", str(tmp_path), "--method", "es", "--epochs", "1", "--batch-size", "512", "--threads", "1",
         "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32", "depth=1", "num_heads=2", "--no-progress",
         "--from-scratch"]
    )  # fmt: skip
    assert len(list((tmp_path / "data" / "train").glob("*/*.png"))) == 1347
    assert len(list((tmp_path / "data" / "val").glob("*/*.png"))) == 450
    # one epoch: 5% annealing rounds to no epoch, so it selects 25% of meta-batches of 512, 512 and 323 rows
    assert results["es"][0]["backprop_samples"] == 128 + 128 + 81
    assert (tmp_path / "es" / logs.LOG_NAME).exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prune-ratio", "1.0"], "--prune-ratio must be in"),
        (["--select-ratio", "0"], "--select-ratio must be in"),
        (["--model", "vit_nonexistent_patch99"], "unknown timm model"),
        (["--model-kwargs", "depth=-3"], "cannot build timm model"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--anneal", "0.7", "0.7"], "--anneal"),
    ],
)
def test_bad_configuration_fails_before_training(data, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        cli.main([*cli_args(data, tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_missing_data_folder_and_unreadable_checkpoint(data, tmp_path):
    with pytest.raises(SystemExit, match=r"data folder .* does not exist"):
        cli.main(cli_args(tmp_path / "missing", tmp_path / "out"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(SystemExit, match="has no train/ subfolder"):
        cli.main(cli_args(tmp_path / "bare", tmp_path / "out"))
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read --checkpoint"):
        cli.main([*cli_args(data, tmp_path / "out"), "--checkpoint", str(garbage)])
    with pytest.raises(SystemExit, match="cannot read --checkpoint"):
        cli.main([*cli_args(data, tmp_path / "out"), "--checkpoint", str(tmp_path / "absent.pt")])
    other = tmp_path / "other.pt"
    torch.save({"model": {"blocks.0.weight": torch.zeros(3)}}, other)
    with pytest.raises(SystemExit, match="does not fit"):
        cli.main([*cli_args(data, tmp_path / "out"), "--checkpoint", str(other)])
    assert not (tmp_path / "out").exists()


def test_model_name_is_checked_before_the_data_folder_is_read(tmp_path, monkeypatch):
    # Listing ImageNet takes minutes; a typo in --model must not wait for it.
    def no_scan(root):
        raise AssertionError("the data folder was scanned before the model name was checked")

    monkeypatch.setattr(config, "check_data", no_scan)
    with pytest.raises(SystemExit, match="unknown timm model"):
        cli.main([*cli_args(tmp_path / "anywhere", tmp_path / "out"), "--model", "vit_nonexistent_patch99"])


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    checkpoint.save_checkpoint(path, {"epoch": 1, "weights": torch.arange(4)})

    def torch_save_that_dies(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_that_dies)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"epoch": 2, "weights": torch.arange(8)})
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["weights"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_NAME]  # no temporary file left behind


def test_unknown_method_is_an_argparse_error(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main([*cli_args(data, tmp_path / "out"), "--method", "es", "nonsense"])
    assert raised.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_checkpoint_weights_load_and_a_head_of_another_shape_is_dropped(data, tmp_path, all_methods):
    """--checkpoint takes an es-vit checkpoint or a plain state dict; a classifier for other classes is left out."""
    out, _ = all_methods
    weights = dict(torch.load(out / "es" / checkpoint.CHECKPOINT_NAME, weights_only=True)["model"])
    weights["head.weight"] = torch.ones(7, weights["head.weight"].shape[1])  # a 7-class head
    weights["head.bias"] = torch.ones(7)
    path = tmp_path / "plain.pt"
    torch.save({f"module.{key}": value for key, value in weights.items()}, path)  # as a DDP model saves it
    args = cli.parse_args([*cli_args(data, tmp_path / "out"), "--checkpoint", str(path)])
    matched = model.match_weights(model.check_model(args, CLASSES), model.read_weights(path), "test")
    assert set(weights) - set(matched) == {"head.weight", "head.bias"}
    built = model.build_model(args, CLASSES, matched)
    for key, value in built.state_dict().items():
        if key in matched:
            assert torch.equal(value, weights[key]), key
        else:
            assert value.shape[0] == CLASSES and not torch.all(value == 1.0)
    results = cli.run([*cli_args(data, tmp_path / "out"), "--method", "baseline", "--checkpoint", str(path)])
    assert len(results["baseline"]) == 2


def test_pretrained_weights_out_of_reach_fail_at_start(data, tmp_path, monkeypatch):
    import timm

    original = timm.create_model

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:  # what timm raises without network or cache (huggingface_hub's LocalEntryNotFoundError)
            raise OSError("cannot find the requested files in the local cache")
        return original(*args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SystemExit, match=r"cannot get pretrained weights .* --checkpoint PATH"):
        cli.main([*cli_args(data, tmp_path / "out"), "--pretrained"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="pass one"):
        cli.main([*cli_args(data, tmp_path / "out"), "--pretrained", "--checkpoint", "x.pt"])


def test_the_recipe_modules_import_each_other_without_a_cycle():
    """Every import between the es-vit modules, also those inside functions: the graph has no cycle (cli.py and
    recipe.py used to import each other), and importing the command imports no training machinery."""
    import ast

    package = Path(cli.__file__).parent
    names = {path.stem for path in package.glob("*.py")} - {"__init__", "__main__"}
    graph = {}
    for name in names:
        tree = ast.parse((package / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "es_kernels.train.vit":
                found |= {alias.name for alias in node.names} & names
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("es_kernels.train.vit."):
                found.add(node.module.rsplit(".", 1)[1])
        graph[name] = found - {name}
    assert "cli" not in set().union(*graph.values()), graph  # nothing imports the command line
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for other in graph[name]:
                visit(other, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())
    code = "import sys, es_kernels.train.vit; print(sorted({'timm', 'torchvision', 'matplotlib'} & set(sys.modules)))"
    done_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done_run.returncode == 0 and done_run.stdout.strip() == "[]", done_run.stderr[-2000:]


# ----------------------------------------------------------------------------------------- timing and the demo's regime


def test_interleaved_methods_train_exactly_as_they_would_alone(data, tmp_path, all_methods, capsys):
    """Epochs round-robin over the methods; each method keeps its own random streams, so its records are the ones
    of the sequential run (augmentation and drop-path draw from global generators the others also draw from)."""
    _, results = all_methods
    capsys.readouterr()
    interleaved = cli.run(cli_args(data, tmp_path, "--method", "baseline", "es", "eswp", "--interleave"))
    lines = [line.split(" epoch ")[0] for line in capsys.readouterr().out.splitlines() if " epoch " in line[:15]]
    assert lines == ["baseline", "es", "eswp", "baseline", "es", "eswp"]
    for method in ("baseline", "es", "eswp"):
        for key in ("train_loss", "test_loss", "test_accuracy", "backprop_samples", "scored_samples"):
            assert [r[key] for r in interleaved[method]] == [r[key] for r in results[method]], (method, key)


def test_summary_gives_steady_epoch_medians_with_their_spread():
    def record(epoch, seconds, selecting=True, accuracy=0.5):
        return {"epoch": epoch, "epoch_seconds": seconds, "selecting": selecting, "test_accuracy": accuracy,
                "train_seconds": float(epoch + 1), "backprop_samples": 10 * (epoch + 1)}  # fmt: skip

    base = [record(e, 2.0 + 0.1 * e, selecting=False, accuracy=0.5 + 0.1 * e) for e in range(6)]
    # ES: an annealing first epoch (trains every row), then five selecting epochs at about half the baseline's.
    es = [record(0, 9.0, selecting=False)] + [record(e, 1.0 + 0.05 * e, accuracy=0.9) for e in range(1, 6)]
    rows = recipe.summary_rows({"baseline": base, "es": es})
    assert rows[1]["epoch_seconds_samples"] == [r["epoch_seconds"] for r in es[1:]]  # epoch 0 left out
    assert rows[1]["epoch_seconds"] == pytest.approx(1.15)
    assert rows[1]["epoch_spread"] == pytest.approx(
        (statistics.quantiles([1.05, 1.1, 1.15, 1.2, 1.25], n=4)[2] - statistics.quantiles([1.05, 1.1, 1.15, 1.2,
         1.25], n=4)[0]) / 1.15
    )  # fmt: skip
    assert rows[1]["ratio"] == pytest.approx(1.15 / 2.3)
    assert rows[1]["target"] == pytest.approx(0.995) and rows[0]["to_target"]["epoch"] == 5
    table = recipe.format_summary(rows)
    assert "| es | 90.00% | 60 | 6.0 | 1.15 (13%) | 0.50 (0%) | never |" in table  # 90% never reaches 99.5%
    assert "| baseline | 100.00% | 60 | 6.0 | 2.30 (13%) | 1.00 (0%) | 6.0 s, 60 samples |" in table


def test_warm_up_takes_first_calls_out_of_the_clock_and_changes_nothing(data, tmp_path, monkeypatch):
    from es_kernels.train.vit import runtime as runtime_module

    args = cli.parse_args(cli_args(data, tmp_path, "--method", "eswp", "--anneal", "0", "0"))
    run_time = runtime_module.resolve_runtime(args)
    datasets = config.check_data(args.data)
    run = recipe.Run.build(args, "eswp", run_time, datasets, None)
    calls = []
    real_select = recipe.evolved_select
    monkeypatch.setattr(recipe, "evolved_select", lambda *a, **k: calls.append(a[1].numel()) or real_select(*a, **k))
    weights = {k: v.clone() for k, v in run.bare.state_dict().items()}
    state = {k: v.clone() for k, v in run.training.state.state_dict().items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()
    run.warm_up()
    # Full meta-batches of 8, and the last batch of ESWP's pruned epoch 1: round(0.8 * 24) = 19 ids, 19 % 8 = 3.
    assert sorted(calls) == [3, 8]
    assert all(torch.equal(v, weights[k]) for k, v in run.bare.state_dict().items())
    assert all(p.grad is None for p in run.bare.parameters()) and not run.optimizer.state
    assert all(torch.equal(v, state[k]) for k, v in run.training.state.state_dict().items() if k in state)
    assert torch.equal(torch.get_rng_state(), rng) and run.bare.training


def test_training_steps_never_read_a_device_value(data, tmp_path, monkeypatch):
    """The progress bar used to read the running loss every 10 steps: a host sync in the middle of the step."""
    from es_kernels.train.vit import runtime as runtime_module

    args = cli.parse_args(cli_args(data, tmp_path, "--method", "es", "--batch-size", "2"))
    run_time = runtime_module.resolve_runtime(args)
    run = recipe.Run.build(args, "es", run_time, config.check_data(args.data), None)
    run.start_fresh()
    run.training.set_epoch(0)
    monkeypatch.setattr(recipe, "progress_bar", lambda **kwargs: ShownBar())
    reads = []
    real_item = torch.Tensor.item

    def item(tensor):
        reads.append(Path(sys._getframe(1).f_code.co_filename).name)
        return real_item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", item)
    run.train_epoch(0)  # 12 steps
    assert reads.count("recipe.py") == 1  # the epoch's total, once, after the steps


class ShownBar:
    """A progress bar that is drawn (so the loop fills its postfix), drawing nothing."""

    disable = False

    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def test_demo_fine_tunes_weights_pre_trained_once_and_cached(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from es_kernels.train.vit import demo

    tiny = ["--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=16", "depth=1", "num_heads=1"]
    argv = ["--demo", "--method", "es", "--epochs", "1", "--batch-size", "512", "--threads", "1", "--no-progress",
            "--pretrain-epochs", "1", "--cache-dir", str(tmp_path / "cache"), *tiny]  # fmt: skip
    loaded = []
    real_build = model.build_model
    monkeypatch.setattr(model, "build_model", lambda a, n, w: loaded.append(w) or real_build(a, n, w))
    cli.run([*argv, "--out", str(tmp_path / "first")])
    assert "pre-training the demo model on digit pairs" in capsys.readouterr().out
    (cached,) = (tmp_path / "cache").glob("vit-demo-pairs-*.pt")
    pairs = torch.load(cached, weights_only=True)
    assert pairs["head.weight"].shape[0] == demo.PAIRS  # trained on the 5 pairs, not the 10 digits
    fine_tuned_from = loaded[-1]
    assert "head.weight" not in fine_tuned_from  # the 5-way head is dropped; the 10-way one starts fresh
    assert all(torch.equal(fine_tuned_from[k], pairs[k]) for k in fine_tuned_from)
    stamp = cached.stat().st_mtime_ns
    cli.run([*argv, "--out", str(tmp_path / "second")])
    assert "pre-training" not in capsys.readouterr().out and cached.stat().st_mtime_ns == stamp  # reused
    cli.run([*argv, "--out", str(tmp_path / "scratch"), "--from-scratch"])
    assert loaded[-1] is None
    with pytest.raises(SystemExit, match=r"--from-scratch .* needs --demo"):
        cli.run(["--data", str(tmp_path), "--from-scratch"])


def test_demo_pre_training_is_the_same_whatever_the_run_s_thread_count(tmp_path):
    # The cache is built by whichever run comes first; a later run at another --threads, or in another process,
    # must fine-tune from the same weights, or the demo's accuracies depend on the machine's history (they moved
    # by 4 points).
    pytest.importorskip("sklearn")
    from es_kernels.train.vit import demo

    data = demo.write_digits_imagefolder(tmp_path / "digits")
    weights = []
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            random.seed(threads)  # timm's crops draw from Python's stream: the pre-training must seed it itself
            python_stream = random.getstate()
            args = cli.parse_args(["--demo", "--data", str(data), "--pretrain-epochs", "1"])
            args.cache_dir = tmp_path / f"cache-{threads}"
            weights.append(torch.load(demo.pretrain(args, torch.device("cpu")), weights_only=True))
            assert torch.get_num_threads() == threads  # the caller's count is given back
            assert random.getstate() == python_stream  # and its streams
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
