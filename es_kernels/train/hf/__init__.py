"""Evolved Sampling inside Hugging Face's ``Trainer`` and TRL's ``SFTTrainer``.

    from es_kernels.train.hf import EvolvedConfig, EvolvedTrainer
    trainer = EvolvedTrainer(model=model, args=args, train_dataset=train, evolved=EvolvedConfig("eswp"))
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

    class EvolvedSFTTrainer(EvolvedTrainerMixin, SFTTrainer): ...   # any Trainer subclass, same behaviour

Per optimizer step the Trainer collects its gradient-accumulation micro-batches; each is scored on all B sequences
under ``torch.no_grad()`` (the state update and the draw of k rows go through :class:`EvolvedTraining`), and only
the k selected rows reach ``training_step``. Everything the Trainer sizes from the data — the scheduler's length,
the epoch lengths, ``num_items_in_batch``, the data skipped on resume — is taken from the ES plan instead, through
the Trainer's public hooks only, so every ``transformers`` 5.x release works.

Modules: ``settings`` (:class:`EvolvedConfig` and the check of the Trainer's arguments), ``scoring`` (per-sequence
losses of a model), ``loader`` (ids through the collator, the epoch plan as the Trainer's loader), ``trainer``
(:class:`EvolvedTrainerMixin`). This package is the only one that imports ``transformers``; ``import es_kernels``
never loads it.
"""

from es_kernels.train.hf.loader import INDEX_KEY
from es_kernels.train.hf.scoring import (
    FUSED_PATH,
    Scoring,
    SequenceLosses,
    loss_shifts_labels,
    per_sequence_losses,
    scoring_for,
    training_sequence_losses,
)
from es_kernels.train.hf.settings import EvolvedConfig
from es_kernels.train.hf.trainer import STATE_FILE, EvolvedTrainer, EvolvedTrainerMixin

__all__ = [
    "FUSED_PATH",
    "INDEX_KEY",
    "STATE_FILE",
    "EvolvedConfig",
    "EvolvedTrainer",
    "EvolvedTrainerMixin",
    "Scoring",
    "SequenceLosses",
    "loss_shifts_labels",
    "per_sequence_losses",
    "scoring_for",
    "training_sequence_losses",
]
