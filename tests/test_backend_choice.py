"""Choosing a backend: ``last_backend`` reports what ran, an unknown or unavailable backend is explained, ``auto``
picks one that runs here. What each backend computes is in the per-property files (test_losses, test_exact_update,
test_sampling_law, test_bad_input, test_determinism), which run once per backend."""

from __future__ import annotations

import pytest
import torch

from es_kernels import BackendUnavailableError, EvolvedState, backend_status, evolved_select, last_backend


def test_reference_backend_reported_and_unavailable_backend_explained():
    evolved_select(EvolvedState(4), torch.arange(4), 1, losses=torch.rand(4), backend="torch")
    assert last_backend() == "torch"
    status = backend_status("cpu")
    assert status["torch"] == "available"
    with pytest.raises(ValueError, match="backend"):
        evolved_select(EvolvedState(4), torch.arange(4), 1, losses=torch.rand(4), backend="cuda-magic")
    if status["triton"] != "available":
        with pytest.raises(BackendUnavailableError, match="triton"):
            evolved_select(EvolvedState(4), torch.arange(4), 1, losses=torch.rand(4), backend="triton")


def test_auto_on_cpu_runs_and_reports_a_backend():
    evolved_select(EvolvedState(4), torch.arange(4), 1, losses=torch.rand(4))
    assert last_backend() in ("extension", "torch")
