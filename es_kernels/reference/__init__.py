"""Pure-PyTorch reference ("torch" backend): every other backend is tested against these functions.

As a backend it provides ``CAPABILITIES``, ``fused_select(call)``, ``sequence_losses(call)``, ``call_losses(call)``
and ``prune_select(values, keep, generator)``, the contract of ``es_kernels/select.py``.
"""

from es_kernels.call import BackendCapabilities
from es_kernels.reference.losses import MixupTargets, per_sample_cross_entropy
from es_kernels.reference.pipeline import call_losses, fused_select, sequence_losses
from es_kernels.reference.sampling import prune_select, race_keys, race_select
from es_kernels.reference.update import ema_update_

# Losses come first in PyTorch, so immediate checks refuse an overflow before the state is touched; its label
# indexing (gather, one_hot) faults on a label out of range.
CAPABILITIES = BackendCapabilities(computed_loss_check="loss_pass", labels_in_range=True)

__all__ = [
    "CAPABILITIES",
    "MixupTargets",
    "call_losses",
    "ema_update_",
    "fused_select",
    "per_sample_cross_entropy",
    "prune_select",
    "race_keys",
    "race_select",
    "sequence_losses",
]
