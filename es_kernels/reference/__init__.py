"""Pure-PyTorch oracle: every other backend is tested against these functions."""

from es_kernels.reference.losses import MixupTargets, per_sample_cross_entropy
from es_kernels.reference.sampling import prune_select, race_keys, race_select
from es_kernels.reference.update import ema_update_

__all__ = [
    "MixupTargets",
    "ema_update_",
    "per_sample_cross_entropy",
    "prune_select",
    "race_keys",
    "race_select",
]
