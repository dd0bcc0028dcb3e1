"""es_kernels: Evolved Sampling (ES/ESWP) — online data selection from per-sample loss dynamics."""

from es_kernels.backends import Backend, BackendUnavailableError, backend_status, last_backend
from es_kernels.reference import MixupTargets
from es_kernels.sampler import EvolvedSampler
from es_kernels.select import evolved_prune, evolved_select, sequence_losses
from es_kernels.state import EvolvedState
from es_kernels.train import EvolvedTraining, IndexedDataset, corrupt_labels

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "EvolvedSampler",
    "EvolvedState",
    "EvolvedTraining",
    "IndexedDataset",
    "MixupTargets",
    "backend_status",
    "corrupt_labels",
    "evolved_prune",
    "evolved_select",
    "last_backend",
    "sequence_losses",
]
