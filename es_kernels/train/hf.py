"""Evolved Sampling inside Hugging Face's ``Trainer`` and TRL's ``SFTTrainer``.

    from es_kernels.train.hf import EvolvedConfig, EvolvedTrainer
    trainer = EvolvedTrainer(model=model, args=args, train_dataset=train, evolved=EvolvedConfig("eswp"))
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

    class EvolvedSFTTrainer(EvolvedTrainerMixin, SFTTrainer): ...   # any Trainer subclass, same behaviour

Per optimizer step the Trainer collects its gradient-accumulation micro-batches; each is scored on all B sequences
under ``torch.no_grad()`` (the state update and the draw of k rows go through :class:`EvolvedTraining`), and only
the k selected rows reach ``training_step``. Everything the Trainer sizes from the data — ``max_steps``, the epoch
lengths, ``num_items_in_batch``, the data skipped on resume — is taken from the ES plan instead. This module is the
only one that imports ``transformers``; ``import es_kernels`` never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from es_kernels import _checks
from es_kernels.policies import SamplePredictions, make_policy
from es_kernels.select import sequence_losses
from es_kernels.train.loop import METHODS, SCORING_MODES, EvolvedTraining, SelectedBatch

logger = logging.getLogger(__name__)

INDEX_KEY = "es_index"  # the batch key that carries dataset ids from the sampler to the selection, never to the model
STATE_FILE = "evolved_sampling_rank{rank}.pt"  # one per rank: each holds its own plan shard and unmerged updates
SEQUENCE_REDUCTIONS = ("mean", "sum")
FUSED_PATH = "fused hidden-state (backbone + lm_head in vocabulary chunks)"
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclasses.dataclass(frozen=True)
class EvolvedConfig:
    """Settings of Evolved Sampling in a Trainer; checked when built, so a bad one fails before training starts.

    Args:
        method: ``"baseline"``, ``"es"``, ``"eswp"``, ``"loss"``, ``"order"``, or a set-level comparison method
            ``"infobatch"``, ``"kakurenbo"``, ``"ucb"`` (see :data:`METHODS`): these train every row of the epoch's
            plan, weight each sequence's token-loss sum by its InfoBatch loss weight, scale the learning rate of the
            epoch's optimizer steps by KAKURENBO's factor, and learn from the training forward's per-sequence losses.
        select_ratio: k/B in (0, 1], the fraction of each micro-batch back-propagated (paper: 0.25).
        prune_ratio: r in [0, 1) (default: the method's: ESWP 0.2, InfoBatch 0.5, KAKURENBO and UCB 0.3, else 0).
        beta1, beta2: EMA factors (default: the method's).
        anneal_start, anneal_end: fractions of epochs without selection at the start and end (paper: 5% each).
        ignore_index: label value of tokens that carry no loss (prompt, padding).
        sequence_reduction: a sequence's loss is the ``"mean"`` or ``"sum"`` of its tokens' cross-entropies.
        scoring_mode: ``"eval"`` (dropout off in the scoring forward) or ``"train"``.
        seed: seeds pruning, shuffling and selection (default: ``TrainingArguments.seed``).
        backend: ``evolved_select`` backend.
    """

    method: str = "es"
    select_ratio: float = 0.25
    prune_ratio: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    anneal_start: float = 0.05
    anneal_end: float = 0.05
    ignore_index: int = -100
    sequence_reduction: str = "mean"
    scoring_mode: str = "eval"
    seed: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        select_ratio = _checks.check_fraction("select_ratio", self.select_ratio)
        if select_ratio == 0.0:
            raise ValueError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        if self.prune_ratio is not None:
            _checks.check_fraction("prune_ratio", self.prune_ratio, upper_open=True)
        for name in ("beta1", "beta2"):
            if getattr(self, name) is not None:
                _checks.check_fraction(name, getattr(self, name))
        _checks.check_fraction("anneal_start", self.anneal_start)
        _checks.check_fraction("anneal_end", self.anneal_end)
        _checks.check_int("ignore_index", self.ignore_index, low=-(2**63))
        if self.sequence_reduction not in SEQUENCE_REDUCTIONS:
            raise ValueError(
                f"sequence_reduction must be one of {SEQUENCE_REDUCTIONS}, got {self.sequence_reduction!r}"
            )
        if self.scoring_mode not in SCORING_MODES:
            raise ValueError(f"scoring_mode must be one of {SCORING_MODES}, got {self.scoring_mode!r}")
        if self.seed is not None:
            _checks.check_int("seed", self.seed, low=0)


# ------------------------------------------------------------------------------------------ per-sequence losses


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How per-sequence losses are computed for one model: ``kind`` is ``"lm"`` (token cross-entropy reduced per
    sequence) or ``"classification"`` ((B, C) logits); ``path`` names the computation, and ``reason`` why the fused
    path is not used (empty when it is)."""

    kind: str
    path: str
    reason: str = ""
    shift: bool = False

    @property
    def fused(self) -> bool:
        return self.path == FUSED_PATH


def scoring_for(model: torch.nn.Module, *, shift_labels: bool) -> Scoring:
    """Decide, before training, how ``model``'s per-sequence losses are computed; raise if they cannot be."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = type(model).__name__
    if head is not None:
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        transforms = [key for key in _LOGIT_TRANSFORMS if getattr(text_config, key, None) not in (None, 1, 1.0)]
        if not isinstance(head, torch.nn.Linear):
            reason = f"the output embedding is a {type(head).__name__}, not a Linear lm_head"
        elif not isinstance(backbone, torch.nn.Module) or backbone is model:
            reason = f"{name} exposes no backbone module (base_model_prefix)"
        elif transforms:
            reason = f"the model transforms its logits after lm_head ({', '.join(transforms)})"
        else:
            return Scoring("lm", FUSED_PATH, shift=shift_labels)
        return Scoring("lm", "full logits from model(**inputs)", reason, shift=shift_labels)
    problem = getattr(getattr(model, "config", None), "problem_type", None)
    classifies = name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values() or name.endswith(
        "ForSequenceClassification"
    )
    if classifies and problem in (None, "single_label_classification") and getattr(model.config, "num_labels", 0) > 1:
        return Scoring("classification", "(B, C) logits from model(**inputs)", "sequence classification")
    raise ValueError(
        f"model: {name} gives no per-sequence loss (Evolved Sampling needs a causal/masked LM with an output "
        "embedding, or single-label sequence classification with num_labels >= 2); use method='baseline' for it"
    )


def per_sequence_losses(
    model: torch.nn.Module, inputs: dict[str, Any], scoring: Scoring, *, ignore_index: int, reduction: str
) -> torch.Tensor:
    """(B,) fp32 losses of the batch ``inputs`` (the same keyword inputs training uses), without gradients.

    The one place per-sequence losses are computed. The fused branch is the sequence-level op of
    ``evolved_select`` (``es_kernels.select.sequence_losses`` with ``hidden_states=, lm_head_weight=``): the
    backbone's last hidden state through the lm_head, chunk by chunk over the vocabulary, never the (B·T, V) logits.
    """
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError("inputs: the training batches carry no 'labels', so no per-sequence loss can be scored")
    forward_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    with torch.no_grad():
        if scoring.kind == "classification":
            logits = model(**forward_inputs).logits
            return F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
        if "shift_labels" in forward_inputs:  # padding-free collators shift themselves
            targets, shift = forward_inputs.pop("shift_labels"), False
        else:
            targets, shift = labels, scoring.shift
        if shift:
            targets = targets[:, 1:]
        options = {"ignore_index": ignore_index, "sequence_reduction": reduction}
        if scoring.fused:
            backbone = getattr(model, model.base_model_prefix)
            hidden = backbone(**forward_inputs)[0]
            hidden = hidden[:, :-1] if shift else hidden
            head = model.get_output_embeddings()
            # Under autocast the backbone may return another dtype than the head's weight; the op wants one.
            return sequence_losses(
                targets.to(hidden.device), hidden_states=hidden.to(head.weight.dtype), lm_head_weight=head.weight,
                lm_head_bias=head.bias, **options,
            )  # fmt: skip
        logits = model(**forward_inputs).logits
        logits = logits[:, :-1] if shift else logits  # a view: the op takes any strides
        return sequence_losses(targets.to(logits.device), logits=logits, **options)


class _Scorer:
    """Looks like a module to ``EvolvedTraining`` (``training``/``train`` reach the real model, which the scoring
    mode switch needs); calling it returns per-sequence losses of a dict batch."""

    def __init__(self, model: torch.nn.Module, score: Callable[[torch.nn.Module, dict], torch.Tensor]) -> None:
        self.model, self.score = model, score

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.score(self.model, inputs)


def _given_losses(losses: torch.Tensor, _targets: Any) -> torch.Tensor:
    return losses


@dataclasses.dataclass(frozen=True)
class SequenceLosses:
    """Per-sequence results of one training forward (set-level methods): ``sums`` (B,) of the token losses, with
    gradients; ``counts`` (B,) of the loss-bearing tokens (1 per row for classification); ``predictions``, the
    per-sequence correctness and confidence KAKURENBO needs (None unless asked for)."""

    sums: torch.Tensor
    counts: torch.Tensor
    predictions: SamplePredictions | None = None

    def per_sequence(self, reduction: str) -> torch.Tensor:
        """(B,) detached fp32 losses, reduced as the scoring forward reduces them (so a policy sees one scale)."""
        sums = self.sums.detach().float()
        if reduction == "sum":
            return sums
        return torch.where(self.counts > 0, sums / self.counts.clamp(min=1), torch.zeros_like(sums))


def _top_predictions(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax and its softmax probability along the last dimension, as exp(max - logsumexp): no probability
    tensor of the logits' size is built."""
    with torch.no_grad():
        logits = logits.detach()
        top, predicted = logits.max(dim=-1)
        return predicted, torch.exp(top.float() - torch.logsumexp(logits.float(), dim=-1))


def training_sequence_losses(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, predictions: bool = False
) -> SequenceLosses:
    """Token cross-entropies of ``logits`` (B, T, V) against ``targets`` (B, T) (already aligned: shift first)
    summed per sequence in fp32, or of classification ``logits`` (B, C) against ``targets`` (B,).

    With ``predictions``, also each sequence's correctness and confidence. A language-model sequence counts as
    predicted correctly when the argmax matches at least half of its loss-bearing tokens, and its confidence is the
    mean, over those tokens, of the largest softmax probability: the classification definitions of KAKURENBO,
    taken per token and averaged over the sequence.
    """
    targets = targets.to(logits.device)
    if logits.dim() == 2:
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        counts = torch.ones_like(losses)
        if not predictions:
            return SequenceLosses(losses, counts)
        predicted, confidence = _top_predictions(logits)
        return SequenceLosses(losses, counts, SamplePredictions(predicted == targets, confidence))
    valid = targets != ignore_index
    token_losses = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="none"
    ).view(targets.shape)
    counts = valid.sum(1).float()
    if not predictions:
        return SequenceLosses(token_losses.sum(1), counts)
    predicted, confidence = _top_predictions(logits)
    hits = ((predicted == targets) & valid).sum(1).float()
    confidence = (confidence * valid).sum(1) / counts.clamp(min=1)
    correct = (counts > 0) & (2 * hits >= counts)
    return SequenceLosses(token_losses.sum(1), counts, SamplePredictions(correct, confidence))


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


# ------------------------------------------------------------------------------------------ ids through the loader


class _WithIndex(Dataset):
    """Each item is the wrapped item's dict plus its dataset id under :data:`INDEX_KEY`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"train_dataset items must be dicts (the Trainer's format), got {type(item).__name__}")
        if INDEX_KEY in item:
            raise ValueError(f"train_dataset items already have a {INDEX_KEY!r} key, which Evolved Sampling uses")
        return {**item, INDEX_KEY: index}


class _IndexCollator:
    """Takes the ids out of the features, lets the user's collator build the batch, and puts them back as a tensor:
    any collator works (the default one, padding, TRL's) and never sees the id."""

    def __init__(self, collator: Callable) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [feature[INDEX_KEY] for feature in features]
        batch = self.collator([{k: v for k, v in feature.items() if k != INDEX_KEY} for feature in features])
        batch[INDEX_KEY] = torch.tensor(ids, dtype=torch.int64)
        return batch


# ------------------------------------------------------------------------------------------ the trainer


class EvolvedTrainerMixin:
    """Evolved Sampling for ``transformers.Trainer`` and any subclass: put it first in the bases.

    ``class EvolvedSFTTrainer(EvolvedTrainerMixin, SFTTrainer)``; then pass ``evolved=EvolvedConfig(...)``.
    """

    def __init__(self, *args: Any, evolved: EvolvedConfig | None = None, **kwargs: Any) -> None:
        if evolved is not None and not isinstance(evolved, EvolvedConfig):
            raise TypeError(f"evolved must be an EvolvedConfig, got {type(evolved).__name__}")
        super().__init__(*args, **kwargs)
        self.evolved_config = evolved if evolved is not None else EvolvedConfig()
        self.evolved: EvolvedTraining | None = None
        self.evolved_stats = dict.fromkeys(
            ("scored_sequences", "trained_sequences", "scored_tokens", "trained_tokens"), 0
        )
        self.evolved_times = {"scoring_s": 0.0, "training_s": 0.0}
        self._check_evolved_settings()
        self.add_callback(_ScaledLearningRate(self))
        shift = bool(getattr(self, "_loss_shifts_labels", False))
        try:
            self.evolved_scoring = scoring_for(self.model, shift_labels=shift)
        except ValueError:
            if make_policy(self.evolved_config.method).keeps_state:
                raise
            self.evolved_scoring = Scoring("none", "not scored (baseline)", "the baseline never scores")
        if self.evolved_scoring.fused:
            logger.info("es_kernels: scoring path: %s", self.evolved_scoring.path)
        else:
            logger.warning(
                "es_kernels: scoring path: %s (fallback: %s)", self.evolved_scoring.path, self.evolved_scoring.reason
            )

    # ---------------------------------------------------------------- settings, checked before training

    def _check_evolved_settings(self) -> None:
        args, method = self.args, self.evolved_config.method
        if self.train_dataset is not None and not hasattr(self.train_dataset, "__len__"):
            raise ValueError(
                f"train_dataset: method {method!r} keeps a score per sample and plans each epoch over the whole set, "
                "so the dataset needs __len__ (a map-style dataset); an IterableDataset cannot be used"
            )
        if make_policy(method).own_plan and (
            self.label_smoother is not None
            or self.compute_loss_func is not None
            or getattr(args, "loss_type", "nll") != "nll"
        ):
            raise ValueError(
                f"method {method!r} trains on each sequence's token cross-entropy sum (weighted by InfoBatch); "
                "label smoothing (label_smoothing_factor), a compute_loss_func or a loss_type other than 'nll' "
                "would be ignored, so leave them unset"
            )
        epochs = float(args.num_train_epochs)
        if epochs != int(epochs) or epochs < 1:
            raise ValueError(f"num_train_epochs must be a whole number >= 1 (the ES plan is per epoch), got {epochs}")
        if args.train_sampling_strategy not in ("random", None):
            raise ValueError(
                f"train_sampling_strategy={args.train_sampling_strategy!r} would replace the ES sampler; leave it "
                "'random' (the ES plan shuffles)"
            )

    def _num_processes_sampler(self) -> tuple[int, int]:
        return max(1, self.args.world_size), self.args.process_index if self.args.world_size > 1 else 0

    def _build_evolved(self) -> EvolvedTraining:
        config, args = self.evolved_config, self.args
        if not hasattr(self.train_dataset, "__len__"):
            self._check_evolved_settings()
        num_replicas, rank = self._num_processes_sampler()
        return EvolvedTraining(
            config.method,
            num_samples=len(self.train_dataset),
            num_epochs=int(args.num_train_epochs),
            select_ratio=config.select_ratio,
            prune_ratio=config.prune_ratio,
            beta1=config.beta1,
            beta2=config.beta2,
            anneal_start=config.anneal_start,
            anneal_end=config.anneal_end,
            scoring_mode=config.scoring_mode,
            seed=args.seed if config.seed is None else config.seed,
            device=args.device,
            num_replicas=num_replicas,
            rank=rank,
            backend=config.backend,
        )

    # ---------------------------------------------------------------- the data: ids travel in the batch dict

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX_KEY not in self._signature_columns:  # else remove_unused_columns drops the ids
            self._signature_columns = [*self._signature_columns, INDEX_KEY]

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> torch.utils.data.Sampler | None:
        return self.evolved.sampler

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if self.evolved is None:
            self.evolved = self._build_evolved()
        collator = self.data_collator
        self.data_collator = _IndexCollator(collator)
        try:
            loader = self._get_dataloader(
                dataset=_WithIndex(self.train_dataset),
                description="Training",
                batch_size=self._train_batch_size,
                sampler_fn=self._get_train_sampler,
                is_training=True,
            )
        finally:
            self.data_collator = collator
        # accelerate wraps the batches of a map-style dataset in BatchSamplerShard (every rank iterates the sampler,
        # then keeps every world_size-th batch, and with even_batches tops a short last batch up with ids from the
        # epoch's start); the ES sampler already shards and pads, so the wrapper must pass batches through as they are.
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and hasattr(shard, "num_processes"):
            shard.num_processes, shard.process_index, shard.even_batches = 1, 0, False
        return loader

    # ---------------------------------------------------------------- step counts from the plan

    def evolved_total_steps(self) -> int:
        """Optimizer steps of the whole plan, the scheduler's length: :meth:`EvolvedTraining.total_steps` (each
        epoch's last, partial accumulation is stepped within the epoch, as the Trainer does, never carried over)."""
        if self.evolved is None:
            self.evolved = self._build_evolved()
        args = self.args
        return self.evolved.total_steps(
            self._train_batch_size,
            drop_last=args.dataloader_drop_last,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )

    def set_initial_training_values(self, args, dataloader):
        values = list(super().set_initial_training_values(args, dataloader))
        planned = self.evolved_total_steps()
        if args.max_steps > 0 and args.max_steps != planned:
            raise ValueError(
                f"max_steps={args.max_steps}, but {self.evolved.sampler.num_epochs} epochs of the ES plan take "
                f"{planned} optimizer steps; leave max_steps at -1 and set num_train_epochs (the trainer sizes the "
                "schedule from the plan)"
            )
        sampler = self.evolved.sampler
        batches = sampler.steps_per_epoch(self._train_batch_size, drop_last=args.dataloader_drop_last, epoch=0)
        # (num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples, total_batch, steps, max)
        first_epoch_steps = math.ceil(batches / args.gradient_accumulation_steps)
        values[0], values[1], values[5], values[6] = sampler.num_epochs, first_epoch_steps, batches, planned
        values[2] = len(self.train_dataset)
        values[3] = sum(sampler.epoch_size(e) for e in range(sampler.num_epochs))
        return tuple(values)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is None:
            return 0, 0
        self._load_evolved(resume_from_checkpoint)
        sampler = self.evolved.sampler
        finished = sampler.position >= sampler.shard_size(sampler.epoch)
        # The sampler resumes its own position, so the Trainer must skip nothing (0 batches in the resumed epoch).
        return sampler.epoch + int(finished), 0

    def _run_epoch(self, **kwargs: Any) -> Any:
        epoch = kwargs["epoch"]
        self.evolved.set_epoch(epoch)  # merges the ranks' states (a collective), then plans the epoch
        # This epoch's own length (pruned epochs are shorter; a resumed one has only what is left).
        batches = len(kwargs["train_dataloader"])
        kwargs.update(
            steps_in_epoch=batches,
            num_update_steps_per_epoch=math.ceil(batches / self.args.gradient_accumulation_steps),
            steps_trained_in_current_epoch=0,
        )
        result = super()._run_epoch(**kwargs)
        sampler = self.evolved.sampler
        if epoch == sampler.num_epochs - 1 and sampler.position >= sampler.shard_size(epoch) and self.evolved.selects:
            self.evolved.state.sync_epoch()  # the final state is merged too
        return result

    # ---------------------------------------------------------------- selection before the accumulation is counted

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if batches and INDEX_KEY in batches[0]:
            batches = [self._select_rows(batch) for batch in batches]
        # Counted over the selected rows of every micro-batch (and rank): the loss is their token mean.
        return batches, self._get_num_items_in_batch(batches, device)

    def _score(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        config = self.evolved_config
        with self.compute_loss_context_manager():
            losses = per_sequence_losses(
                model,
                inputs,
                self.evolved_scoring,
                ignore_index=config.ignore_index,
                reduction=config.sequence_reduction,
            )
        return losses.to(self.evolved.state.device)

    def _tokens(self, inputs: dict[str, Any]) -> int:
        if self.evolved_scoring.kind == "lm" and "labels" in inputs:
            labels = inputs["labels"][:, 1:] if self.evolved_scoring.shift else inputs["labels"]
            return int((labels != self.evolved_config.ignore_index).sum())
        if "attention_mask" in inputs:
            return int(inputs["attention_mask"].sum())
        return int(next(v for v in inputs.values() if isinstance(v, torch.Tensor)).numel())

    def _select_rows(self, batch: dict[str, Any]) -> dict[str, Any]:
        indices = batch.pop(INDEX_KEY)
        inputs = self._prepare_inputs(batch)
        rows = indices.numel()
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != rows):
                raise ValueError(
                    f"batch[{key!r}] has shape {tuple(value.shape)}, not one row per sequence ({rows}): packed or "
                    "padding-free batches cannot be selected per sequence; disable packing/padding_free"
                )
        evolved = self.evolved
        scorer = _Scorer(self.model, self._score)
        start = time.perf_counter()
        selected = evolved.select(scorer, indices.to(evolved.state.device), inputs, (), loss_fn=_given_losses)
        if not selected.scored and evolved.selects:
            # Annealing epochs train every row but still move the state: score them the same way.
            evolved.observe(selected, evolved.scoring_forward(scorer, selected.inputs))
        if evolved.selects:
            self.evolved_times["scoring_s"] += time.perf_counter() - start
        stats = self.evolved_stats
        stats["scored_sequences"] += rows
        stats["scored_tokens"] += self._tokens(inputs)
        stats["trained_sequences"] += selected.indices.numel()
        stats["trained_tokens"] += self._tokens(selected.inputs)
        rows_to_train = dict(selected.inputs)
        if evolved.policy.own_plan and not selected.scored:
            rows_to_train[INDEX_KEY] = selected  # compute_loss weights and observes this batch's training forward
        return rows_to_train

    def training_step(self, model, inputs, num_items_in_batch=None):
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
        loss = self._set_level_loss(sequences, batch.loss_weights, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _set_level_loss(
        self, sequences: SequenceLosses, weights: torch.Tensor | None, num_items_in_batch: Any
    ) -> torch.Tensor:
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
        total = sums.sum() if weights is None else (sums * weights.to(sums.device, sums.dtype)).sum()
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
        stats, times = self.evolved_stats, self.evolved_times
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
        return os.path.join(folder, STATE_FILE.format(rank=self._num_processes_sampler()[1]))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        saved = {
            "training": self.evolved.state_dict(),
            "stats": dict(self.evolved_stats),
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
        self.evolved_stats.update(saved["stats"])
        self.evolved_times.update(saved["times"])


class EvolvedTrainer(EvolvedTrainerMixin, Trainer):
    """``transformers.Trainer`` with Evolved Sampling: pass ``evolved=EvolvedConfig(method, ...)``."""


__all__ = [
    "INDEX_KEY",
    "EvolvedConfig",
    "EvolvedTrainer",
    "EvolvedTrainerMixin",
    "Scoring",
    "per_sequence_losses",
    "scoring_for",
    "training_sequence_losses",
]
