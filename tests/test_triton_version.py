"""The Triton backend refuses Triton releases that cannot compile its kernels, with the reason, so ``auto`` falls
back instead of failing on every call."""

import pytest
import torch

import es_kernels.triton.availability as triton_backend


@pytest.mark.parametrize("version", ["3.0.0", "3.1.0", "3.3.1", "3.3.1+git35c6c7c6", "2.3.0"])
def test_old_triton_is_refused_with_a_reason(monkeypatch, version):
    monkeypatch.setattr(triton_backend, "_installed_triton_version", lambda: version)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and ">= 3.4" in reason and version in reason


@pytest.mark.parametrize("version", ["3.4.0", "3.5.1+gitabc", "3.10.0", "4.0.0"])
def test_supported_triton_versions_pass_the_version_test(version):
    assert triton_backend.triton_version_problem(version) is None


def test_unreadable_version_is_refused():
    assert "cannot read" in triton_backend.triton_version_problem("nightly")


def test_named_triton_backend_says_why_when_triton_is_too_old(monkeypatch):
    from es_kernels import backends

    monkeypatch.setattr(triton_backend, "_installed_triton_version", lambda: "3.2.0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(backends.BackendUnavailableError, match=r"triton >= 3\.4.*found 3\.2\.0"):
        backends.resolve_backend("triton", torch.device("cpu"))
