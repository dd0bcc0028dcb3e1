"""The es-vit training loop: each method of a run checked, built into one :class:`Run`, trained epoch by epoch.

Every setting is checked before the first step (:mod:`~es_kernels.train.vit.config`,
:mod:`~es_kernels.train.vit.model`); then each method runs through the same loop, ``EvolvedTraining`` being the
only place where methods differ. Under ``torchrun`` the model is wrapped in DDP and the ES state is merged across
ranks by the library (``EvolvedTraining.set_epoch``), with one extra merge at each epoch end so the checkpoint and
the log describe one agreed state.

Mixup/cutmix mix the *selected* rows (the scores belong to the original images). With batch mixing on, annealing
epochs score the unmixed rows too (``EvolvedTraining(score_annealing=True)``): the state must learn the samples'
own losses, never the mixed rows'. That costs one no-grad forward per annealing step (5% of epochs at each end).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from es_kernels import _timing
from es_kernels.reference import per_sample_cross_entropy
from es_kernels.select import evolved_select
from es_kernels.state import EvolvedState
from es_kernels.train.data import IndexedDataset, corrupt_labels
from es_kernels.train.loop import EvolvedTraining
from es_kernels.train.progress import progress_bar
from es_kernels.train.vit import checkpoint, config, demo, logs, model
from es_kernels.train.vit.config import ConfigError
from es_kernels.train.vit.runtime import Runtime, all_sum, gather, resolve_runtime, start_distributed, to_cpu

Records = dict[str, list[dict[str, Any]]]


def run_all(args: argparse.Namespace) -> Records:
    """Check everything, then run each method of ``args.method`` in turn. Returns the epoch records per method."""
    config.check_arguments(args)
    runtime = resolve_runtime(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start_distributed(runtime)
    try:
        return _run_all(args, runtime)
    finally:
        if runtime.owns_group:
            dist.destroy_process_group()


def _run_all(args: argparse.Namespace, runtime: Runtime) -> Records:
    datasets, weights, baseline_log = check_everything(args, runtime)
    log_paths = [args.out / method / logs.LOG_NAME for method in args.method]
    # On the CPU the load meter, the speed probe and the frozen set-up stand behind the epoch times (on a GPU the
    # host's load matters less, and the DataLoader workers, child processes, would count as others).
    timed = _timing.TimedRuns() if runtime.device.type == "cpu" else None
    epochs = {
        method: method_epochs(args, method, runtime, datasets, weights, baseline_log, log_paths)
        for method in args.method
    }
    with timed if timed is not None else contextlib.nullcontext():
        records = drive(epochs, interleave=args.interleave, before_epoch=None if timed is None else timed.before_run)
    results: Records = {method: records[method] if runtime.main else [] for method in args.method}
    if runtime.main and len(args.method) > 1:
        logs.plot_logs(plot_inputs(args, log_paths), args.out)
    if runtime.main:
        rows = summary_rows(results)
        print(format_summary(rows))
        print(SUMMARY_NOTE)
        if timed is not None:
            timed.report(torch.get_num_threads(), [row["epoch_seconds_samples"] for row in rows], SPREAD_LIMIT)
    return results


def drive(
    epochs: dict[str, Iterator[dict[str, Any]]], *, interleave: bool, before_epoch: Callable[[], None] | None = None
) -> Records:
    """Run each method's epochs (generators that return the method's records): one method after another, or with
    ``interleave`` one epoch of each in turn, so a load swing on a shared machine hits every method alike.
    ``before_epoch`` runs before each epoch, outside its clock."""
    results: Records = {}
    pending = dict(epochs)
    while pending:
        for method in list(pending):
            while True:
                if before_epoch is not None:
                    before_epoch()
                try:
                    next(pending[method])
                except StopIteration as finished:
                    results[method] = finished.value
                    del pending[method]
                    break
                if interleave:
                    break
    return results


def check_everything(args: argparse.Namespace, runtime: Runtime) -> tuple[tuple[Any, Any], Any, dict | None]:
    """The checks that read files (model name first, then the data, weights, logs and checkpoints of every method).

    Returns the (train, val) data sets, the initial weights (or None) and the baseline log (or None).
    """
    model.check_model_name(args.model)
    if args.demo and args.data is None:
        args.data = args.out / "data"
        if runtime.main:
            demo.write_digits_imagefolder(args.data)
        if runtime.distributed:
            dist.barrier()
    datasets = config.check_data(args.data)  # scanned once: listing ImageNet's 1.3M files takes a while
    train_set = datasets[0]
    meta_model = model.check_model(args, len(train_set.classes))
    if args.demo and not args.from_scratch and args.checkpoint is None and not args.pretrained:
        # The paper's regime: every method fine-tunes the same pre-trained weights (trained once, then cached).
        path = demo.pretrained_path(args)
        if runtime.main and not path.exists():
            print(f"pre-training the demo model on digit pairs ({args.pretrain_epochs} epochs; cached in {path})")
            demo.pretrain(args, runtime.device)
        if runtime.distributed:
            dist.barrier()
        args.checkpoint = path
    weights = None
    if args.checkpoint is not None:
        weights = model.match_weights(
            meta_model, model.read_weights(args.checkpoint), f"--checkpoint {args.checkpoint}"
        )
    for path in [args.baseline_log, *args.compare]:
        if path is not None:
            try:
                logs.read_log(path)
            except ValueError as error:
                raise ConfigError(str(error)) from None
    baseline_log = logs.read_log(args.baseline_log) if args.baseline_log is not None else None
    for method in args.method:
        path = args.out / method / checkpoint.CHECKPOINT_NAME
        if path.exists() and not args.resume:
            raise ConfigError(
                f"{path.parent} already holds a run; pass --resume to continue it or choose another --out"
            )
        if path.exists():
            run_config = config.run_config(args, method, runtime.world_size, runtime.precision)
            config.check_resume(checkpoint.load_checkpoint(path), run_config, path)
        # The training helper checks its own settings (e.g. too few samples left after pruning for the ranks).
        try:
            make_training(args, method, len(train_set), runtime)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"method {method}: {error}") from None
    return datasets, weights, baseline_log


def plot_inputs(args: argparse.Namespace, log_paths: list[Path]) -> list[Path]:
    extra = [args.baseline_log] if args.baseline_log is not None else []
    return [path for path in [*extra, *log_paths, *args.compare] if path.exists()]


def make_training(args: argparse.Namespace, method: str, num_samples: int, runtime: Runtime) -> EvolvedTraining:
    beta1, beta2 = args.betas if args.betas is not None else (None, None)
    return EvolvedTraining(
        method,
        num_samples,
        args.epochs,
        select_ratio=args.select_ratio,
        prune_ratio=args.prune_ratio,
        settings=config.method_settings(args, method) or None,
        beta1=beta1,
        beta2=beta2,
        anneal_start=args.anneal[0],
        anneal_end=args.anneal[1],
        label_smoothing=args.label_smoothing,
        scoring_mode=args.scoring_mode,
        seed=args.seed,
        device=runtime.device,
        backend=args.backend,
        sync=args.sync,
        num_replicas=runtime.world_size,
        rank=runtime.rank,
        score_annealing=args.mixup > 0 or args.cutmix > 0,
    )


def mix_rows(mixer: Any, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, smoothing: float):
    """timm's Mixup on the selected rows; it needs an even count, so an odd last row keeps its (smoothed) label."""
    from timm.data.mixup import mixup_target

    count = inputs.shape[0]
    if count % 2 == 0:
        return mixer(inputs, labels)
    last = mixup_target(labels[-1:], num_classes, lam=1.0, smoothing=smoothing)
    if count == 1:
        return inputs, last
    mixed, soft = mixer(inputs[:-1], labels[:-1])
    return torch.cat([mixed, inputs[-1:]]), torch.cat([soft, last.to(soft.dtype)])


def evaluate(module: torch.nn.Module, loader: Any, runtime: Runtime) -> tuple[float, float, float]:
    """(loss, top-1, top-5 accuracy) on the whole validation set, each rank scoring its own slice."""
    was_training = module.training
    module.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top-1, top-5, count
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(runtime.device), labels.to(runtime.device)
            with runtime.autocast():
                logits = module(images)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals[0] += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            totals[1] += (top[:, 0] == labels).sum()
            totals[2] += (top == labels[:, None]).any(dim=1).sum()
            totals[3] += labels.numel()
    module.train(was_training)
    loss_sum, correct1, correct5, count = all_sum(runtime, *totals.tolist())
    count = max(count, 1.0)
    return loss_sum / count, correct1 / count, correct5 / count


@dataclasses.dataclass
class EpochTotals:
    """One rank's sums over one epoch's training steps."""

    loss_sum: float
    rows: float
    seconds: float


@dataclasses.dataclass
class Run:
    """One method's training: what the loop reads and updates, and exactly what a checkpoint saves and restores."""

    args: argparse.Namespace
    method: str
    runtime: Runtime
    config: dict[str, Any]
    bare: torch.nn.Module  # the model itself: scored, evaluated and saved
    model: torch.nn.Module  # what the training forward calls: ``bare`` or its DDP wrapper
    training: EvolvedTraining
    loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    mixer: Any  # timm's Mixup, or None
    num_classes: int
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    train_seconds: float = 0.0
    wall_clock: float = 0.0

    @property
    def out(self) -> Path:
        return self.args.out / self.method

    @property
    def checkpoint_path(self) -> Path:
        return self.out / checkpoint.CHECKPOINT_NAME

    @classmethod
    def build(
        cls,
        args: argparse.Namespace,
        method: str,
        runtime: Runtime,
        datasets: tuple[Any, Any],
        weights: dict[str, torch.Tensor] | None,
    ) -> Run:
        """Model, data loaders, optimizer and schedule of a fresh run (a resume then loads its state over them)."""
        from timm.optim import param_groups_weight_decay
        from torch.utils.data import DataLoader, Subset

        checkpoint.seed_all(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        # Copies: this method's label noise and transforms must not leak into the next method's run.
        train_set, val_set = (copy.copy(dataset) for dataset in datasets)
        num_classes = len(train_set.classes)
        if args.label_noise is not None:
            mode, rate = args.label_noise
            noisy, _ = corrupt_labels(
                torch.tensor(train_set.targets), rate, num_classes=num_classes, mode=mode, seed=args.seed
            )
            train_set.targets = noisy.tolist()
            train_set.samples = [
                (path, label) for (path, _), label in zip(train_set.samples, train_set.targets, strict=True)
            ]
        bare = model.build_model(args, num_classes, weights).to(runtime.device)
        train_set.transform, val_set.transform = model.transforms(args, bare)

        training = make_training(args, method, len(train_set), runtime)
        per_rank_batch = args.batch_size // runtime.world_size
        pin = runtime.device.type == "cuda"
        loader = DataLoader(
            IndexedDataset(train_set),
            batch_size=per_rank_batch,
            sampler=training.sampler,
            num_workers=args.workers,
            pin_memory=pin,
        )
        val_loader = DataLoader(
            Subset(val_set, range(runtime.rank, len(val_set), runtime.world_size)),
            batch_size=args.eval_batch_size or per_rank_batch,
            num_workers=args.workers,
            pin_memory=pin,
        )
        no_decay = bare.no_weight_decay() if hasattr(bare, "no_weight_decay") else ()
        optimizer = torch.optim.AdamW(
            param_groups_weight_decay(bare, args.weight_decay, no_weight_decay_list=no_decay), lr=args.lr
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=args.lr,
            total_steps=training.total_steps(per_rank_batch),
            pct_start=args.pct_start,
            anneal_strategy="cos",
        )
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
        mixer = None
        if args.mixup > 0 or args.cutmix > 0:
            from timm.data import Mixup

            mixer = Mixup(
                mixup_alpha=args.mixup,
                cutmix_alpha=args.cutmix,
                label_smoothing=args.label_smoothing,
                num_classes=num_classes,
            )
        run_config = config.run_config(args, method, runtime.world_size, runtime.precision)
        return cls(
            args, method, runtime, run_config, bare, bare, training, loader, val_loader, optimizer, scheduler,
            scaler, mixer, num_classes,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint after the last recorded epoch (collective: every rank must call it)."""
        training_states = gather(self.runtime, to_cpu(self.training.state_dict()))
        rng_states = gather(self.runtime, checkpoint.rng_state(self.runtime))
        return {
            "format": checkpoint.CHECKPOINT_FORMAT,
            "epoch": self.records[-1]["epoch"] + 1,
            "config": json.dumps(self.config),
            "model": self.bare.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "training": training_states,
            "rng": rng_states,
            "records": self.records,
            "train_seconds": self.train_seconds,
            "wall_clock": self.wall_clock,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue exactly after the checkpoint's last epoch: every state and this rank's random streams."""
        self.bare.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.training.load_state_dict(saved["training"][self.runtime.rank])
        checkpoint.set_rng_state(self.runtime, saved["rng"][self.runtime.rank])
        self.records = list(saved["records"])
        self.start_epoch = int(saved["epoch"])
        self.train_seconds, self.wall_clock = float(saved["train_seconds"]), float(saved["wall_clock"])

    def warm_up(self) -> None:
        """One untimed step of every kind the epochs will take, on throwaway state: the model's first forward and
        backward, and the selection backend's first calls (loading the extension, compiling Triton kernels on a GPU)
        for the full meta-batch and for each selecting epoch's shorter last batch (a kernel's block size follows the
        batch). The weights, the optimizer, the ES state and every random stream are left as they were; the model
        runs in eval mode, so no BatchNorm statistics move."""
        runtime, training, bare = self.runtime, self.training, self.bare
        per_rank_batch = self.loader.batch_size
        sizes = {per_rank_batch}
        if training.selects:
            sampler = training.sampler
            for epoch in range(self.args.epochs):
                if sampler.is_selecting(epoch) and sampler.epoch_size(epoch) % per_rank_batch:
                    sizes.add(sampler.epoch_size(epoch) % per_rank_batch)
        devices = [runtime.device] if runtime.device.type == "cuda" else []
        was_training = bare.training
        bare.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                images, labels = next(iter(self.val_loader))  # the eval transform: the training input's shape
                repeat = -(-per_rank_batch // labels.numel())
                images = images.repeat(repeat, *([1] * (images.dim() - 1)))[:per_rank_batch].to(runtime.device)
                labels = labels.repeat(repeat)[:per_rank_batch].to(runtime.device)
                with runtime.autocast():
                    logits = bare(images)
                per_sample_cross_entropy(logits, labels, self.args.label_smoothing).mean().backward()
                self.optimizer.zero_grad(set_to_none=True)
                if training.selects:
                    generator = torch.Generator(device=runtime.device).manual_seed(0)
                    for size in sorted(sizes):
                        state = EvolvedState(size, device=runtime.device)
                        ids = torch.arange(size, device=runtime.device)
                        evolved_select(
                            state, ids, training.num_selected(size), logits=logits[:size].detach(),
                            targets=labels[:size], label_smoothing=training.label_smoothing,
                            generator=generator, backend=training.backend, check_values=training.check_values,
                        )  # fmt: skip
                        # Annealing epochs update the state from the training forward's losses.
                        state.observe(ids, torch.ones(size, device=runtime.device), check_values=training.check_values)
        finally:
            bare.train(was_training)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)

    def start_fresh(self) -> None:
        """This rank's own augmentation, drop-path and mixup streams (a resume restores them instead)."""
        checkpoint.seed_all(self.args.seed * 1_000_003 + self.runtime.rank + 1)

    def wrap(self) -> None:
        """Under torchrun, the training forward goes through DDP (after any state was loaded into ``bare``)."""
        if self.runtime.distributed:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.bare, device_ids=device_ids)

    # ----------------------------------------------------------------------------------------- the loop

    def train_epoch(self, epoch: int) -> EpochTotals:
        """One epoch's steps on this rank."""
        args, runtime, training = self.args, self.runtime, self.training
        self.model.train()
        steps = len(self.loader)
        bar = progress_bar(
            wanted=not args.no_progress and runtime.main,
            total=steps,
            desc=f"{self.method} {epoch + 1}/{args.epochs}",
            unit="step",
            leave=False,
            dynamic_ncols=True,
        )
        loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
        rows = 0
        scored0, trained0 = training.scored_samples, training.trained_samples
        seen = 0
        # The iterator (and any worker start-up) before the clock: the epoch's time is its steps'.
        batches = iter(self.loader)
        began = time.perf_counter()
        for step, (indices, images, labels) in enumerate(batches):
            # All three copies asynchronous: a blocking copy of the ids would wait for the GPU's queue every step.
            indices = indices.to(runtime.device, non_blocking=True)
            images = images.to(runtime.device, non_blocking=True)
            labels = labels.to(runtime.device, non_blocking=True)
            seen += labels.numel()
            with runtime.autocast():
                # Score on the bare module: a DDP forward would prepare a gradient reduction that never comes.
                batch = training.select(self.bare, indices, images, labels)
            inputs, targets, smoothing = batch.inputs, batch.targets, args.label_smoothing
            if self.mixer is not None:
                inputs, targets = mix_rows(self.mixer, inputs, targets, self.num_classes, args.label_smoothing)
                smoothing = 0.0  # already in the mixed soft targets
            with runtime.autocast():
                logits = self.model(inputs)
            losses = per_sample_cross_entropy(logits, targets, smoothing)
            training.observe(batch, losses, outputs=logits)
            # Set-level plans may re-weight rows (InfoBatch); the log keeps the plain losses.
            weighted = batch.weigh(losses)
            # sum / count, not mean(): a rank whose rows were all sharding padding still joins DDP's reduction with 0
            loss = weighted.sum() / max(losses.numel(), 1)
            self.step(loss)
            loss_sum += losses.detach().sum()
            rows += losses.numel()
            bar.update(1)
            if not bar.disable and (step % 10 == 0 or step == steps - 1):
                elapsed = max(time.perf_counter() - began, 1e-9)
                scored = training.scored_samples - scored0
                trained = training.trained_samples - trained0
                # Host values only: reading the running loss would stall the GPU's queue (the epoch line gives it).
                bar.set_postfix(
                    img_s=f"{seen / elapsed:.0f}",
                    sel=f"{trained / scored:.2f}" if scored else "1.00",
                    lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                )
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        seconds = time.perf_counter() - began
        bar.close()
        return EpochTotals(float(loss_sum.item()), float(rows), seconds)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, optional clipping, the optimizer and schedule steps (through the fp16 GradScaler if on)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.args.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        with self.training.scaled_lr(self.optimizer):  # KAKURENBO's per-epoch factor; 1 for every other method
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def record(self, epoch: int, totals: EpochTotals, baseline: dict[str, Any] | None) -> dict[str, Any]:
        """Evaluate and sum this epoch over the ranks into one log record (collective)."""
        training = self.training
        test_loss, top1, top5 = evaluate(self.bare, self.val_loader, self.runtime)
        loss_sum, rows, scored, trained, seconds = all_sum(
            self.runtime, totals.loss_sum, totals.rows, training.scored_samples, training.trained_samples,
            totals.seconds,
        )  # fmt: skip
        seconds /= self.runtime.world_size  # ranks run in lockstep; the mean is the epoch's time
        self.train_seconds += seconds
        return {
            "epoch": epoch,
            "method": self.method,
            "selecting": training.selecting,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / max(rows, 1.0),
            "test_loss": test_loss,
            "test_accuracy": top1,
            "test_top5": top5,
            "epoch_seconds": seconds,
            "train_seconds": self.train_seconds,
            "wall_clock": 0.0,
            "scored_samples": int(scored),
            "backprop_samples": int(trained),
            "time_saved_vs_baseline": time_saved(self.train_seconds, epoch, baseline, self.method),
        }

    def write(self, saved: dict[str, Any], earlier_logs: list[Path]) -> None:
        """Rank 0: the checkpoint, the logs and this method's plots."""
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.save_checkpoint(self.checkpoint_path, saved)
        log_path = logs.write_log(self.out, self.config, self.records)
        base = [self.args.baseline_log] if self.args.baseline_log is not None else []
        plotted = [*base, *earlier_logs, log_path, *self.args.compare]
        logs.plot_logs([p for p in plotted if p.exists()], self.out)


def method_epochs(
    args: argparse.Namespace,
    method: str,
    runtime: Runtime,
    datasets: tuple[Any, Any],
    weights: dict[str, torch.Tensor] | None,
    baseline_log: dict[str, Any] | None,
    log_paths: list[Path],
) -> Generator[dict[str, Any], None, list[dict[str, Any]]]:
    """Train one method to ``--epochs`` (or ``--stop-after``), from its checkpoint under ``--resume``: yields each
    new epoch's record, returns all records. Nothing is built before the first ``next``."""
    path = args.out / method / checkpoint.CHECKPOINT_NAME
    saved = checkpoint.load_checkpoint(path) if args.resume and path.exists() else None
    if saved is not None and saved["epoch"] >= args.epochs:
        if runtime.main:
            print(f"{method}: already finished ({path})")
        return list(saved["records"])

    run = Run.build(args, method, runtime, datasets, weights)
    run.warm_up()  # before any random stream is set: the warm-up leaves them as they were anyway
    if saved is not None:
        run.load_state_dict(saved)
        if runtime.main:
            print(f"{method}: resuming after epoch {run.start_epoch} from {path}")
    else:
        run.start_fresh()
    del saved
    run.wrap()
    others = [p for p in log_paths if p != args.out / method / logs.LOG_NAME]
    # This method's own random streams, put back before each of its epochs: interleaved with other methods (whose
    # epochs draw from the same global generators) it trains exactly as it would alone, and resumes exactly.
    streams = checkpoint.rng_state(runtime)
    for epoch in range(run.start_epoch, min(args.epochs, args.stop_after or args.epochs)):
        checkpoint.set_rng_state(runtime, streams)
        began = time.perf_counter()
        run.training.set_epoch(epoch)
        totals = run.train_epoch(epoch)
        if run.training.policy.keeps_state:  # merge this epoch's updates now: the checkpoint and log agree
            run.training.state.sync_epoch()
        record = run.record(epoch, totals, baseline_log or own_baseline(args, method))
        run.records.append(record)
        state = run.state_dict()
        run.wall_clock += time.perf_counter() - began
        record["wall_clock"] = state["wall_clock"] = run.wall_clock
        streams = checkpoint.rng_state(runtime)
        if runtime.main:
            run.write(state, others)
            print(epoch_line(record), flush=True)
        yield record
    return run.records


def own_baseline(args: argparse.Namespace, method: str) -> dict[str, Any] | None:
    """This run's own baseline log, read afresh (interleaved, it grows while the other methods train)."""
    path = args.out / "baseline" / logs.LOG_NAME
    return logs.read_log(path) if method != "baseline" and path.exists() else None


def time_saved(seconds: float, epoch: int, baseline: dict[str, Any] | None, method: str) -> float | None:
    if method == "baseline":
        return 0.0 if baseline is None else logs.time_saved(seconds, epoch, baseline)
    return logs.time_saved(seconds, epoch, baseline)


def epoch_line(record: dict[str, Any]) -> str:
    saved = record["time_saved_vs_baseline"]
    saved_text = "" if saved is None else f", time saved {100 * saved:+.0f}%"
    return (
        f"{record['method']} epoch {record['epoch'] + 1}: test acc {100 * record['test_accuracy']:.2f}%, "
        f"train loss {record['train_loss']:.3f}, {record['backprop_samples']:,} back-propagated, "
        f"{record['train_seconds']:.1f}s training{saved_text}"
    )


SPREAD_LIMIT = 0.10  # a median whose epochs spread more than this is not quoted without a warning
SUMMARY_NOTE = (
    "steady epochs: every epoch after the first that trains like the last one (same selection), each timed alone; "
    "spread = interquartile range / median (range / median under 4 epochs); / baseline = the epoch's time over the "
    "baseline's same epoch. Before its first epoch every method ran one untimed step (model, selection backend, "
    "first-call compilation): no first-call cost is charged to a method"
)


def steady(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epochs after the first that select like the last epoch: an epoch's time then measures the method's
    steady-state step, not its warm-up, nor an annealing epoch that trains every row."""
    return [r for r in records[1:] if r["selecting"] == records[-1]["selecting"]]


def summary_rows(results: Records) -> list[dict[str, Any]]:
    baseline = {r["epoch"]: r["epoch_seconds"] for r in results.get("baseline", [])}
    target = None
    if results.get("baseline"):
        target = max(r["test_accuracy"] for r in results["baseline"]) - 0.005
    rows = []
    for method, records in results.items():
        if not records:
            continue
        epochs = steady(records)
        seconds = [r["epoch_seconds"] for r in epochs]
        ratios = [r["epoch_seconds"] / baseline[r["epoch"]] for r in epochs if baseline.get(r["epoch"])]
        reached = None if target is None else next((r for r in records if r["test_accuracy"] >= target), None)
        rows.append(
            {
                "method": method,
                "last": records[-1],
                "epoch_seconds_samples": seconds,
                "epoch_seconds": statistics.median(seconds) if seconds else None,
                "epoch_spread": _timing.relative_spread(seconds),
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_spread": _timing.relative_spread(ratios),
                "target": target,
                "to_target": reached,
            }
        )
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | test accuracy | back-propagated samples | training time (s) | steady epoch (s), median (spread) "
        "| / baseline, median (spread) | to baseline's best − 0.5 pt |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        last, reached = row["last"], row["to_target"]
        if row["target"] is None:
            reach = "—"
        elif reached is None:
            reach = "never"
        else:
            reach = f"{reached['train_seconds']:.1f} s, {reached['backprop_samples']:,} samples"
        lines.append(
            f"| {row['method']} | {100 * last['test_accuracy']:.2f}% | {last['backprop_samples']:,} | "
            f"{last['train_seconds']:.1f} | {_timing.with_spread(row['epoch_seconds'], row['epoch_spread'], 2)} | "
            f"{_timing.with_spread(row['ratio'], row['ratio_spread'], 2)} | {reach} |"
        )
    return "\n".join(lines)


__all__ = ["ConfigError", "Run", "run_all"]
