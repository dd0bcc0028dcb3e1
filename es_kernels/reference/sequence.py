"""Per-sequence cross-entropy for language models: the oracle of the sequence-level losses
(docs/architecture.md §3, token level).

A sample is a sequence. Its loss is the mean (``reduction="mean"``) or the sum (``"sum"``) of its token
cross-entropies over the positions whose target is not ``ignore_index``; a sequence with no scored token has loss 0.
Label smoothing is applied per token exactly as ``torch.nn.functional.cross_entropy`` defines it:
``(1 - eps) * (lse - x_y) + eps * (lse - mean_j x_j)``. Nothing is shifted here: a causal-LM caller passes
``logits[:, :-1]`` and ``labels[:, 1:]`` (views of any strides).

Two call forms:

* :func:`token_sequence_losses` takes ``(B, T, V)`` logits;
* :func:`hidden_sequence_losses` takes the backbone's last hidden state ``(B, T, D)`` and the LM head ``(V, D)``
  and never holds the ``(B·T, V)`` logits: it walks blocks of tokens and chunks of the vocabulary, one fp32 GEMM per
  (token block, vocabulary chunk), and merges the chunks' log-sum-exp. Peak extra memory is one chunk of
  ``token_block * vocab_chunk`` fp32 logits, whatever B, T and V are.

The logits of the hidden-state form are ``z = (H @ W.T + bias) * logit_scale``, then, with a soft cap c,
``z = c * tanh(z / c)`` (Gemma's final-logit soft-capping), all in fp32 from inputs of any float dtype.

Both forms return fp32 losses of shape (B,) and share the statistics kept per token (``TokenStats``), which the
C++ and Triton backends keep too: the running max m, s = sum exp(z - m), the target's z - m and sum (z - m), all
relative to m so a large common offset of the logits cancels nothing away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum")
# A chunk holds at most TOKEN_BLOCK * VOCAB_CHUNK fp32 logits (16 MiB): small next to any LM's logits, and large
# enough that each GEMM runs at the speed of one big GEMM (on 2 CPU cores, 256-token blocks cost 1.5x).
TOKEN_BLOCK = 1024
VOCAB_CHUNK = 4096


@dataclass
class TokenStats:
    """Running per-token statistics over the vocabulary chunks seen so far (all fp32, shape (N,))."""

    max: torch.Tensor  # m
    exp_sum: torch.Tensor  # sum exp(z - m)
    shifted_sum: torch.Tensor  # sum (z - m) over the columns seen
    shifted_target: torch.Tensor  # z_y - m once the target's chunk was seen, else 0
    columns: int = 0

    @classmethod
    def empty(cls, tokens: int, device: torch.device) -> TokenStats:
        zeros = torch.zeros(tokens, dtype=torch.float32, device=device)
        return cls(torch.full_like(zeros, float("-inf")), zeros.clone(), zeros.clone(), zeros.clone())

    def merge(self, chunk: torch.Tensor, local_targets: torch.Tensor, smoothing: bool) -> None:
        """Fold an fp32 chunk ``(N, c)`` of logits in. ``local_targets`` are the targets minus the chunk's first
        column: the target lies in this chunk where 0 <= local < c. The chunk is overwritten (it is scratch)."""
        new_max = torch.maximum(self.max, chunk.amax(dim=1))
        # A token whose logits so far are all -inf keeps anchor 0, so no exp(-inf + inf) = NaN appears.
        anchor = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
        shift = torch.where(self.max == float("-inf"), torch.zeros_like(new_max), self.max - anchor)
        chunk.sub_(anchor.unsqueeze(1))
        inside = (local_targets >= 0) & (local_targets < chunk.shape[1])
        picked = chunk.gather(1, local_targets.clamp(0, chunk.shape[1] - 1).unsqueeze(1)).squeeze(1)
        self.shifted_target = torch.where(inside, picked, self.shifted_target + shift)
        if smoothing:
            self.shifted_sum = self.shifted_sum + self.columns * shift + chunk.sum(dim=1)
        self.exp_sum = self.exp_sum * torch.exp(shift) + chunk.exp_().sum(dim=1)
        self.max = new_max
        self.columns += chunk.shape[1]

    def token_losses(self, label_smoothing: float) -> torch.Tensor:
        """Cross-entropy per token: (lse - z_y) with label smoothing, lse - z_y = log(s) - (z_y - m)."""
        log_sum = torch.log(self.exp_sum)
        loss = (1.0 - label_smoothing) * (log_sum - self.shifted_target)
        if label_smoothing > 0.0:
            # Skipped at 0 so an overflowing logit sum cannot turn 0 * inf into NaN.
            loss = loss + label_smoothing * (log_sum - self.shifted_sum / self.columns)
        return loss


def reduce_per_sequence(token_losses: torch.Tensor, scored: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, T) fp32 token losses and scored mask -> (B,) fp32; unscored tokens count for nothing, an empty
    sequence gets 0."""
    total = torch.where(scored, token_losses, torch.zeros_like(token_losses)).sum(dim=1)
    if reduction == "sum":
        return total
    return total / scored.sum(dim=1).clamp(min=1).to(total.dtype)


def check_sequence_arguments(
    targets: torch.Tensor, batch_time: tuple[int, int], vocab: int, ignore_index: int, reduction: str,
    label_smoothing: float, values: bool = True,
) -> None:  # fmt: skip
    """Host-side checks shared by both call forms; ``values=True`` also checks the targets' range (one sync)."""
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != batch_time:
        raise ValueError(f"targets must have shape (B, T) = {batch_time}, got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"sequence_reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if vocab < 1:
        raise ValueError(f"the vocabulary must have at least one entry, got V = {vocab}")
    if values and bool(token_targets_outside(targets, vocab, ignore_index).any()):
        raise ValueError(token_targets_message(vocab, ignore_index))


def token_targets_outside(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Where a token target is neither ``ignore_index`` nor in [0, vocab): a bool tensor, nothing read on the host."""
    return (targets != ignore_index) & ((targets < 0) | (targets >= vocab))


def token_targets_message(vocab: int, ignore_index: int) -> str:
    return f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}"


def token_sequence_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    check_values: bool = True,
) -> torch.Tensor:
    """fp32 (B,) per-sequence losses from ``(B, T, V)`` logits of any float dtype and strides. ``check_values=False``
    skips the targets' range check (callers that checked already; nothing here then reads a value)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 3:
        raise TypeError("logits must be a floating-point tensor of shape (B, T, V)")
    batch, time, vocab = logits.shape
    check_sequence_arguments(targets, (batch, time), vocab, ignore_index, reduction, label_smoothing, check_values)
    scored = targets != ignore_index
    local = torch.where(scored, targets, -1)
    token_losses = torch.empty(batch, time, dtype=torch.float32, device=logits.device)
    # One sequence at a time keeps the fp32 copy of the logits to one (T, V) slice.
    for b in range(batch):
        stats = TokenStats.empty(time, logits.device)
        stats.merge(logits[b].to(torch.float32, copy=True), local[b], label_smoothing > 0.0)
        token_losses[b] = stats.token_losses(label_smoothing)
    return reduce_per_sequence(token_losses, scored, reduction)


def chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logit_scale: float,
    logit_softcap: float | None, out: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """fp32 logits of one (token block, vocabulary chunk) into ``out``: GEMM in fp32, then bias, scale, soft cap."""
    logits = torch.mm(hidden.to(torch.float32), weight.to(torch.float32).t(), out=out)
    if bias is not None:
        logits += bias.to(torch.float32)
    if logit_scale != 1.0:
        logits *= logit_scale
    if logit_softcap is not None:
        logits.div_(logit_softcap).tanh_().mul_(logit_softcap)
    return logits


def hidden_sequence_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    token_block: int = TOKEN_BLOCK,
    vocab_chunk: int = VOCAB_CHUNK,
    check_values: bool = True,
) -> torch.Tensor:
    """fp32 (B,) per-sequence losses of ``(hidden @ weight.T + bias) * logit_scale`` (soft-capped if asked),
    without materialising the (B·T, V) logits: peak extra memory is one ``token_block x vocab_chunk`` fp32
    chunk (plus fp32 copies of one block of H and one chunk of W for fp16/bf16 inputs). ``check_values`` as for
    :func:`token_sequence_losses`."""
    check_hidden_arguments(hidden, weight, bias, targets, logit_scale, logit_softcap)
    batch, time, _ = hidden.shape
    vocab = weight.shape[0]
    check_sequence_arguments(targets, (batch, time), vocab, ignore_index, reduction, label_smoothing, check_values)
    if token_block < 1 or vocab_chunk < 1:
        raise ValueError(f"token_block and vocab_chunk must be positive, got {token_block}, {vocab_chunk}")
    scored = targets != ignore_index
    flat_hidden = hidden.reshape(batch * time, hidden.shape[2])  # a view whenever the strides allow one
    flat_targets = torch.where(scored, targets, -1).reshape(-1)
    token_losses = torch.empty(batch * time, dtype=torch.float32, device=hidden.device)
    # One buffer for every chunk: a fresh one per chunk would briefly hold two.
    scratch = torch.empty(min(token_block, batch * time) * min(vocab_chunk, vocab), device=hidden.device)
    for start in range(0, batch * time, token_block):
        rows = slice(start, min(start + token_block, batch * time))
        stats = TokenStats.empty(rows.stop - start, hidden.device)
        for column in range(0, vocab, vocab_chunk):
            columns = slice(column, min(column + vocab_chunk, vocab))
            chunk_bias = None if bias is None else bias[columns]
            out = scratch[: (rows.stop - start) * (columns.stop - column)].view(rows.stop - start, -1)
            logits = chunk_logits(flat_hidden[rows], weight[columns], chunk_bias, logit_scale, logit_softcap, out)
            stats.merge(logits, flat_targets[rows] - column, label_smoothing > 0.0)
        token_losses[rows] = stats.token_losses(label_smoothing)
    return reduce_per_sequence(token_losses.view(batch, time), scored, reduction)


def check_hidden_arguments(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor | None,
    logit_scale: float, logit_softcap: float | None,
) -> None:  # fmt: skip
    """Shapes, dtypes and devices of the hidden-state form (the targets' own checks are separate)."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() != 3:
        raise TypeError("hidden_states must be a floating-point tensor of shape (B, T, D)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("lm_head_weight must be a tensor of shape (V, D)")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"lm_head_weight must have the dtype and device of hidden_states ({hidden.dtype}, {hidden.device}), "
            f"got {weight.dtype}, {weight.device}"
        )
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"lm_head_weight must have D = {hidden.shape[2]} columns, got shape {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != hidden.device):
        raise ValueError(f"lm_head_bias must have shape (V,) = ({weight.shape[0]},) on {hidden.device}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"lm_head_bias must be a floating-point tensor, got {bias.dtype}")
    if targets is None:
        raise TypeError("targets (int64, shape (B, T)) are required")
    if not logit_scale > 0.0:
        raise ValueError(f"logit_scale must be positive, got {logit_scale}")
    if logit_softcap is not None and not logit_softcap > 0.0:
        raise ValueError(f"logit_softcap must be positive or None, got {logit_softcap}")
