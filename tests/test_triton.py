"""The Triton kernels themselves under Triton's interpreter, on CPU tensors: what the per-property files
(test_losses, test_exact_update, test_sampling_law, test_bad_input, test_determinism, run once per backend) do not
reach: block sizes, masked column blocks, the draw as the k largest packed race keys, one launch per call, the
custom ops under torch.compile and opcheck.

tests/conftest.py imports triton in interpreter mode for the session. The interpreter runs programs one after
another in numpy at roughly 0.1 s per launch plus 40 ms per meta-batch row, so shapes are small and the selection
law is shown in two exact steps instead of 20,000 fused launches: every fused draw equals the k largest packed race
keys (checked for many seeds), and the race keys over many independent positions follow the successive-sampling law
(one launch gives thousands of draws).
"""

from __future__ import annotations

import pytest
import torch
from test_exact_update import seeded_state
from test_losses import make_targets

import es_kernels.triton.ops  # noqa: F401  (registers the es_kernels:: ops)
from es_kernels import (
    EvolvedState,
    backend_status,
    evolved_prune,
    evolved_select,
    reference,
)
from es_kernels.testing import CHI_SQUARE_ALPHA, LOSS_TOLERANCES, subset_chi_square_pvalue
from es_kernels.triton import draw_seed, launch

pytestmark = pytest.mark.usefixtures("triton_interpreter")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------- helpers


def clone_generator(generator):
    return torch.Generator().set_state(generator.get_state())


def expected_draw(weights, seed, k):
    """Positions of the k largest race keys (ties to the lower position): the draw the fused kernel must make.

    The pruning kernel computes the same keys (one Philox stream per position), so this shares no selection code
    with the fused kernel.
    """
    keys = launch.prune_keys(weights.contiguous(), seed)
    order = torch.sort(keys, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def select_and_expect(state, ids, k, generator_seed, **kwargs):
    """(fused draw, expected draw from the updated weights with the same seed, losses)."""
    generator = torch.Generator().manual_seed(generator_seed)
    seed = draw_seed(clone_generator(generator), CPU)
    positions, losses = evolved_select(
        state, ids, k, generator=generator, backend="triton", return_losses=True, **kwargs
    )
    return positions, expected_draw(state.weight[ids], seed, k), losses


# ----------------------------------------------------------------------------------------- losses


def test_rows_starting_with_a_block_of_minus_inf(monkeypatch):
    # Masked vocabularies put -inf in whole column blocks; the running max must not rescale by exp(-inf + inf).
    monkeypatch.setattr(launch, "BLOCK_C_BY_ITEMSIZE", {8: 16, 4: 16, 2: 16})
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    logits[0, :20] = float("-inf")
    logits[2, 16:40] = float("-inf")
    labels = torch.tensor([30, 2, 45])
    _, losses = evolved_select(
        EvolvedState(4), torch.arange(3), 1, logits=logits, targets=labels, backend="triton", return_losses=True,
        check_values=False,
    )  # fmt: skip
    expected = reference.per_sample_cross_entropy(logits.double(), labels).float()
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(losses, expected, **LOSS_TOLERANCES[torch.float32])


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_large_common_offset_does_not_cancel_the_sums(monkeypatch, kind):
    # Soft targets and smoothing need sum(t * x) and sum(x); kept relative to the running max, an offset of 1e4
    # (fp32 ulp 1e-3) shared by a row's logits cannot cancel them against the max.
    monkeypatch.setattr(launch, "BLOCK_C_BY_ITEMSIZE", {8: 16, 4: 16, 2: 16})
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 70, generator=generator) * 3 + torch.tensor([[0.0], [1e3], [1e4], [-1e4]])
    targets = make_targets(kind, 4, 70, generator)
    _, losses = evolved_select(
        EvolvedState(4), torch.arange(4), 1, logits=logits, targets=targets, label_smoothing=0.1, backend="triton",
        return_losses=True,
    )  # fmt: skip
    # The same fp32 logits, evaluated in fp64: what is left is the kernel's own fp32 rounding.
    double_targets = targets.double() if kind == "soft" else targets
    expected = reference.per_sample_cross_entropy(logits.double(), double_targets, 0.1).float()
    torch.testing.assert_close(losses, expected, rtol=2e-6, atol=0.0)


# ----------------------------------------------------------------------------------------- the draw


@pytest.mark.parametrize("batch,k", [(1, 1), (3, 2), (6, 3), (40, 10)])
def test_draw_is_the_k_largest_race_keys(batch, k):
    ids = torch.randperm(64, generator=torch.Generator().manual_seed(batch))[:batch]
    for generator_seed in range(4):
        state = seeded_state(64, seed=generator_seed)
        losses = torch.rand(batch, generator=torch.Generator().manual_seed(100 + generator_seed))
        positions, expected, _ = select_and_expect(state, ids, k, generator_seed, losses=losses)
        assert positions.dtype == torch.int64
        assert positions.tolist() == expected.tolist()


def test_draw_does_not_depend_on_block_sizes(monkeypatch):
    # 90 rows in blocks of 16 make the radix select loop over 6 blocks, the last one partial; zero weights (score
    # and loss 0) tie across blocks and 80 of 90 places reach into them.
    ids = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:90]
    losses = torch.rand(90, generator=torch.Generator().manual_seed(1))
    losses[::3] = 0.0

    def state():
        fresh = seeded_state(300)
        fresh.score[ids[::3]] = 0.0
        return fresh

    baseline, expected, _ = select_and_expect(state(), ids, 80, 5, losses=losses)
    monkeypatch.setattr(launch, "BLOCK_B", 16)
    monkeypatch.setattr(launch, "PRUNE_BLOCK", 64)
    small, expected_small, _ = select_and_expect(state(), ids, 80, 5, losses=losses)
    assert baseline.tolist() == expected.tolist() == small.tolist() == expected_small.tolist()
    zero_positions = set(range(0, 90, 3))
    assert len(zero_positions & set(baseline.tolist())) == 20  # 60 positive, then the 20 lowest zero positions
    assert sorted(zero_positions & set(baseline.tolist())) == sorted(zero_positions)[:20]


@pytest.mark.parametrize(
    "weights,k",
    [([0.1, 0.5, 1.0, 2.0, 0.3, 4.0], 3), ([0.0, 1.0, 0.0, 2.0, 0.0, 0.5], 2)],
)
def test_race_keys_follow_the_successive_sampling_law(weights, k):
    """20,000 draws of k of the 6 weights, as the lead's reference test; each group of 6 positions is one draw."""
    draws = 20_000
    values = torch.tensor(weights).repeat(draws)
    seed = draw_seed(torch.Generator().manual_seed(9), CPU)
    keys = launch.prune_keys(values, seed).view(draws, len(weights))
    chosen = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
    rows = iter(chosen)
    assert subset_chi_square_pvalue(lambda: next(rows), weights, k, draws=draws) > CHI_SQUARE_ALPHA


def test_bad_values_with_checks_off_are_never_preferred_and_never_written_out_of_bounds():
    state = EvolvedState(8, 0.0, 0.0)
    before = state.score.clone()
    # NaN, negative and inf-free positives; ids out of range on both sides.
    ids = torch.tensor([0, 1, 2, 3, -1, 8, 1_000_000])
    losses = torch.tensor([float("nan"), -5.0, 0.5, 0.25, 2.0, 3.0, 4.0])
    for seed in range(5):
        chosen = evolved_select(
            state, ids, 2, losses=losses, generator=torch.Generator().manual_seed(seed), backend="triton",
            check_values=False,
        )  # fmt: skip
        assert chosen.tolist() == [2, 3]
    # Only the in-range ids were written; the rest of the buffer (and memory around it) is untouched.
    assert torch.equal(state.score[4:], before[4:])
    assert state.score[2].item() == 0.5 and state.score[3].item() == 0.25
    labels = torch.tensor([0, 5, -3])  # out-of-range labels with checks off: NaN losses, in-range reads only
    _, returned = evolved_select(
        EvolvedState(3), torch.arange(3), 1, logits=torch.randn(3, 4), targets=labels, backend="triton",
        check_values=False, return_losses=True,
    )  # fmt: skip
    assert torch.isfinite(returned[0]) and torch.isnan(returned[1:]).all()


# ----------------------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("batch,classes", [(1, 2), (3, 2), (257, 2), (3, 1000), (1, 32769), (3, 32769)])
def test_odd_shapes(batch, classes):
    generator = torch.Generator().manual_seed(batch + classes)
    logits = torch.randn(batch, classes, generator=generator) * 3
    labels = torch.randint(0, classes, (batch,), generator=generator)
    ids = torch.randperm(300, generator=generator)[:batch]
    k = max(1, batch // 4)
    state = seeded_state(300)
    positions, expected, losses = select_and_expect(state, ids, k, 8, logits=logits, targets=labels)
    expected_losses = reference.per_sample_cross_entropy(logits, labels)
    torch.testing.assert_close(losses, expected_losses, **LOSS_TOLERANCES[torch.float32])
    assert positions.tolist() == expected.tolist()
    oracle = seeded_state(300)
    reference.ema_update_(oracle.score, oracle.weight, ids, losses, state.beta1, state.beta2)
    assert torch.equal(state.weight, oracle.weight) and torch.equal(state.score, oracle.score)


@pytest.mark.parametrize("layout", ["transposed", "column_slice", "every_other_column"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_non_contiguous_logits(layout, kind):
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(40, 40, generator=generator).to(torch.bfloat16)
    logits = {
        "transposed": base.t()[:5, :33],
        "column_slice": base[3:8, 2:35],
        "every_other_column": base[:5, ::2][:, :20],
    }[layout]
    assert not logits.is_contiguous()
    targets = make_targets(kind, 5, logits.shape[1], generator)
    if kind == "soft":
        targets = targets.t().contiguous().t()  # strided soft targets too
    _, losses = evolved_select(
        EvolvedState(10), torch.arange(5), 2, logits=logits, targets=targets, backend="triton", return_losses=True
    )
    expected = reference.per_sample_cross_entropy(logits.contiguous(), targets)
    torch.testing.assert_close(losses, expected, **LOSS_TOLERANCES[torch.bfloat16])


# ----------------------------------------------------------------------------------------- launches, pruning


def test_one_launch_per_call(monkeypatch):
    # Counted on the class every interpreted kernel launches through, so a kernel added later is counted too.
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    state = EvolvedState(20)
    logits = torch.randn(4, 7)
    calls = [
        dict(losses=torch.rand(4)),
        dict(logits=logits, targets=torch.tensor([0, 6, 2, 3]), label_smoothing=0.1),
        dict(logits=logits, targets=torch.rand(4, 7)),
        dict(logits=logits, targets=(torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]), 0.4)),
        dict(logits=logits.t().contiguous().t(), targets=torch.tensor([0, 6, 2, 3])),  # the any-layout kernel
    ]
    for call in calls:
        launches.clear()
        evolved_select(state, torch.tensor([1, 5, 9, 13]), 2, backend="triton", **call)
        assert launches == ["fused_select_kernel"]
    launches.clear()
    evolved_prune(state, 7, backend="triton")
    assert launches == ["prune_keys_kernel"]


def test_backend_status_in_interpreter_mode():
    assert backend_status("cpu")["triton"] == "available"


def test_cpu_is_refused_without_the_interpreter(monkeypatch):
    from es_kernels.triton import unavailable_reason

    monkeypatch.delenv("TRITON_INTERPRET")
    reason = unavailable_reason("cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason


@pytest.mark.compile
def test_compiles_without_graph_breaks_through_the_triton_op():
    def step(state, ids, logits, labels):
        return evolved_select(state, ids, 2, logits=logits, targets=labels, check_values=False, backend="triton")

    generator = torch.Generator().manual_seed(7)
    ids, logits = torch.tensor([3, 0, 5, 1]), torch.randn(4, 6, generator=generator)
    labels = torch.randint(0, 6, (4,), generator=generator)
    eager_state, compiled_state = EvolvedState(8), EvolvedState(8)
    torch.manual_seed(0)
    eager = step(eager_state, ids, logits, labels)
    torch.manual_seed(0)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_state, ids, logits, labels)
    assert torch.equal(eager, compiled)
    assert torch.equal(eager_state.weight, compiled_state.weight)


def test_opcheck_with_the_interpreted_kernel():
    generator = torch.Generator().manual_seed(8)
    score = torch.rand(10, generator=generator)
    arguments = (
        score, score.clone(), torch.tensor([2, 7, 4]), draw_seed(generator, CPU), 2, 0.2, 0.9,
        torch.randn(3, 5, generator=generator), torch.tensor([0, 4, 1]), None, None, 1.0, None, 0.1,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.es_kernels.fused_select.default, arguments)
    values = torch.rand(40, generator=generator)
    torch.library.opcheck(torch.ops.es_kernels.prune_select.default, (values, draw_seed(generator, CPU), 9))
