"""Bad input, once per backend: a clear error naming the argument, the same type and words on every backend (the
messages live in ``es_kernels/_checks.py`` only), and never a half-updated state (docs/architecture.md §4)."""

from __future__ import annotations

import pytest
import torch

from es_kernels import EvolvedState, evolved_prune, evolved_select

LOGITS = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 3])
IDS = torch.arange(4)
NAN_SOFT = torch.rand(4, 5).index_fill(0, torch.tensor([3]), float("nan"))
# A -inf logit away from every target: refused as a logit, though each loss stays finite.
NEG_INF_AWAY_FROM_TARGETS = LOGITS.index_fill(1, torch.tensor([4]), float("-inf"))

# (positional arguments after the state, keyword arguments, error, a word of the message that names the argument)
BAD_CALLS = [
    ((IDS, 0), {"losses": torch.rand(4)}, ValueError, "k"),
    ((IDS, 5), {"losses": torch.rand(4)}, ValueError, "k"),
    ((IDS, 1.5), {"losses": torch.rand(4)}, TypeError, "k"),
    ((IDS, True), {"losses": torch.rand(4)}, TypeError, "k"),
    ((torch.tensor([0, 1, 2, 10]), 1), {"losses": torch.rand(4)}, ValueError, "indices"),
    ((torch.tensor([0, 1, 2, -3]), 1), {"logits": LOGITS, "targets": LABELS}, ValueError, "indices"),
    ((torch.tensor([0, 1, 1, 3]), 1), {"losses": torch.rand(4)}, ValueError, "indices"),
    ((IDS.float(), 1), {"losses": torch.rand(4)}, TypeError, "indices"),
    ((IDS, 1), {"losses": torch.rand(5)}, ValueError, "losses"),
    ((IDS, 1), {"losses": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, ValueError, "losses"),
    ((IDS, 1), {"losses": torch.tensor([1.0, -1.0, 1.0, 1.0])}, ValueError, "losses"),
    ((IDS, 1), {}, ValueError, "logits"),
    ((IDS, 1), {"logits": LOGITS}, ValueError, "targets"),
    ((IDS, 1), {"logits": LOGITS, "targets": LABELS, "losses": torch.rand(4)}, ValueError, "losses"),
    ((IDS, 1), {"logits": LOGITS[:3], "targets": LABELS}, ValueError, "logits"),
    ((IDS, 1), {"logits": LOGITS[:, :1], "targets": LABELS}, ValueError, "logits"),
    ((IDS, 1), {"logits": LOGITS.long(), "targets": LABELS}, TypeError, "logits"),
    ((IDS, 1), {"logits": LOGITS.double().log(), "targets": LABELS}, ValueError, "logits"),
    ((IDS, 1), {"logits": LOGITS.index_fill(1, torch.tensor([2]), float("inf")), "targets": LABELS}, ValueError,
     "logits"),
    ((IDS, 1), {"logits": NEG_INF_AWAY_FROM_TARGETS, "targets": LABELS}, ValueError, "logits"),
    ((IDS, 1), {"logits": torch.randn(4, 37).log().bfloat16(), "targets": LABELS}, ValueError, "logits"),
    ((IDS, 1), {"logits": torch.randn(4, 37).log().half().t().contiguous().t(), "targets": LABELS}, ValueError,
     "logits"),
    ((IDS, 1), {"logits": LOGITS, "targets": torch.tensor([0, 1, 2, 5])}, ValueError, "targets"),
    ((IDS, 1), {"logits": LOGITS, "targets": torch.tensor([0, 1, -2, 3])}, ValueError, "targets"),
    ((IDS, 1), {"logits": LOGITS, "targets": LABELS[:3]}, ValueError, "targets"),
    ((IDS, 1), {"logits": LOGITS, "targets": torch.rand(4, 4)}, ValueError, "targets"),
    ((IDS, 1), {"logits": LOGITS, "targets": -torch.rand(4, 5)}, ValueError, "targets"),
    ((IDS, 1), {"logits": LOGITS, "targets": NAN_SOFT}, ValueError, "targets"),
    ((IDS, 1), {"logits": LOGITS, "targets": (LABELS, LABELS, 1.5)}, ValueError, "lam"),
    ((IDS, 1), {"logits": LOGITS, "targets": (LABELS - 1, LABELS, 0.5)}, ValueError, "y_a"),
    ((IDS, 1), {"logits": LOGITS, "targets": (LABELS, LABELS + 9, 0.5)}, ValueError, "y_b"),
    ((IDS, 1), {"logits": LOGITS, "targets": (LABELS, LABELS)}, ValueError, "mixup"),
    ((IDS, 1), {"logits": LOGITS, "targets": LABELS, "label_smoothing": 1.2}, ValueError, "label_"),
    ((IDS, 1), {"losses": torch.rand(4), "generator": 3}, TypeError, "generator"),
]  # fmt: skip


def visited_state() -> EvolvedState:
    state = EvolvedState(8)
    state.observe(torch.tensor([0, 5]), torch.tensor([1.0, 2.0]))
    return state


@pytest.mark.parametrize("args, kwargs, error, name", BAD_CALLS)
def test_bad_input_names_the_argument_with_the_reference_words_and_changes_nothing(backend, args, kwargs, error, name):
    state = visited_state()
    before = state.state_dict()
    with pytest.raises(error, match=name) as caught:
        backend.select(state, *args, **kwargs)
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])
    with pytest.raises(error) as oracle:
        evolved_select(visited_state(), *args, backend="torch", **kwargs)
    assert str(caught.value) == str(oracle.value)


def test_logits_overflowing_to_an_inf_loss_are_refused_before_the_update(backend):
    """Finite logits can still give an inf loss; with value checks on it is refused and nothing is written."""
    state = EvolvedState(2)
    before = state.state_dict()
    huge = torch.tensor([[3e38, -3e38], [0.0, 1.0]])
    with pytest.raises(ValueError, match="losses computed from logits must be finite"):
        backend.select(state, torch.arange(2), 1, logits=huge, targets=torch.tensor([1, 0]))
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])


@pytest.mark.parametrize("argument", ["indices", "losses", "logits", "targets"])
def test_tensors_on_another_device_are_refused_by_name(backend, argument):
    """The meta device stands in for a GPU: devices are compared before any value is read."""
    tensors = {"indices": IDS, "logits": LOGITS, "targets": LABELS, "losses": torch.rand(4)}
    tensors[argument] = tensors[argument].to("meta")
    scored = (
        {"losses": tensors["losses"]}
        if argument == "losses"
        else {"logits": tensors["logits"], "targets": tensors["targets"]}
    )
    with pytest.raises(ValueError, match=f"{argument} is on meta"):
        backend.select(EvolvedState(8), tensors["indices"], 1, **scored)


def test_state_and_prune_arguments_are_checked(backend):
    with pytest.raises(TypeError, match="state"):
        backend.select(object(), torch.arange(2), 1, losses=torch.rand(2))
    state = EvolvedState(4)
    with pytest.raises(ValueError, match="keep"):
        backend.prune(state, 5)
    with pytest.raises(ValueError, match="by"):
        backend.prune(state, 2, by="loss")
    with pytest.raises(TypeError, match="generator"):
        evolved_prune(state, 2, generator=3, backend=backend.name)


@pytest.mark.parametrize("strategy", ["loss_pass", "undo"])
def test_the_capability_record_not_the_backend_name_decides_how_an_overflow_is_refused(monkeypatch, strategy):
    """select.py reads a backend's ``CAPABILITIES``: the reference run with either strategy refuses the overflow with
    the state as it was, and only ``loss_pass`` asks the module for its losses before the fused op."""
    import dataclasses

    from es_kernels import reference

    record = dataclasses.replace(reference.CAPABILITIES, computed_loss_check=strategy)
    monkeypatch.setattr(reference, "CAPABILITIES", record)
    loss_passes = []
    real_call_losses = reference.call_losses
    monkeypatch.setattr(reference, "call_losses", lambda call: loss_passes.append(call) or real_call_losses(call))
    state = EvolvedState(2)
    state.observe(torch.arange(2), torch.tensor([0.5, 2.0]))
    before = state.state_dict()
    huge = torch.tensor([[3e38, -3e38], [0.0, 1.0]])
    with pytest.raises(ValueError, match="losses computed from logits must be finite"):
        evolved_select(state, torch.arange(2), 1, logits=huge, targets=torch.tensor([1, 0]), backend="torch")
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])
    assert len(loss_passes) == (1 if strategy == "loss_pass" else 0)


def test_every_backend_module_declares_its_capabilities_and_select_never_branches_on_a_name():
    import inspect

    from es_kernels import backends, select
    from es_kernels.call import BackendCapabilities

    for member in backends.Backend:
        if member is not backends.Backend.AUTO:
            assert isinstance(select._backend_module(member).CAPABILITIES, BackendCapabilities), member
    outside_the_module_map = inspect.getsource(select).replace(inspect.getsource(select._backend_module), "")
    for name in ("Backend.TORCH", "Backend.TRITON", "Backend.EXTENSION"):
        assert name not in outside_the_module_map
    with pytest.raises(ValueError, match="computed_loss_check"):
        BackendCapabilities(computed_loss_check="later")
