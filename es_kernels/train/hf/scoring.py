"""Per-sequence losses of a Hugging Face model: how they are computed for one model (decided before training), the
no-grad scoring forward, and the per-sequence sums of a training forward (set-level methods)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from es_kernels.policies import SamplePredictions
from es_kernels.select import sequence_losses

SEQUENCE_REDUCTIONS = ("mean", "sum")
FUSED_PATH = "fused hidden-state (backbone + lm_head in vocabulary chunks)"
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


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


def loss_shifts_labels(model: torch.nn.Module) -> bool:
    """Whether ``model``'s own loss predicts ``labels[t + 1]`` at position t (a decoder-only causal LM), so the
    scoring must shift too. The rule of the Trainer's token count in recent releases, read from the model's loss
    type: an encoder-decoder's labels are already aligned with its decoder outputs."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT
    config = getattr(inner, "config", None)
    causal = LOSS_MAPPING.get(getattr(inner, "loss_type", None)) is ForCausalLMLoss
    return causal and not getattr(config, "is_encoder_decoder", False)


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
