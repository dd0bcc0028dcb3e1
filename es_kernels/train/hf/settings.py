"""Settings of Evolved Sampling in a Trainer: :class:`EvolvedConfig`, checked when built, and the check of the
Trainer's own arguments that the epoch plan depends on, run when the trainer is built. Either fails before any
training, naming the setting."""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

from es_kernels import _checks
from es_kernels.backends import parse_backend
from es_kernels.policies import SelectionPolicy, make_policy
from es_kernels.train.hf.scoring import SEQUENCE_REDUCTIONS
from es_kernels.train.loop import METHODS, SCORING_MODES


@dataclasses.dataclass(frozen=True)
class EvolvedConfig:
    """Settings of Evolved Sampling in a Trainer; checked when built, so a bad one fails before training starts.

    Args:
        method: ``"baseline"``, ``"es"``, ``"eswp"``, ``"loss"``, ``"order"``, or a set-level comparison method
            ``"infobatch"``, ``"kakurenbo"``, ``"ucb"`` (see :data:`METHODS`): these train every row of the epoch's
            plan, weight each sequence's token-loss sum by its InfoBatch loss weight, scale the learning rate of the
            epoch's optimizer steps by KAKURENBO's factor, and learn from the training forward's per-sequence losses.
            Or a :class:`~es_kernels.policies.SelectionPolicy` built with its settings (each trainer gets a copy).
        select_ratio: k/B in (0, 1], the fraction of each micro-batch back-propagated (paper: 0.25); k is
            ``select_ratio * B`` rounded half up, at least 1 (B = 10 gives k = 3), the rounding of every count of
            the plan.
        prune_ratio: r in [0, 1) (default: the method's: ESWP 0.2, InfoBatch 0.5, KAKURENBO and UCB 0.3, else 0).
        beta1, beta2: EMA factors (default: the method's).
        settings: the method's other settings by name, e.g. ``{"delta": 0.9}`` (InfoBatch's full epochs),
            ``{"confidence": 0.8}`` (KAKURENBO's threshold), ``{"beta": 0.7, "c": 2.0}`` (UCB).
        anneal_start, anneal_end: fractions of epochs without selection at the start and end (paper: 5% each).
        ignore_index: label value of tokens that carry no loss (prompt, padding).
        sequence_reduction: a sequence's loss is the ``"mean"`` or ``"sum"`` of its tokens' cross-entropies.
        scoring_mode: ``"eval"`` (dropout off in the scoring forward) or ``"train"``.
        seed: seeds pruning, shuffling and selection (default: ``TrainingArguments.seed``).
        backend: ``evolved_select`` backend (``"auto"``, ``"torch"``, ``"extension"``, ``"triton"``).
    """

    method: str | SelectionPolicy = "es"
    select_ratio: float = 0.25
    prune_ratio: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    settings: Mapping[str, object] | None = dataclasses.field(default=None, hash=False)
    anneal_start: float = 0.05
    anneal_end: float = 0.05
    ignore_index: int = -100
    sequence_reduction: str = "mean"
    scoring_mode: str = "eval"
    seed: int | None = None
    backend: str = "auto"
    # The method with these settings, built once here; read its flags from it, and give each trainer a copy.
    policy: SelectionPolicy = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.method, SelectionPolicy) and self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)} or a SelectionPolicy, got {self.method!r}")
        if isinstance(self.select_ratio, bool) or not isinstance(self.select_ratio, numbers.Real):
            raise TypeError(f"select_ratio must be a float, got {type(self.select_ratio).__name__}")
        if not 0.0 < float(self.select_ratio) <= 1.0:  # NaN fails too
            raise ValueError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        if self.prune_ratio is not None:
            _checks.check_fraction("prune_ratio", self.prune_ratio, upper_open=True)
        for name in ("beta1", "beta2"):
            if getattr(self, name) is not None:
                _checks.check_fraction(name, getattr(self, name))
        _checks.check_fraction("anneal_start", self.anneal_start)
        _checks.check_fraction("anneal_end", self.anneal_end)
        if self.anneal_start + self.anneal_end > 1.0:
            raise ValueError(
                f"anneal_start + anneal_end must be at most 1, got {self.anneal_start} + {self.anneal_end}"
            )
        _checks.check_int("ignore_index", self.ignore_index, low=-(2**63))
        if self.sequence_reduction not in SEQUENCE_REDUCTIONS:
            raise ValueError(
                f"sequence_reduction must be one of {SEQUENCE_REDUCTIONS}, got {self.sequence_reduction!r}"
            )
        if self.scoring_mode not in SCORING_MODES:
            raise ValueError(f"scoring_mode must be one of {SCORING_MODES}, got {self.scoring_mode!r}")
        if self.seed is not None:
            _checks.check_int("seed", self.seed, low=0)
        parse_backend(self.backend)
        # A setting the method does not take (InfoBatch has no betas) fails here, by name.
        policy = make_policy(
            self.method, self.settings, prune_ratio=self.prune_ratio, beta1=self.beta1, beta2=self.beta2
        )
        object.__setattr__(self, "policy", policy)

    def make_policy(self) -> SelectionPolicy:
        """A trainer's own copy of :attr:`policy`: binding it to one trainer's data must not rebind another's."""
        return copy.deepcopy(self.policy)


def check_training_setup(args: Any, train_dataset: Any, policy: SelectionPolicy, *, custom_loss: bool) -> None:
    """Refuse Trainer settings that the epoch plan cannot honour; ``args`` are the ``TrainingArguments`` and
    ``custom_loss`` says whether the trainer has label smoothing or a ``compute_loss_func``."""
    method = policy.name
    if train_dataset is not None and not hasattr(train_dataset, "__len__"):
        raise ValueError(
            f"train_dataset: method {method!r} keeps a score per sample and plans each epoch over the whole set, "
            "so the dataset needs __len__ (a map-style dataset); an IterableDataset cannot be used"
        )
    if policy.observes_training_forward and (custom_loss or getattr(args, "loss_type", "nll") != "nll"):
        raise ValueError(
            f"method {method!r} trains on each sequence's token cross-entropy sum (weighted by InfoBatch); "
            "label smoothing (label_smoothing_factor), a compute_loss_func or a loss_type other than 'nll' "
            "would be ignored, so leave them unset"
        )
    epochs = float(args.num_train_epochs)
    if epochs != int(epochs) or epochs < 1:
        raise ValueError(f"num_train_epochs must be a whole number >= 1 (the ES plan is per epoch), got {epochs}")
    if args.max_steps > 0:
        raise ValueError(
            f"max_steps={args.max_steps}: the run's optimizer steps are the ES plan's (trainer.evolved_total_steps(),"
            " pruned epochs are shorter); leave max_steps at -1 and set num_train_epochs"
        )
    # The plan orders the batches: the Trainer's own orderings would be dropped without a word. Releases before
    # train_sampling_strategy had the group_by_length switch.
    strategy = getattr(args, "train_sampling_strategy", None)
    if strategy not in ("random", None) or getattr(args, "group_by_length", False):
        shown = f"train_sampling_strategy={strategy!r}" if strategy not in ("random", None) else "group_by_length"
        raise ValueError(f"{shown} would replace the ES plan's order; leave it unset (the ES plan shuffles)")
    if args.auto_find_batch_size:
        raise ValueError(
            "auto_find_batch_size: a retry with a smaller batch would restart a plan whose state already moved; "
            "set per_device_train_batch_size"
        )
