"""Triton device functions under the interpreter: the final radix selection against a stable sort (up to
B = 65,536), subnormal weights, and the row loss / pruning keys on both sides of the unmasked-block split.

Interpreter set-up as in tests/test_triton.py: triton is imported with ``TRITON_INTERPRET=1`` before anything else
can, or the module reruns itself in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys

_previous = os.environ.get("TRITON_INTERPRET")
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton  # noqa: F401  (fixes interpreter mode for this process)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from es_kernels import EvolvedState, evolved_select, reference  # noqa: E402
from es_kernels.triton import _interpreter_active, kernels, launch  # noqa: E402
from es_kernels.triton.kernels import tl  # noqa: E402

if _previous is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _previous

IN_PROCESS = _interpreter_active()
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton is compiled-mode here; test_in_subprocess runs these")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(IN_PROCESS, reason="the tests run in this process")
def test_in_subprocess(request):
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    markers = request.config.getoption("markexpr") or ""
    command = [sys.executable, "-m", "pytest", __file__, "-x", "-q", "-p", "no:cacheprovider", "-m", markers]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@kernels._jit
def top_k_kernel(keys_ptr, batch, k, positions_ptr, BLOCK_B: tl.constexpr):
    kernels.select_top_k(keys_ptr, batch, k, positions_ptr, BLOCK_B)


def top_k_positions(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Run select_top_k alone (one program) on fp32 race keys packed as the fused kernel packs them."""
    bits = keys.view(torch.int32).to(torch.int64)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    positions = torch.arange(len(keys), dtype=torch.int64)
    packed = (monotone << 32) | (4294967295 - positions)
    out = torch.full((k,), -1, dtype=torch.int64)
    top_k_kernel[(1,)](packed, len(keys), k, out, BLOCK_B=launch.BLOCK_B)
    return out


def stable_top_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.sort(keys, descending=True, stable=True).indices[:k]).values


def race_like_keys(batch: int, seed: int) -> torch.Tensor:
    """fp32 keys as the race makes them (log w - log E: shared sign/exponent bits), with exact ties and -inf."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(batch, generator=generator) + 0.05
    weights[torch.rand(batch, generator=generator) < 0.1] = 0.0
    keys = reference.sampling.race_keys(weights, generator, torch.float32)
    duplicated = torch.randint(0, batch, (batch // 10,), generator=generator)
    keys[duplicated] = keys[duplicated.flip(0)]  # exact ties among finite keys
    return keys


@in_process
@pytest.mark.parametrize(("batch", "k"), [(1, 1), (5, 5), (1000, 1), (1000, 333), (3000, 2999), (3000, 1500)])
def test_radix_selection_equals_a_stable_sort(batch, k):
    keys = race_like_keys(batch, seed=batch + k)
    assert torch.equal(top_k_positions(keys, k), stable_top_k(keys, k))


@in_process
def test_radix_selection_of_all_equal_keys_takes_the_lowest_positions():
    assert top_k_positions(torch.full((2500,), -1.5), 7).tolist() == list(range(7))
    assert top_k_positions(torch.full((2500,), float("-inf")), 3).tolist() == [0, 1, 2]


@in_process
@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 16384, 65535])
def test_radix_selection_at_the_largest_meta_batch(k):
    keys = race_like_keys(65536, seed=k)
    assert torch.equal(top_k_positions(keys, k), stable_top_k(keys, k))


@in_process
def test_subnormal_weights_get_key_minus_infinity():
    values = torch.tensor([1e-40, 2.0**-126, 0.0, 1.0, 2.0**-149])
    keys = launch.prune_keys(values, torch.tensor([5], dtype=torch.int64))
    assert torch.isneginf(keys).tolist() == [True, False, True, False, True]


@in_process
def test_fused_select_treats_a_subnormal_weight_as_zero():
    state = EvolvedState(3, beta1=0.5, beta2=0.5)
    state.score.zero_()
    losses = torch.tensor([0.0, 2e-40, 2.0**-124])  # weights 0, 1e-40 (subnormal), 2**-125
    chosen = evolved_select(state, torch.arange(3), 2, losses=losses, backend="triton")
    assert chosen.tolist() == [0, 2]


@in_process
@pytest.mark.parametrize("classes", [launch.BLOCK_C, 2 * launch.BLOCK_C + 5, 7])
def test_row_loss_on_both_sides_of_the_unmasked_blocks(classes):
    generator = torch.Generator().manual_seed(classes)
    logits = 100.0 + 3 * torch.randn(3, classes, generator=generator)
    soft = torch.softmax(torch.randn(3, classes, generator=generator), 1)
    for targets in (torch.randint(0, classes, (3,), generator=generator), soft):
        _, losses = evolved_select(EvolvedState(3), torch.arange(3), 1, logits=logits, targets=targets,
                                   label_smoothing=0.1, backend="triton", return_losses=True)  # fmt: skip
        x = logits.double()
        t = targets.double() if targets.is_floating_point() else torch.nn.functional.one_hot(targets, classes).double()
        lse = torch.logsumexp(x, 1)
        expected = 0.9 * (t * (lse[:, None] - x)).sum(1) + 0.1 * (lse - x.mean(1))
        np.testing.assert_allclose(losses.double(), expected, rtol=2e-6)


@in_process
@pytest.mark.parametrize("n", [launch.PRUNE_BLOCK, 2 * launch.PRUNE_BLOCK + 3])
def test_prune_keys_on_both_sides_of_the_unmasked_blocks(n):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n)) + 0.01
    seed = torch.tensor([11], dtype=torch.int64)
    keys = launch.prune_keys(values, seed)
    # Keys depend on (seed, i) only: the tail's keys equal those of the same positions in a longer launch.
    longer = launch.prune_keys(torch.cat([values, torch.ones(launch.PRUNE_BLOCK)]), seed)
    assert torch.equal(keys, longer[:n]) and torch.isfinite(keys).all()
