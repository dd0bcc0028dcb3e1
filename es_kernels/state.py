"""EvolvedState: the per-sample score ``s`` and weight ``w`` of Evolved Sampling, and their update rule."""

from __future__ import annotations

import torch

from es_kernels import _checks
from es_kernels.reference.update import ema_update_


class EvolvedState:
    """Per-sample score ``s`` and weight ``w`` (fp32, length n, both starting at 1/n).

    A visit of sample i with loss l sets ``w_i = b1*s_i + (1-b1)*l`` using the old ``s_i``, then
    ``s_i = b2*s_i + (1-b2)*l``. ``(b1, b2) = (0, 0)`` is plain loss sampling and ``(1, 1)`` uniform sampling.
    The buffers are updated in place and never reallocated, so CUDA graphs and compiled code that captured them
    stay valid.

    Args:
        num_samples: size n of the training set; sample ids are 0..n-1.
        beta1: EMA factor of the weight (paper: 0.2).
        beta2: EMA factor of the score (paper: 0.9 for ES, 0.8 for ESWP).
        device: where the buffers live; put them where the logits are (the GPU in training).
    """

    def __init__(
        self,
        num_samples: int,
        beta1: float = 0.2,
        beta2: float = 0.9,
        device: torch.device | str | None = None,
    ) -> None:
        num_samples = _checks.check_int("num_samples", num_samples, low=1)
        self.beta1 = _checks.check_fraction("beta1", beta1)
        self.beta2 = _checks.check_fraction("beta2", beta2)
        initial = 1.0 / num_samples
        self.score = torch.full((num_samples,), initial, dtype=torch.float32, device=device)
        self.weight = torch.full((num_samples,), initial, dtype=torch.float32, device=device)

    @property
    def num_samples(self) -> int:
        return self.score.numel()

    @property
    def device(self) -> torch.device:
        return self.score.device

    def __repr__(self) -> str:
        return (
            f"EvolvedState(num_samples={self.num_samples}, beta1={self.beta1}, beta2={self.beta2}, "
            f"device={self.device})"
        )

    def observe(self, indices: torch.Tensor, losses: torch.Tensor, *, check_values: bool = True) -> None:
        """Update-only step: apply the visit rule for ``indices`` with their ``losses``, select nothing.

        Used in annealing epochs with the training forward's detached per-sample losses. Raises before touching
        the state if an argument is bad.
        """
        indices = _checks.check_indices("indices", indices, self.num_samples, self.device, check_values)
        losses = _checks.check_losses("losses", losses, indices.numel(), self.device, check_values)
        ema_update_(self.score, self.weight, indices, losses.detach(), self.beta1, self.beta2)

    def state_dict(self) -> dict[str, object]:
        """Tensors and plain numbers only, so ``torch.load(..., weights_only=True)`` reads it back."""
        return {
            "score": self.score.detach().clone(),
            "weight": self.weight.detach().clone(),
            "beta1": self.beta1,
            "beta2": self.beta2,
        }

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """Copy a saved state in place (the buffers keep their device and identity). Checks everything first."""
        missing = {"score", "weight", "beta1", "beta2"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        beta1 = _checks.check_fraction("state_dict['beta1']", state_dict["beta1"])
        beta2 = _checks.check_fraction("state_dict['beta2']", state_dict["beta2"])
        tensors = {}
        for key in ("score", "weight"):
            value = _checks.check_tensor(f"state_dict['{key}']", state_dict[key])
            if value.shape != self.score.shape:
                raise ValueError(
                    f"state_dict['{key}'] has shape {tuple(value.shape)}, expected ({self.num_samples},): "
                    "was it saved for another data set?"
                )
            if value.dtype != torch.float32:
                raise TypeError(f"state_dict['{key}'] must be float32, got {value.dtype}")
            tensors[key] = value
        self.beta1, self.beta2 = beta1, beta2
        self.score.copy_(tensors["score"])
        self.weight.copy_(tensors["weight"])
