"""EvolvedTrainerMixin: Evolved Sampling inside ``transformers.Trainer`` (and any subclass), on its public hooks.

Per optimizer step the Trainer asks ``get_batch_samples`` for its gradient-accumulation micro-batches; each is
scored on all B sequences under ``torch.no_grad()`` and only the k selected rows are returned, so the Trainer counts
``num_items_in_batch`` over the selected rows and ``training_step`` trains them. The rest is on the Trainer's
public surface too: ``get_train_dataloader`` (the ES sampler, the ids), ``create_scheduler`` (the plan's step
count), ``compute_loss`` (set-level methods' weighted loss), ``train`` (resume), ``log``, and callbacks (the epoch
plan, the learning-rate factor, checkpoints).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from typing import Any

import torch
from accelerate.utils import send_to_device
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from es_kernels.train.hf.loader import INDEX_KEY, EpochBatches, Padding, PlanLoader, plan_dataloader
from es_kernels.train.hf.scoring import (
    Scoring,
    SequenceLosses,
    loss_shifts_labels,
    per_sequence_losses,
    scoring_for,
    training_sequence_losses,
)
from es_kernels.train.hf.settings import EvolvedConfig, check_training_setup
from es_kernels.train.loop import EvolvedTraining, SelectedBatch

logger = logging.getLogger("es_kernels.train.hf")

STATE_FILE = "evolved_sampling_rank{rank}.pt"  # one per rank: each holds its own plan shard and unmerged updates


class _Scorer:
    """Looks like a module to ``EvolvedTraining`` (``training``/``train`` reach the real model, which the scoring
    mode switch needs); calling it returns per-sequence losses of a dict batch."""

    def __init__(self, trainer: EvolvedTrainerMixin) -> None:
        self.trainer = trainer

    @property
    def training(self) -> bool:
        return self.trainer.model.training

    def train(self, mode: bool = True) -> None:
        self.trainer.model.train(mode)

    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.trainer._score(inputs)


def _given_losses(losses: torch.Tensor, _targets: Any) -> torch.Tensor:
    return losses


class _EpochPlan(TrainerCallback):
    """The ES plan's view of the Trainer's loop.

    A Trainer epoch is an ES epoch: at its start the plan moves to the next epoch (or continues a resumed one). The
    Trainer's own step count, its epoch counter and its resume arithmetic assume equal epochs; the state it shows
    callbacks is set to the plan's (``max_steps``, ``epoch``) before any other callback sees it.
    """

    def __init__(self, trainer: EvolvedTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        planned = self.trainer.evolved_total_steps()
        state.max_steps, state.num_train_epochs = planned, self.trainer.evolved.sampler.num_epochs
        state.compute_steps(args, planned)  # logging/eval/save steps given as fractions of the run

    def on_epoch_begin(self, args, state, control, **kwargs):
        evolved = self.trainer.evolved
        sampler = evolved.sampler
        finished = sampler.position >= sampler.shard_size(sampler.epoch)
        if finished and sampler.epoch == sampler.num_epochs - 1:
            return  # the plan is complete: the loader yields nothing
        # Merges the ranks' states (a collective, every rank is here), then plans the epoch; a resumed epoch keeps
        # its plan and position.
        evolved.set_epoch(sampler.epoch + 1 if finished else sampler.epoch)

    def on_step_end(self, args, state, control, **kwargs):
        sampler = self.trainer.evolved.sampler
        state.epoch = sampler.epoch + sampler.position / sampler.shard_size(sampler.epoch)

    def on_save(self, args, state, control, **kwargs):
        self.trainer._save_evolved(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


class _ScaledLearningRate(TrainerCallback):
    """Multiplies every parameter group's learning rate by the epoch's factor (KAKURENBO's 1/(1-F)) for the
    optimizer step only, through :meth:`EvolvedTraining.scaled_lr`: the scheduler steps after the exact restore,
    so its schedule, and the logged learning rate, are the Trainer's own."""

    def __init__(self, trainer: EvolvedTrainerMixin) -> None:
        self.trainer = trainer
        self.scaled: contextlib.ExitStack | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        evolved = self.trainer.evolved
        if evolved is not None and evolved.lr_scale != 1.0:
            self.scaled = contextlib.ExitStack()
            self.scaled.enter_context(evolved.scaled_lr(self.trainer.optimizer))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.scaled is not None:
            scaled, self.scaled = self.scaled, None
            scaled.close()


class EvolvedTrainerMixin:
    """Evolved Sampling for ``transformers.Trainer`` and any subclass: put it first in the bases.

    ``class EvolvedSFTTrainer(EvolvedTrainerMixin, SFTTrainer)``; then pass ``evolved=EvolvedConfig(...)``.

    ``trainer.evolved`` is the run's :class:`~es_kernels.train.loop.EvolvedTraining` (built when training starts,
    or by :meth:`evolved_total_steps`): ``trainer.evolved.state`` holds the scores and weights, readable from a
    callback during training and after it; ``trainer.evolved_total_steps()`` is the plan's number of optimizer
    steps, which the scheduler and ``trainer.state.max_steps`` use.
    """

    def __init__(self, *args: Any, evolved: EvolvedConfig | None = None, **kwargs: Any) -> None:
        if evolved is not None and not isinstance(evolved, EvolvedConfig):
            raise TypeError(f"evolved must be an EvolvedConfig, got {type(evolved).__name__}")
        super().__init__(*args, **kwargs)
        # The ES sampler resumes its own position, so the Trainer must skip no batch of a resumed epoch (it would
        # skip them a second time). A copy: the caller's arguments may serve another trainer.
        self.args = copy.copy(self.args)
        self.args.ignore_data_skip = True
        self.evolved_config = evolved if evolved is not None else EvolvedConfig()
        self.evolved_policy = self.evolved_config.make_policy()
        self.evolved: EvolvedTraining | None = None
        self._evolved_counts = dict.fromkeys(
            ("scored_sequences", "trained_sequences", "scored_tokens", "trained_tokens"), 0
        )
        self.evolved_times = {"scoring_s": 0.0, "training_s": 0.0}
        self._check_setup()
        # First, so every other callback (the progress bar included) sees the plan's step count.
        self.callback_handler.callbacks.insert(0, _EpochPlan(self))
        self.add_callback(_ScaledLearningRate(self))
        self._micro_batches_in_step = 1
        try:
            self.evolved_scoring = scoring_for(self.model, shift_labels=loss_shifts_labels(self.model))
        except ValueError:
            if self.evolved_policy.keeps_state:
                raise
            self.evolved_scoring = Scoring("none", "not scored (baseline)", "the baseline never scores")
        if self.evolved_scoring.fused:
            logger.info("es_kernels: scoring path: %s", self.evolved_scoring.path)
        else:
            logger.warning(
                "es_kernels: scoring path: %s (fallback: %s)", self.evolved_scoring.path, self.evolved_scoring.reason
            )

    # ---------------------------------------------------------------- the plan

    def _check_setup(self) -> None:
        custom_loss = self.label_smoother is not None or self.compute_loss_func is not None
        check_training_setup(self.args, self.train_dataset, self.evolved_policy, custom_loss=custom_loss)

    def _build_evolved(self) -> EvolvedTraining:
        config, args = self.evolved_config, self.args
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        self._check_setup()  # a dataset or an argument set after the trainer was built
        return EvolvedTraining(
            self.evolved_policy,
            num_samples=len(self.train_dataset),
            num_epochs=int(args.num_train_epochs),
            select_ratio=config.select_ratio,
            anneal_start=config.anneal_start,
            anneal_end=config.anneal_end,
            scoring_mode=config.scoring_mode,
            seed=args.seed if config.seed is None else config.seed,
            device=args.device,
            num_replicas=max(1, args.world_size),
            rank=args.process_index if args.world_size > 1 else 0,
            backend=config.backend,
        )

    def _planned(self) -> EvolvedTraining:
        if self.evolved is None:
            self.evolved = self._build_evolved()
        return self.evolved

    def evolved_total_steps(self) -> int:
        """Optimizer steps of the whole plan, the scheduler's length: :meth:`EvolvedTraining.total_steps` (each
        epoch's last, partial accumulation is stepped within the epoch, as the Trainer does, never carried over)."""
        args = self.args
        return self._planned().total_steps(
            args.train_batch_size,
            drop_last=args.dataloader_drop_last,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        # The Trainer counts len(dataloader) steps in every epoch; pruned epochs are shorter.
        return super().create_scheduler(num_training_steps=self.evolved_total_steps(), optimizer=optimizer)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        self._planned()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self._load_evolved(os.fspath(resume_from_checkpoint))
        output = super().train(resume_from_checkpoint or None, *args, **kwargs)
        sampler = self.evolved.sampler
        done = sampler.epoch == sampler.num_epochs - 1 and sampler.position >= sampler.shard_size(sampler.epoch)
        if done and self.evolved_policy.keeps_state:
            self.evolved.state.sync_epoch()  # the final state is merged too
        return output

    # ---------------------------------------------------------------- the data

    def get_train_dataloader(self) -> PlanLoader:
        evolved = self._planned()
        args = self.args
        loader = plan_dataloader(
            super().get_train_dataloader(), evolved, args.train_batch_size, args.dataloader_drop_last
        )
        longest = max(
            evolved.sampler.steps_per_epoch(args.train_batch_size, drop_last=args.dataloader_drop_last, epoch=e)
            for e in range(evolved.sampler.num_epochs)
        )
        return PlanLoader(loader, evolved, longest)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not isinstance(epoch_iterator, EpochBatches):
            raise TypeError(
                f"get_batch_samples: the Trainer iterates a {type(epoch_iterator).__name__}, not the ES plan of "
                "get_train_dataloader; something between them replaced the training loader"
            )
        accumulation = self.args.gradient_accumulation_steps
        # The whole group is selected before any of its micro-batches is trained and observed.
        self._planned().observe_lag = max(accumulation, 1)
        batches = [self._select_rows(batch) for batch in epoch_iterator.take(accumulation)]
        if not batches:
            return [], None
        slots = epoch_iterator.slots(accumulation)
        if slots < len(batches):
            raise RuntimeError(f"the ES epoch is longer than the {epoch_iterator.length} batches planned for it")
        epoch_iterator.handed += slots
        self._micro_batches_in_step = len(batches)
        empty = Padding({k: v[:0] for k, v in batches[0].items() if isinstance(v, torch.Tensor) and v.dim() > 0})
        batches = [empty] * (slots - len(batches)) + batches
        # The Trainer counts num_items_in_batch over the selected rows of every micro-batch (and rank): the loss
        # is their token mean. Padding holds no tokens.
        return super().get_batch_samples(iter(batches), len(batches), device)

    def _select_rows(self, batch: dict[str, Any]) -> dict[str, Any]:
        indices = batch.pop(INDEX_KEY)
        inputs = send_to_device(batch, self.args.device)
        rows = indices.numel()
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != rows):
                raise ValueError(
                    f"batch[{key!r}] has shape {tuple(value.shape)}, not one row per sequence ({rows}): packed or "
                    "padding-free batches cannot be selected per sequence; disable packing/padding_free"
                )
        evolved = self.evolved
        scorer = _Scorer(self)
        start = time.perf_counter()
        selected = evolved.select(scorer, indices.to(evolved.state.device), inputs, (), loss_fn=_given_losses)
        if not selected.scored and evolved.selects:
            # Annealing epochs train every row but still move the state: score them the same way.
            evolved.observe(selected, evolved.scoring_forward(scorer, selected.inputs))
        if evolved.selects:
            self.evolved_times["scoring_s"] += time.perf_counter() - start
        stats = self._evolved_counts
        stats["scored_sequences"] += rows
        stats["scored_tokens"] += self._tokens(inputs)
        stats["trained_sequences"] += selected.indices.numel()
        stats["trained_tokens"] += self._tokens(selected.inputs)
        rows_to_train = dict(selected.inputs)
        if evolved.policy.observes_training_forward and not selected.scored:
            rows_to_train[INDEX_KEY] = selected  # compute_loss weights and observes this batch's training forward
        return rows_to_train

    def _score(self, inputs: dict[str, Any]) -> torch.Tensor:
        config = self.evolved_config
        with self.compute_loss_context_manager():
            losses = per_sequence_losses(
                self.model,
                inputs,
                self.evolved_scoring,
                ignore_index=config.ignore_index,
                reduction=config.sequence_reduction,
            )
        return losses.to(self.evolved.state.device)

    def _tokens(self, inputs: dict[str, Any]) -> torch.Tensor | int:
        # A count on the batch's device: int() here would stop the host twice per step. The stats holding it are
        # read as ints only when logged or saved (_stats), where the host waits anyway.
        if self.evolved_scoring.kind == "lm" and "labels" in inputs:
            labels = inputs["labels"][:, 1:] if self.evolved_scoring.shift else inputs["labels"]
            return (labels != self.evolved_config.ignore_index).sum()
        if "attention_mask" in inputs:
            return inputs["attention_mask"].sum()
        return next(v for v in inputs.values() if isinstance(v, torch.Tensor)).numel()

    def _stats(self) -> dict[str, int]:
        """The counts as ints (the token counts accumulate on the device until read here)."""
        for key, value in self._evolved_counts.items():
            self._evolved_counts[key] = int(value)
        return self._evolved_counts

    @property
    def evolved_stats(self) -> dict[str, int]:
        """Sequences and tokens scored and trained so far (reading it waits for the device's token counts)."""
        return self._stats()

    # ---------------------------------------------------------------- training

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(inputs, Padding):
            return torch.zeros((), device=self.args.device)
        # Without num_items_in_batch the Trainer divides each micro-batch's loss by the step's micro-batch count,
        # which it took from the padded list.
        self.current_gradient_accumulation_steps = self._micro_batches_in_step
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.evolved_times["training_s"] += time.perf_counter() - start
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Only the training loader adds ids, and selection removes them (set-level methods put their SelectedBatch
        # back under the key); an evaluation set that happens to carry the column is evaluated plainly, and the id
        # never reaches the model.
        batch = inputs.pop(INDEX_KEY, None)
        if not isinstance(batch, SelectedBatch):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        targets, shift = self._aligned_targets(inputs)
        forward_inputs = {key: value for key, value in inputs.items() if key not in ("labels", "shift_labels")}
        if getattr(getattr(self.model, "config", None), "use_cache", False):
            forward_inputs["use_cache"] = False  # a training forward keeps no key/value cache
        outputs = model(**forward_inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        sequences = training_sequence_losses(
            logits[:, :-1] if shift else logits,
            targets,
            ignore_index=self.evolved_config.ignore_index,
            predictions=self.evolved.policy.needs_outputs,
        )
        losses = sequences.per_sequence(self.evolved_config.sequence_reduction)
        self.evolved.observe(batch, losses, outputs=sequences.predictions)
        loss = self._set_level_loss(sequences, batch, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _set_level_loss(self, sequences: SequenceLosses, batch: SelectedBatch, num_items_in_batch: Any) -> torch.Tensor:
        """The training loss of a set-level method's micro-batch: ``sum_i w_i S_i / N``.

        ``S_i`` is sequence i's token cross-entropy sum (one row's loss for classification) and ``w_i`` its
        InfoBatch weight (1 for every other method and epoch). ``N`` is the Trainer's own normaliser:
        ``num_items_in_batch``, the loss-bearing tokens of the whole accumulated step (times the device count with
        ``average_tokens_across_devices``, as ``Trainer.compute_loss`` and ``SFTTrainer`` scale it), or, when the
        Trainer counts none, this micro-batch's tokens (the Trainer then divides by the accumulation steps itself).
        With all weights 1 this is the Trainer's token mean; a weight multiplies a sequence's *sum*, so InfoBatch's
        1/(1-r) up-weights a kept sample as a whole and a step's tokens still count once in ``N``.
        """
        sums = sequences.sums
        total = batch.weigh(sums).sum()
        if num_items_in_batch is None:
            return total / sequences.counts.sum().clamp(min=1)
        loss = total / torch.as_tensor(num_items_in_batch, device=sums.device).clamp(min=1)
        if self.args.average_tokens_across_devices:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _aligned_targets(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        """The training batch's targets as the model's loss sees them, and whether the logits must be shifted to
        align with them (a causal LM whose collator did not shift the labels itself)."""
        if "shift_labels" in inputs:
            return inputs["shift_labels"], False
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("inputs: the training batches carry no 'labels', so no per-sequence loss exists")
        shift = self.evolved_scoring.shift
        return (labels[:, 1:] if shift else labels), shift

    # ---------------------------------------------------------------- logs

    def evolved_metrics(self) -> dict[str, float]:
        """Fractions of sequences and tokens back-propagated so far, and the estimated wall-clock saved: the
        skipped tokens at the measured training cost per token, minus the time spent scoring."""
        stats, times = self._stats(), self.evolved_times
        if stats["scored_sequences"] == 0:
            return {}
        per_token = times["training_s"] / max(stats["trained_tokens"], 1)
        skipped = stats["scored_tokens"] - stats["trained_tokens"]
        return {
            "es_backprop_sequence_fraction": stats["trained_sequences"] / stats["scored_sequences"],
            "es_backprop_token_fraction": stats["trained_tokens"] / max(stats["scored_tokens"], 1),
            "es_scoring_seconds": times["scoring_s"],
            "es_time_saved_seconds": skipped * per_token - times["scoring_s"],
        }

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs or "train_loss" in logs:
            logs = {**logs, **self.evolved_metrics()}
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------- checkpoints

    def _evolved_file(self, folder: str) -> str:
        rank = self.args.process_index if self.args.world_size > 1 else 0
        return os.path.join(folder, STATE_FILE.format(rank=rank))

    def _save_evolved(self, folder: str) -> None:
        """Next to the Trainer's checkpoint files (its callback state is JSON: n-sized buffers go in a file)."""
        os.makedirs(folder, exist_ok=True)
        saved = {
            "training": self.evolved.state_dict(),
            "stats": dict(self._stats()),
            "times": dict(self.evolved_times),
        }
        path = self._evolved_file(folder)
        torch.save(saved, path + ".tmp")
        os.replace(path + ".tmp", path)  # a checkpoint never holds half a state file

    def _load_evolved(self, checkpoint: str) -> None:
        path = self._evolved_file(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resume_from_checkpoint: {checkpoint} has no {os.path.basename(path)}; it was not saved by an "
                "Evolved Sampling trainer with this world size, so the run cannot continue exactly"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.evolved.load_state_dict(saved["training"])
        self._evolved_counts.update(saved["stats"])
        self.evolved_times.update(saved["times"])


class EvolvedTrainer(EvolvedTrainerMixin, Trainer):
    """``transformers.Trainer`` with Evolved Sampling: pass ``evolved=EvolvedConfig(method, ...)``."""
