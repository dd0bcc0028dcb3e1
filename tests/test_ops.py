"""The es_kernels:: custom ops: opcheck, torch.compile(fullgraph=True) without graph breaks, version counters.

Runs on CPU without Triton's interpreter, where the ops' CPU kernel is the seeded reference; the interpreted Triton
kernel behind the same ops is compiled and checked in test_triton.py. Module-level imports stay free of
``torch._dynamo`` (which imports triton) so that test_triton.py can still choose the interpreter when collected in
the same session.
"""

from __future__ import annotations

import pytest
import torch

from es_kernels import EvolvedState, evolved_prune, evolved_select, ops, reference
from es_kernels.triton import draw_seed

CPU = torch.device("cpu")


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


@pytest.mark.parametrize("kind", ["losses", "labels", "mixup", "soft"])
def test_opcheck_fused_select(kind):
    arguments = _op_arguments(kind, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.es_kernels.fused_select.default, arguments)


def test_opcheck_prune_select():
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(50, generator=generator)
    torch.library.opcheck(torch.ops.es_kernels.prune_select.default, (values, draw_seed(generator, CPU), 20))


def test_op_matches_reference_and_bumps_version_counters():
    arguments = _op_arguments("labels", torch.Generator().manual_seed(2))
    score, weight, indices = arguments[:3]
    expected_score, expected_weight = score.clone(), weight.clone()
    versions = score._version, weight._version
    positions, losses = ops.fused_select(*arguments)
    expected_losses = reference.per_sample_cross_entropy(arguments[7], arguments[8], 0.1)
    reference.ema_update_(expected_score, expected_weight, indices, expected_losses, 0.2, 0.9)
    assert torch.equal(losses, expected_losses)
    assert torch.equal(score, expected_score) and torch.equal(weight, expected_weight)
    assert score._version > versions[0] and weight._version > versions[1]
    assert positions.dtype == torch.int64 and torch.equal(positions, torch.unique(positions))


def _compiled(function):
    # aot_eager runs the fake implementations and functionalises the mutation without needing a C++ compiler.
    return torch.compile(function, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("backend", ["torch", "triton_op"])
def test_evolved_select_compiles_without_graph_breaks(backend):
    """fullgraph=True raises on any graph break; results must equal the eager run from the same RNG state."""

    def step(state, ids, logits, labels):
        if backend == "torch":
            return evolved_select(state, ids, 2, logits=logits, targets=labels, check_values=False, backend="torch")
        # The op the Triton backend calls, here through its CPU (reference) kernel.
        seed = draw_seed(None, ids.device)
        return ops.fused_select(
            state.score, state.weight, ids, seed, 2, state.beta1, state.beta2, logits, labels, None, None, 1.0,
            None, 0.0,
        )[0]  # fmt: skip

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


def test_evolved_prune_compiles_without_graph_breaks():
    state = EvolvedState(30)
    state.weight.copy_(torch.rand(30, generator=torch.Generator().manual_seed(4)))

    def prune(state):
        return evolved_prune(state, 10, backend="torch")

    torch.manual_seed(1)
    eager = prune(state)
    torch.manual_seed(1)
    assert torch.equal(_compiled(prune)(state), eager)


def test_auto_backend_compiles_without_graph_breaks_where_the_extension_is_built():
    """Eagerly, auto runs the extension on CPU; while compiling it must pick a traceable backend instead."""

    def step(state, ids, losses):
        return evolved_select(state, ids, 2, losses=losses, check_values=False)

    state = EvolvedState(8)
    torch.manual_seed(0)
    chosen = _compiled(step)(state, torch.tensor([1, 3, 5]), torch.tensor([0.5, 2.0, 1.0]))
    assert chosen.numel() == 2
    assert state.weight[1].item() == pytest.approx(0.2 / 8 + 0.8 * 0.5)
