"""The self-check command: passes on the real backends, fails (exit 1) on a broken one. Its tolerances and laws are
es_kernels.testing's, the test suite's own."""

from __future__ import annotations

import dataclasses
import io

import torch
from helpers import extension_unavailable_reason

from es_kernels import reference, selfcheck


def test_passes_on_cpu_backends():
    out = io.StringIO()
    assert selfcheck.run(["cpu"], timing=False, out=out), out.getvalue()
    text = out.getvalue()
    assert "torch      PASS" in text
    if extension_unavailable_reason() is None:
        assert "extension  PASS" in text


def _only_torch(monkeypatch):
    # Check the reference backend alone (the broken behaviour below is patched into it), with fewer law draws: a
    # sampler that always takes the first k is caught by a few hundred.
    monkeypatch.setattr(selfcheck, "backend_status", lambda device: {"torch": "available"})
    monkeypatch.setattr(selfcheck, "LAW_DRAWS", 300)


def test_fails_on_wrong_losses(monkeypatch):
    _only_torch(monkeypatch)
    original = reference.fused_select

    def off_by_a_bit(call):
        # select.py hands the reference losses it computed itself (value checks on), or logits: skew both alike.
        losses = reference.call_losses(call) * (1 + 1e-3)
        return original(dataclasses.replace(call, logits=None, labels_a=None, labels_b=None, soft_targets=None,
                                            losses=losses))  # fmt: skip

    monkeypatch.setattr(reference, "fused_select", off_by_a_bit)
    out = io.StringIO()
    assert not selfcheck.run(["cpu"], timing=False, out=out)
    assert "torch      FAIL" in out.getvalue() and "losses differ from the reference" in out.getvalue()


def test_fails_on_a_biased_selection(monkeypatch):
    _only_torch(monkeypatch)
    original = reference.fused_select

    def first_k(call):
        positions, losses = original(call)
        return torch.arange(positions.numel(), device=positions.device), losses

    monkeypatch.setattr(reference, "fused_select", first_k)
    out = io.StringIO()
    assert not selfcheck.run(["cpu"], timing=False, out=out)
    assert "selection law" in out.getvalue()


def test_main_exit_code(monkeypatch, capsys):
    _only_torch(monkeypatch)
    assert selfcheck.main(["--device", "cpu"]) == 0
    assert "| B | C | logits | torch |" in capsys.readouterr().out
    monkeypatch.setattr(selfcheck, "CHECKS", [("always broken", lambda backend, device: 1 / 0)])
    assert selfcheck.main(["--device", "cpu", "--no-timing"]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().out


def _two_backend_table(monkeypatch, load, torch_samples, other_samples):
    # Timings faked (the verdict is under test, not the machine): one shape, the reference and one other backend.
    monkeypatch.setattr(selfcheck, "SHAPES", [(64, 10, torch.float32, 0.0)])
    samples = {"torch": torch_samples, "extension": other_samples}
    monkeypatch.setattr(selfcheck, "time_select", lambda backend, *shape: samples[backend])
    out = io.StringIO()
    selfcheck.print_timings("cpu", ["torch", "extension"], out, load_source=lambda: (load, load, load))
    return out.getvalue()


def test_timings_on_an_idle_machine_give_the_speed_up(monkeypatch):
    text = _two_backend_table(monkeypatch, 0.0, [200e-6] * 20, [50e-6] * 20)
    assert "| 64 | 10 | float32 | 200 µs | 50 µs (4.0x) |" in text
    assert "unreliable" not in text


def test_a_loaded_machine_withholds_the_speed_up(monkeypatch):
    # The trial: a loaded 2-core machine slowed the 2-thread reference 80-fold and the self-check printed "306.7x".
    text = _two_backend_table(monkeypatch, 40.0, [15793e-6] * 20, [52e-6] * 20)
    assert "speed-ups unreliable (machine loaded: load average 40.00" in text
    assert "| 64 | 10 | float32 | 15793 µs | 52 µs (unreliable) |" in text
    assert "x)" not in text  # no ratio at all


def test_widely_spread_timings_withhold_the_speed_up(monkeypatch):
    text = _two_backend_table(monkeypatch, 0.0, [200e-6, 900e-6] * 10, [50e-6] * 20)
    assert "speed-ups unreliable (timings spread" in text and "x)" not in text
