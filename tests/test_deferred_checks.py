"""Deferred value checks, once per backend: every bad value of test_bad_input is caught on the device without the
host reading it, the bad call's update never reaches the state, and the error is raised at the next point where the
host reads (the next call, ``check``, ``set_epoch``, ``state_dict``), naming the call. On CPU ``check_values=True``
stays immediate; ``"deferred"`` runs the device path there too, which is what a GPU runs by default."""

from __future__ import annotations

import pytest
import torch
from test_bad_input import BAD_CALLS, LABELS, NEG_INF_AWAY_FROM_TARGETS, visited_state

from es_kernels import EvolvedState, _checks, evolved_select, sequence_losses
from es_kernels import select as select_module
from es_kernels import state as state_module
from es_kernels.backends import Backend


@pytest.fixture(autouse=True, params=["C++ ops", "torch ops"])
def implementation(request, monkeypatch):
    """Every test runs on both implementations of the deferred checks: the extension's two ops (what a GPU with
    the extension runs) and the torch-op fallback (no extension, and inside torch.compile)."""
    if request.param == "torch ops":
        monkeypatch.setattr(state_module, "_native_deferred_checks", lambda device: False)
    elif not state_module._native_deferred_checks(torch.device("cpu")):
        pytest.skip("the extension is unavailable")
    return request.param


# The value errors among the bad calls: the call itself goes through in deferred mode; a later read raises. A -inf
# logit away from every target gives finite losses, which the deferred mode accepts (it checks the losses computed
# from the logits instead of reading the logits a second time); the immediate mode refuses the logit itself.
VALUE_ERRORS = [
    case for case in BAD_CALLS if case[2] is ValueError and case[1].get("logits") is not NEG_INF_AWAY_FROM_TARGETS
]


def oracle_message(args, kwargs) -> str | None:
    try:
        evolved_select(visited_state(), *args, backend="torch", check_values="immediate", **kwargs)
    except (TypeError, ValueError) as error:
        return str(error)
    return None


def expected_deferred_message(immediate: str) -> str:
    # Logits are not read a second time: their NaN/inf shows in the losses computed from them.
    return _checks.losses_not_finite(_checks.COMPUTED_LOSSES) if immediate == _checks.LOGITS_NOT_FINITE else immediate


@pytest.mark.parametrize("args, kwargs, error, name", VALUE_ERRORS)
def test_every_bad_value_is_caught_later_with_the_state_unchanged(backend, args, kwargs, error, name):
    state = visited_state()
    before = state.state_dict()
    immediate = oracle_message(args, kwargs)
    try:
        backend.select(state, *args, check_values="deferred", **kwargs)
    except ValueError as raised:  # a host-side check (shapes, k, ...): raised at the call, as in immediate mode
        assert str(raised) == immediate
        return
    assert torch.equal(state.score, before["score"]) and torch.equal(state.weight, before["weight"])
    with pytest.raises(ValueError, match=name) as caught:
        state.check()
    message = str(caught.value)
    assert message.startswith(expected_deferred_message(immediate)), message
    assert "call 2" in message  # the observe of visited_state was call 1
    state.check()  # raised once; nothing pending any more


def test_the_inf_logit_with_a_finite_loss_is_accepted_exactly_as_without_checks(backend):
    deferred, unchecked = visited_state(), visited_state()
    kwargs = {"logits": NEG_INF_AWAY_FROM_TARGETS, "targets": LABELS, "generator": torch.Generator().manual_seed(1)}
    backend.select(deferred, torch.arange(1, 5), 1, check_values="deferred", **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(1)
    backend.select(unchecked, torch.arange(1, 5), 1, check_values=False, **kwargs)
    deferred.check()
    assert torch.equal(deferred.weight, unchecked.weight) and torch.isfinite(deferred.weight).all()


def test_the_error_comes_at_the_next_call_and_later_good_calls_still_count(backend):
    state, twin = EvolvedState(6), EvolvedState(6)
    backend.select(state, torch.tensor([0, 9]), 1, losses=torch.rand(2), check_values="deferred")  # call 1: bad id
    with pytest.raises(ValueError, match=r"indices must be in \[0, 6\), got 9.*call 1"):
        backend.select(state, torch.tensor([1, 2]), 1, losses=torch.tensor([0.5, 2.0]), check_values="deferred")
    # The call that raised did nothing; this one runs, equal to a state that never saw the bad call.
    backend.select(state, torch.tensor([1, 2]), 1, losses=torch.tensor([0.5, 2.0]), check_values="deferred")
    backend.select(twin, torch.tensor([1, 2]), 1, losses=torch.tensor([0.5, 2.0]), check_values="deferred")
    state.check()
    assert torch.equal(state.score, twin.score) and torch.equal(state.weight, twin.weight)


@pytest.mark.parametrize("reader", ["check", "state_dict", "set_epoch"])
def test_every_host_read_raises_the_pending_error(backend, reader):
    state = EvolvedState(6)
    backend.select(state, torch.tensor([1, 1]), 1, losses=torch.rand(2), check_values="deferred")
    read = {"check": state.check, "state_dict": state.state_dict, "set_epoch": lambda: state.begin_epoch(0)}[reader]
    with pytest.raises(ValueError, match="must not repeat"):
        read()
    assert torch.equal(state.weight, torch.full((6,), 1 / 6))


def test_a_revisit_in_the_epoch_is_refused_on_the_device(backend):
    state = EvolvedState(8)
    state.begin_epoch(0)
    backend.select(state, torch.tensor([2, 3]), 1, losses=torch.rand(2), check_values="deferred")
    after_first = state.weight.clone()
    backend.select(state, torch.tensor([4, 3]), 1, losses=torch.rand(2), check_values="deferred")
    assert torch.equal(state.weight, after_first)
    with pytest.raises(ValueError, match=r"sample ids \[3\] were already visited in epoch 0"):
        state.check()
    # The refused call marked nothing: id 4 can still be visited this epoch.
    backend.select(state, torch.tensor([4]), 1, losses=torch.rand(1), check_values="deferred")
    state.check()


def test_observe_defers_too():
    state = EvolvedState(5)
    state.observe(torch.tensor([0, 1]), torch.tensor([1.0, -2.0]), check_values="deferred")
    assert torch.equal(state.weight, torch.full((5,), 0.2))
    with pytest.raises(ValueError, match=r"losses must be non-negative.*call 1"):
        state.check()


@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_token_targets_out_of_range_are_deferred(backend, form, monkeypatch):
    """The language-model form under deferred checks: a target out of range (neither ignore_index nor in [0, V))
    never reaches a kernel; its sequence's loss is NaN, which the following evolved_select(losses=...) refuses
    later, naming the call, with the state as it was."""
    generator = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 3, 4, generator=generator), torch.randn(7, 4, generator=generator)
    source = (
        {"logits": hidden @ weight.t()} if form == "logits" else {"hidden_states": hidden, "lm_head_weight": weight}
    )
    targets = torch.tensor([[1, -100, 7], [0, 2, 3]])
    state = EvolvedState(4)
    module = select_module._backend_module(Backend(backend.name))
    seen, kernel = [], module.sequence_losses
    monkeypatch.setattr(module, "sequence_losses", lambda call: seen.append(call.labels_a) or kernel(call))
    losses = sequence_losses(targets, backend=backend.name, check_values="deferred", **source)
    assert len(seen) == 1  # the backend's own sequence op ran
    if module.CAPABILITIES.labels_in_range:  # its indexing would fault on 7: it gets a target in range instead
        assert seen[0].tolist() == [[1, -100, 6], [0, 2, 3]]
    clean = sequence_losses(torch.tensor([[1, -100, -100], [0, 2, 3]]), backend=backend.name, **source)
    assert losses[0].isnan() and torch.equal(losses[1], clean[1])
    negative = sequence_losses(torch.tensor([[1, 2, 3], [-5, 2, 3]]), backend=backend.name, check_values="deferred",
                               **source)  # fmt: skip
    assert negative[0].isfinite() and negative[1].isnan()
    backend.select(state, torch.tensor([0, 1]), 1, losses=losses, check_values="deferred")
    assert torch.equal(state.weight, torch.full((4,), 0.25)) and not state.scored.any()
    with pytest.raises(ValueError, match=r"losses must be finite.*call 1"):
        state.check()


def test_immediate_checks_refuse_token_targets_out_of_range_at_sequence_losses(backend):
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 7\) or equal ignore_index=-100"):
        sequence_losses(torch.tensor([[1, -100, 7]]), logits=torch.randn(1, 3, 7), backend=backend.name)


def test_the_default_is_immediate_on_cpu_and_a_bad_mode_is_named():
    state = EvolvedState(4)
    with pytest.raises(ValueError, match="indices must be in"):
        evolved_select(state, torch.tensor([0, 7]), 1, losses=torch.rand(2))
    with pytest.raises(ValueError, match="check_values must be one of"):
        evolved_select(state, torch.tensor([0, 1]), 1, losses=torch.rand(2), check_values="later")
    assert _checks.check_mode(True, torch.device("cuda")) == _checks.DEFERRED
    assert _checks.check_mode(True, torch.device("cpu")) == _checks.IMMEDIATE


def test_the_cpp_ops_pass_opcheck(implementation):
    if implementation != "C++ ops":
        pytest.skip("the C++ ops only")
    state = EvolvedState(10)
    indices, labels = torch.tensor([3, 1, 7]), torch.tensor([0, 4, 2])
    guard = (state.score, state.weight, indices, None, labels, None, 5, None, None, None, -100)
    torch.library.opcheck(torch.ops.es_kernels_C.deferred_guard.default, guard)
    safe, snapshot, status = torch.ops.es_kernels_C.deferred_guard(*guard)
    settle = (state.score, state.weight, safe, snapshot, status, torch.rand(3), None, state._scored,
              state._deferred_error, state._calls, 5)  # fmt: skip
    torch.library.opcheck(torch.ops.es_kernels_C.deferred_settle.default, settle)


def test_the_guard_reports_the_first_failure_in_the_immediate_order(implementation):
    """Several bad values at once: the deferred error is the one the immediate mode raises first."""
    state = EvolvedState(6)
    ids = torch.tensor([9, 2, 2])  # out of range and repeated
    evolved_select(state, ids, 1, losses=torch.tensor([1.0, float("nan"), -1.0]), check_values="deferred")
    with pytest.raises(ValueError, match=r"indices must be in \[0, 6\), got 9"):
        state.check()
    evolved_select(state, torch.tensor([2, 2]), 1, losses=torch.tensor([float("nan"), -1.0]), check_values="deferred")
    with pytest.raises(ValueError, match="must not repeat"):
        state.check()
    evolved_select(state, torch.tensor([1, 2]), 1, losses=torch.tensor([-1.0, float("inf")]), check_values="deferred")
    with pytest.raises(ValueError, match="losses must be finite"):
        state.check()


def test_a_refused_call_marks_nothing_as_scored(backend):
    state = EvolvedState(6)
    backend.select(state, torch.tensor([1, 4]), 1, losses=torch.tensor([1.0, -1.0]), check_values="deferred")
    assert not state.scored.any()
    with pytest.raises(ValueError, match="non-negative"):
        state.check()
    backend.select(state, torch.tensor([1, 4]), 1, losses=torch.tensor([1.0, 2.0]), check_values="deferred")
    assert state.scored.tolist() == [False, True, False, False, True, False]


def test_loading_a_state_drops_the_pending_error():
    state, saved = EvolvedState(4), EvolvedState(4).state_dict()
    evolved_select(state, torch.tensor([0, 0]), 1, losses=torch.rand(2), check_values="deferred")
    state.load_state_dict(saved)
    state.check()  # nothing pending: the loaded state replaced what the error was about
    evolved_select(state, torch.tensor([0, 9]), 1, losses=torch.rand(2), check_values="deferred")
    with pytest.raises(ValueError, match="indices must be in"):
        state.check()
