"""The ops' boundaries: argument lists against the call object, host-side checks, torch.compile(fullgraph=True).

Runs on CPU without Triton's interpreter, where the Triton ops must refuse to run (they have no CPU kernel but the
interpreter); the interpreted Triton kernel behind the same ops is compiled and checked in test_triton.py.
Module-level imports stay free of ``torch._dynamo`` (which imports triton) so that test_triton.py can still choose
the interpreter when collected in the same session.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from helpers import extension_unavailable_reason

import es_kernels.triton.ops  # noqa: F401  (registers the es_kernels:: ops)
from es_kernels import EvolvedState, evolved_prune, evolved_select, extension, last_backend, reference
from es_kernels.call import OP_ARGUMENTS, SelectCall, draw_seed
from es_kernels.triton import launch

CPU = torch.device("cpu")
_REASON = extension_unavailable_reason("cpu")
needs_extension = pytest.mark.skipif(_REASON is not None, reason=f"extension unavailable: {_REASON}")


def _op_arguments(kind: str, generator: torch.Generator) -> tuple:
    batch, classes, n = 6, 9, 20
    score = torch.rand(n, generator=generator) + 0.1
    weight = score.clone()
    indices = torch.randperm(n, generator=generator)[:batch]
    seed = draw_seed(generator, CPU)
    logits = torch.randn(batch, classes, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    other = torch.randint(0, classes, (batch,), generator=generator)
    common = (score, weight, indices, seed, 2, 0.2, 0.9)
    if kind == "losses":
        return (*common, None, None, None, None, 1.0, torch.rand(batch, generator=generator), 0.0)
    if kind == "labels":
        return (*common, logits, labels, None, None, 1.0, None, 0.1)
    if kind == "mixup":
        return (*common, logits, labels, other, None, 0.3, None, 0.0)
    soft = torch.rand(batch, classes, generator=generator).softmax(dim=1)
    return (*common, logits, None, None, soft, 1.0, None, 0.05)


def _schema_names(op) -> tuple[str, ...]:
    return tuple(argument.name for argument in op.default._schema.arguments)


def test_every_boundary_lists_the_call_object_arguments():
    """One definition of the flat argument list: the op schemas, Triton's argument builder and the call agree."""
    assert _schema_names(torch.ops.es_kernels.fused_select) == OP_ARGUMENTS
    assert tuple(inspect.signature(launch.fused_select_arguments).parameters) == OP_ARGUMENTS
    fields = [field.name for field in dataclasses.fields(SelectCall)]
    assert [name for name in fields if name in OP_ARGUMENTS] == [name for name in OP_ARGUMENTS if name != "seed"]
    call = SelectCall(*(torch.zeros(1) for _ in range(3)), k=1, beta1=0.2, beta2=0.9, losses=torch.zeros(1))
    seed = torch.zeros(1, dtype=torch.int64)
    assert dict(zip(OP_ARGUMENTS, call.op_arguments(seed), strict=True))["losses"] is call.losses
    if extension_unavailable_reason() is None:
        extension._require()
        names = _schema_names(torch.ops.es_kernels_C.fused_select)
        assert names == (*OP_ARGUMENTS, "check_inputs", "check_losses")
        assert _schema_names(torch.ops.es_kernels_C.prune_select) == _schema_names(torch.ops.es_kernels.prune_select)


def _extension_arguments(kind: str, generator: torch.Generator) -> tuple:
    return (*_op_arguments(kind, generator), False, False)


@needs_extension
@pytest.mark.parametrize("kind", ["losses", "labels", "mixup", "soft"])
def test_opcheck_extension_fused_select(kind):
    extension._require()
    arguments = _extension_arguments(kind, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.es_kernels_C.fused_select.default, arguments)


@needs_extension
def test_opcheck_extension_prune_select():
    extension._require()
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(50, generator=generator)
    torch.library.opcheck(torch.ops.es_kernels_C.prune_select.default, (values, draw_seed(generator, CPU), 20))


@needs_extension
def test_extension_op_matches_reference_and_bumps_version_counters():
    extension._require()
    arguments = _extension_arguments("labels", torch.Generator().manual_seed(2))
    score, weight, indices = arguments[:3]
    expected_score, expected_weight = score.clone(), weight.clone()
    versions = score._version, weight._version
    positions, losses, status = torch.ops.es_kernels_C.fused_select(*arguments)
    expected_losses = reference.per_sample_cross_entropy(arguments[7], arguments[8], 0.1)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-5)
    # Bit-exact state given the losses the op computed (docs/architecture.md, "Exact semantics").
    reference.ema_update_(expected_score, expected_weight, indices, losses, 0.2, 0.9)
    assert torch.equal(score, expected_score) and torch.equal(weight, expected_weight)
    assert status.tolist() == [0, 0]
    assert score._version > versions[0] and weight._version > versions[1]
    assert positions.dtype == torch.int64 and torch.equal(positions, torch.unique(positions))


def test_triton_ops_refuse_plain_cpu_instead_of_running_something_else():
    arguments = _op_arguments("labels", torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        torch.ops.es_kernels.fused_select(*arguments)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        torch.ops.es_kernels.prune_select(torch.rand(5), draw_seed(None, CPU), 2)


def test_triton_ops_check_what_the_kernel_relies_on():
    """Direct torch.ops callers: a strided ids view or k > B is refused on the host, before any launch."""
    arguments = list(_op_arguments("labels", torch.Generator().manual_seed(0)))
    strided = list(arguments)
    strided[2] = torch.arange(12)[::2]
    with pytest.raises(ValueError, match="indices must be contiguous"):
        torch.ops.es_kernels.fused_select(*strided)
    too_many = list(arguments)
    too_many[4] = 7
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        torch.ops.es_kernels.fused_select(*too_many)
    with pytest.raises(ValueError, match="keep must be in"):
        torch.ops.es_kernels.prune_select(torch.rand(5), draw_seed(None, CPU), 6)


def _compiled(function):
    # aot_eager runs the fake implementations and functionalises the mutation without needing a C++ compiler.
    return torch.compile(function, fullgraph=True, backend="aot_eager")


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["torch", pytest.param("extension", marks=needs_extension)])
def test_evolved_select_compiles_without_graph_breaks(backend):
    """fullgraph=True raises on any graph break; results must equal the eager run from the same RNG state."""

    def step(state, ids, logits, labels):
        return evolved_select(state, ids, 2, logits=logits, targets=labels, check_values=False, backend=backend)

    generator = torch.Generator().manual_seed(3)
    ids = torch.tensor([4, 0, 11, 7, 2])
    logits = torch.randn(5, 6, generator=generator)
    labels = torch.randint(0, 6, (5,), generator=generator)
    eager_state, compiled_state = EvolvedState(12), EvolvedState(12)
    torch.manual_seed(0)
    eager = step(eager_state, ids, logits, labels)
    torch.manual_seed(0)
    compiled = _compiled(step)(compiled_state, ids, logits, labels)
    assert torch.equal(eager, compiled)
    assert torch.equal(eager_state.score, compiled_state.score)
    assert torch.equal(eager_state.weight, compiled_state.weight)


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["torch", pytest.param("extension", marks=needs_extension)])
def test_evolved_prune_compiles_without_graph_breaks(backend):
    state = EvolvedState(30)
    state.weight.copy_(torch.rand(30, generator=torch.Generator().manual_seed(4)))

    def prune(state):
        return evolved_prune(state, 10, backend=backend)

    torch.manual_seed(1)
    eager = prune(state)
    torch.manual_seed(1)
    assert torch.equal(_compiled(prune)(state), eager)


@pytest.mark.compile
def test_auto_backend_compiles_without_graph_breaks_where_the_extension_is_built():
    """auto picks the same backend compiled as eagerly (the extension on CPU where it is built): every one traces."""

    def step(state, ids, losses):
        return evolved_select(state, ids, 2, losses=losses, check_values=False)

    state = EvolvedState(8)
    torch.manual_seed(0)
    chosen = _compiled(step)(state, torch.tensor([1, 3, 5]), torch.tensor([0.5, 2.0, 1.0]))
    assert chosen.numel() == 2
    assert state.weight[1].item() == pytest.approx(0.2 / 8 + 0.8 * 0.5)
    assert last_backend() == ("extension" if extension_unavailable_reason() is None else "torch")
