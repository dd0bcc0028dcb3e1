"""The host side of one call: nothing on the call path reads files, package metadata or the device's properties
after the first call; the flat argument list matches its names; auto picks the fastest measured backend per call
form; the host-cost benchmark runs."""

from __future__ import annotations

import builtins
import importlib
import importlib.metadata
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from es_kernels import EvolvedState, _auto_table, backends, evolved_select
from es_kernels.backends import Backend, auto_order
from es_kernels.call import OP_ARGUMENTS, SelectCall

ROOT = Path(__file__).resolve().parents[1]


def test_no_file_is_opened_and_no_metadata_or_device_is_read_per_call(backend, monkeypatch):
    state = EvolvedState(64)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))

    def call(first: int):
        backend.select(state, torch.arange(first, first + 8), 2, logits=logits, targets=labels, check_values=False)

    call(0)  # the first call may load what it needs
    counted = []

    def counting(name, original):
        def wrapper(*args, **kwargs):
            counted.append(name)
            return original(*args, **kwargs)

        return wrapper

    for owner, name in ((builtins, "open"), (io, "open"), (importlib.metadata, "version"),
                        (importlib.metadata, "distribution"), (importlib.util, "find_spec"),
                        (importlib, "import_module"), (torch.cuda, "get_device_capability"),
                        (torch.cuda, "get_device_properties")):  # fmt: skip
        monkeypatch.setattr(owner, name, counting(f"{owner.__name__}.{name}", getattr(owner, name)))
    for first in (8, 16, 24):
        call(first)
    assert counted == []


def test_the_flat_argument_list_follows_its_names():
    tensors = {name: torch.zeros(1) for name in OP_ARGUMENTS}
    fields = {name: tensors[name] for name in ("score", "weight", "indices", "logits", "labels_a", "labels_b",
                                                "soft_targets", "losses")}  # fmt: skip
    call = SelectCall(**fields, k=3, beta1=0.25, beta2=0.5, lam=0.75, label_smoothing=0.125)
    seed = torch.zeros(1, dtype=torch.int64)
    named = dict(zip(OP_ARGUMENTS, call.op_arguments(seed), strict=True))
    assert named["seed"] is seed
    assert named["k"] == 3 and named["beta1"] == 0.25 and named["beta2"] == 0.5
    assert named["lam"] == 0.75 and named["label_smoothing"] == 0.125
    for name, tensor in fields.items():
        assert named[name] is tensor, name


@pytest.mark.parametrize("form", backends.CALL_FORMS)
def test_auto_picks_the_fastest_measured_available_backend(form, monkeypatch):
    figures = _auto_table.MICROSECONDS["cuda"][form]
    fastest = min(figures, key=figures.__getitem__)
    assert auto_order("cuda", form)[0].value == fastest
    device = torch.device("cuda", 0)
    # Pretend every backend runs on the GPU, then take the fastest away: auto must fall to the next fastest.
    monkeypatch.setattr(backends, "_availability", {})
    for name in ("triton", "extension"):
        monkeypatch.setitem(backends._REASONS, Backend(name), lambda device: None)
    assert backends.resolve_backend("auto", device, form).value == fastest
    backends.forget_availability()
    if fastest != "torch":
        monkeypatch.setitem(backends._REASONS, Backend(fastest), lambda device: "switched off")
        ranked = sorted(figures, key=figures.__getitem__)
        assert backends.resolve_backend("auto", device, form).value == ranked[1]
    # No pick is measured 1.3x slower than another available backend.
    chosen = backends.resolve_backend("auto", device, form).value
    available = [name for name in figures if backends._cached_reason(Backend(name), device) is None]
    assert figures[chosen] < 1.3 * min(figures[name] for name in available)


def test_cpu_auto_prefers_the_extension_then_the_reference():
    assert auto_order("cpu", "logits") == (Backend.EXTENSION, Backend.TORCH)


def test_host_cost_benchmark_runs():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_cost", "--calls", "3", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "custom op dispatch" in result.stdout and "check_values='deferred'" in result.stdout


def test_compiled_with_the_default_checks_defers_the_error():
    def step(state, ids, logits, labels):
        return evolved_select(state, ids, 2, logits=logits, targets=labels, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_state, compiled_state = EvolvedState(8), EvolvedState(8)
    logits, labels = torch.randn(4, 6), torch.randint(0, 6, (4,))
    torch.manual_seed(0)
    eager = step(eager_state, torch.tensor([3, 0, 5, 1]), logits, labels)
    torch.manual_seed(0)
    assert torch.equal(compiled(compiled_state, torch.tensor([3, 0, 5, 1]), logits, labels), eager)
    assert torch.equal(compiled_state.weight, eager_state.weight)
    before = compiled_state.weight.clone()
    compiled(compiled_state, torch.tensor([3, 0, 5, 9]), logits, labels)  # id 9 of 8: no host read in the graph
    assert torch.equal(compiled_state.weight, before)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 8\), got 9"):
        compiled_state.check()


def test_a_generator_inside_a_compiled_region_says_what_to_do():
    def step(state, ids, losses, generator):
        return evolved_select(state, ids, 1, losses=losses, generator=generator, backend="torch")

    with pytest.raises(Exception, match="leave generator=None"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(
            EvolvedState(4), torch.arange(2), torch.rand(2), torch.Generator().manual_seed(0)
        )
