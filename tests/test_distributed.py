"""Distributed sync of the ES state: 2 gloo processes on CPU against a single-process run of the same batches.

One 2-process job runs every distributed scenario, launched by multiprocess_harness.py (forked workers, a file
store, deadlines, so a broken collective fails the tests instead of hanging them). Losses come from a fixed
per-(epoch, id) table, so the state is a pure function of which ids were visited with which losses; the
single-process reference is then exact, not merely close.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from multiprocess_harness import WORLD_SIZE, launch

from es_kernels import EvolvedSampler, EvolvedState, EvolvedTraining
from es_kernels.distributed import communication_device
from es_kernels.reference.update import ema_update_

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

N, EPOCHS, BATCH, SEED = 101, 6, 6, 5  # n odd: full epochs pad one id; 81 kept ids in pruned epochs pad too
PADDING_ONLY_BATCH = 5  # shards of 51 and 41 ids: rank 1's last batch is its padding row alone in every epoch
PLAN = dict(prune_ratio=0.2, anneal_start=0.2, anneal_end=0.2, seed=SEED)  # epochs 0 and 5 anneal, 1-4 prune
BIG_N = 2**24 + 1000  # ids above 2**24 are not representable in fp32


# ----------------------------------------------------------------------------------------- the training runs


def _loss_table() -> torch.Tensor:
    return torch.rand(EPOCHS, N, generator=torch.Generator().manual_seed(11)) * 3.0


def _clone_state(state: EvolvedState) -> torch.Tensor:
    return torch.stack([state.score, state.weight]).clone()


def _run(training: EvolvedTraining, batch_size: int, epochs: range, *, stop_at: tuple[int, int] | None = None):
    """The plain loop of the helper's docstring, with table losses; records plans and states.

    The "model" is the identity over inputs that already hold each sample's loss for the epoch, so scoring
    (``select``) and training (``observe``) losses are both the table's. ``stop_at=(epoch, step)`` returns after
    that step, as a preempted job would.
    """
    table = _loss_table()
    model = torch.nn.Identity()
    record = {"start_states": [], "plans": [], "shards": [], "padding": [], "step_states": []}
    for epoch in epochs:
        training.set_epoch(epoch)
        record["start_states"].append(_clone_state(training.state))
        # The whole plan as this rank's state sees it: what it would shard if it were alone.
        alone = EvolvedSampler(training.state, EPOCHS, num_replicas=1, rank=0, **PLAN)
        alone.set_epoch(epoch)
        record["plans"].append(torch.tensor(list(alone)))
        start = training.sampler.position
        shard = list(training.sampler)
        record["shards"].append(torch.tensor(shard))
        record["padding"].append(
            torch.tensor([training.sampler.is_padding(p) for p in range(start, start + len(shard))])
        )
        for step, first in enumerate(range(0, len(shard), batch_size)):
            ids = torch.tensor(shard[first : first + batch_size])
            losses = table[epoch, ids]
            batch = training.select(model, ids, losses, ids, loss_fn=lambda outputs, targets: outputs)
            if not batch.scored:
                training.observe(batch, batch.inputs)
            record["step_states"].append(_clone_state(training.state))
            if stop_at == (epoch, step):
                return record
    return record


def _training(sync: str, **layout) -> EvolvedTraining:
    return EvolvedTraining("eswp", N, EPOCHS, backend="torch", sync=sync, **PLAN, **layout)


def _training_job(rank: int) -> dict:
    results = {}
    for sync in ("epoch", "step", "off"):
        training = _training(sync)
        results[sync] = _run(training, BATCH, range(EPOCHS))
        training.state.sync_epoch()  # the last epoch's merge (the next set_epoch would do it)
        results[sync]["final"] = _clone_state(training.state)

    # Preempted mid-epoch 2: each rank saves its own state_dict, a fresh process-like object resumes from it.
    training = _training("epoch")
    _run(training, BATCH, range(3), stop_at=(2, 3))
    saved = training.state_dict()
    results["saved_keys"] = {"mid_epoch": sorted(saved["state"])}
    resumed = _training("epoch")
    resumed.load_state_dict(saved)
    results["resumed"] = _run(resumed, BATCH, range(2, EPOCHS))
    resumed.state.sync_epoch()
    results["resumed"]["final"] = _clone_state(resumed.state)
    results["saved_keys"]["merged"] = sorted(resumed.state.state_dict())

    training = _training("epoch")
    results["logits"] = _run_logits(training, BATCH)

    # A data-parallel group smaller than the world (as beside tensor parallelism): here each rank alone. The
    # sampler must shard over the group's ranks, not the world's, or the merge would miss half the data.
    own_group = [dist.new_group([member]) for member in range(WORLD_SIZE)][rank]
    training = _training("epoch", process_group=own_group)
    results["own_group"] = _run(training, BATCH, range(EPOCHS))
    training.state.sync_epoch()
    results["own_group"]["final"] = _clone_state(training.state)
    results["own_group"]["layout"] = (training.sampler.num_replicas, training.sampler.rank)

    for sync in ("epoch", "step"):
        training = _training(sync)
        results[f"padding_only_{sync}"] = _run(training, PADDING_ONLY_BATCH, range(EPOCHS))
        training.state.sync_epoch()
        results[f"padding_only_{sync}"]["final"] = _clone_state(training.state)
    return results


def _run_logits(training: EvolvedTraining, batch_size: int) -> dict:
    """The default path: cross-entropy from a (fixed) model's logits, selection on them, observe in annealing."""
    generator = torch.Generator().manual_seed(3)
    features, labels = torch.randn(N, 4, generator=generator), torch.randint(0, 3, (N,), generator=generator)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=generator))
        model.bias.zero_()
    for epoch in range(EPOCHS):
        training.set_epoch(epoch)
        shard = list(training.sampler)
        for first in range(0, len(shard), batch_size):
            ids = torch.tensor(shard[first : first + batch_size])
            batch = training.select(model, ids, features[ids], labels[ids])
            with torch.no_grad():
                losses = torch.nn.functional.cross_entropy(model(batch.inputs), batch.targets, reduction="none")
            training.observe(batch, losses)
    training.state.sync_epoch()
    return {"final": _clone_state(training.state)}


def _single_process_reference() -> dict:
    """One process over the same global batches: rank 0's and rank 1's step-t batches are one batch of 2B ids."""
    training = _training("epoch", num_replicas=1, rank=0)
    record = _run(training, WORLD_SIZE * BATCH, range(EPOCHS))
    record["final"] = _clone_state(training.state)
    record["logits"] = _run_logits(_training("epoch", num_replicas=1, rank=0), WORLD_SIZE * BATCH)
    alone = _training("epoch", num_replicas=1, rank=0)
    record["own_group"] = _run(alone, BATCH, range(EPOCHS))
    record["own_group"]["final"] = _clone_state(alone.state)
    alone = _training("epoch", num_replicas=1, rank=0)
    record["padding_only"] = _run(alone, WORLD_SIZE * PADDING_ONLY_BATCH, range(EPOCHS))
    record["padding_only"]["final"] = _clone_state(alone.state)
    return record


# A per-rank checkpoint saved mid-epoch, written out key by key as the saved format has it: the values all ranks
# agreed on at the last merge (inf: a buffer never observed), and the one sample each rank moved since then.
AGREED = {"score": [0.25, 0.5, 0.125, 1.0], "weight": [0.25, 0.75, 0.5, 2.0], "latest": [math.inf, 1.0, 2.0, math.inf]}
MOVED = {0: (0, {"score": 0.375, "weight": 0.3, "latest": 0.5}), 1: (3, {"score": 0.625, "weight": 0.9, "latest": 3.0})}


def _saved_mid_epoch(rank: int) -> dict:
    position, moved = MOVED[rank]
    values = {name: torch.tensor(agreed) for name, agreed in AGREED.items()}
    for name, value in moved.items():
        values[name][position] = value
    visited = torch.zeros(4, dtype=torch.bool)
    visited[position] = True
    return {
        "score": values["score"],
        "weight": values["weight"],
        "beta1": 0.2,
        "beta2": 0.9,
        "scored": visited.clone(),
        "visit_epoch": 1,
        "visited": visited,
        "sync_snapshot": torch.tensor([AGREED["score"], AGREED["weight"]]),
        "sample_buffers": {"latest": values["latest"]},
        "sample_buffers_snapshot": torch.tensor([AGREED["latest"]]),
    }


def _checkpoint_job(rank: int) -> dict:
    state = EvolvedState(4)
    state.register_sample_buffer("latest", math.inf)
    state.load_state_dict(_saved_mid_epoch(rank))
    saved_again = state.state_dict()
    state.sync_epoch()
    return {
        "saved_again": saved_again,
        "merged": {"score": state.score, "weight": state.weight, "latest": state.sample_buffer("latest")},
        "scored": state.scored,
        "saved_after_merge": sorted(state.state_dict()),
    }


def _all_jobs(rank: int) -> dict:
    return {"training": _training_job(rank), "big_ids": _big_ids_job(rank), "checkpoint": _checkpoint_job(rank)}


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    return launch(_all_jobs, tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def training_runs(distributed_runs):
    return [rank["training"] for rank in distributed_runs], _single_process_reference()


def test_epoch_sync_state_is_bit_identical_on_ranks_and_equals_single_process(training_runs):
    ranks, single = training_runs
    for epoch in range(EPOCHS):
        rank0, rank1 = (r["epoch"]["start_states"][epoch] for r in ranks)
        assert torch.equal(rank0, rank1), f"ranks disagree at the start of epoch {epoch}"
        # Exact, not only close: every merged value is the one the visiting rank computed from the same baseline.
        assert torch.equal(rank0, single["start_states"][epoch]), f"epoch {epoch} start differs from one process"
    assert torch.equal(ranks[0]["epoch"]["final"], ranks[1]["epoch"]["final"])
    assert torch.equal(ranks[0]["epoch"]["final"], single["final"])
    # The run moved the state away from uniform everywhere (every id is visited in the annealing epochs).
    assert bool((single["final"] != 1.0 / N).all())


def test_pruned_plans_are_identical_on_ranks_and_shards_cover_them_exactly(training_runs):
    ranks, single = training_runs
    for sync in ("epoch", "step"):
        for epoch in range(EPOCHS):
            plan = single["plans"][epoch]
            assert torch.equal(ranks[0][sync]["plans"][epoch], plan)
            assert torch.equal(ranks[1][sync]["plans"][epoch], plan)
            expected_size = N if epoch in (0, EPOCHS - 1) else round(0.8 * N)
            assert plan.numel() == expected_size and plan.unique().numel() == expected_size
            shards = [r[sync]["shards"][epoch] for r in ranks]
            padding = [r[sync]["padding"][epoch] for r in ranks]
            assert shards[0].numel() == shards[1].numel()  # equal lengths: no rank waits for another
            real = [shard[~pad] for shard, pad in zip(shards, padding, strict=True)]
            # Interleaving the real ids of the shards restores the plan: nothing lost, nothing doubled.
            interleaved = torch.stack([real[0][: real[1].numel()], real[1]], dim=1).flatten()
            interleaved = torch.cat([interleaved, real[0][real[1].numel() :]])
            assert torch.equal(interleaved, plan)
            padded = torch.cat([shard[pad] for shard, pad in zip(shards, padding, strict=True)])
            assert padded.numel() == WORLD_SIZE * shards[0].numel() - plan.numel()
            assert torch.equal(padded, plan[: padded.numel()])  # padding only repeats the plan's first ids


def test_padding_rows_never_update_the_state_twice(training_runs):
    ranks, _ = training_runs
    # Epoch 0 of rank 1 ends with a padding copy of plan[0], which rank 0 visits at its step 0. Losses come from a
    # fixed (epoch, id) table, so a second update would write the same values and the epoch merge could not tell;
    # the padded id is therefore checked directly: rank 1's copy of it never changes during the epoch.
    record = ranks[1]["epoch"]
    assert bool(record["padding"][0][-1])
    padded_id = int(record["shards"][0][-1])
    start = record["start_states"][0][:, padded_id]
    steps = len(range(0, record["shards"][0].numel(), BATCH))
    for state in record["step_states"][:steps]:
        assert torch.equal(state[:, padded_id], start)


def test_step_sync_state_is_bit_identical_after_every_step(training_runs):
    ranks, single = training_runs
    steps0, steps1 = (r["step"]["step_states"] for r in ranks)
    assert len(steps0) == len(steps1) == len(single["step_states"])
    for step, (state0, state1, alone) in enumerate(zip(steps0, steps1, single["step_states"], strict=True)):
        assert torch.equal(state0, state1), f"ranks disagree after step {step}"
        assert torch.equal(state0, alone), f"step {step} differs from one process over the same global batch"
    assert torch.equal(ranks[0]["step"]["final"], single["final"])


def test_a_batch_of_padding_only_neither_hangs_nor_updates_the_state(training_runs):
    # Every rank must take the same number of steps (and, in step mode, join the same collectives) even when one
    # rank's last batch is nothing but its padding repeat.
    ranks, single = training_runs
    record = ranks[1]["padding_only_epoch"]
    for shard, padding in zip(record["shards"], record["padding"], strict=True):
        assert shard.numel() % PADDING_ONLY_BATCH == 1 and bool(padding[-1])  # the last batch: one padding row
    for sync in ("epoch", "step"):
        assert torch.equal(ranks[0][f"padding_only_{sync}"]["final"], single["padding_only"]["final"]), sync
        assert torch.equal(ranks[1][f"padding_only_{sync}"]["final"], single["padding_only"]["final"]), sync
    steps = [r["padding_only_step"]["step_states"] for r in ranks] + [single["padding_only"]["step_states"]]
    assert len(steps[0]) == len(steps[1]) == len(steps[2])
    for step, (state0, state1, alone) in enumerate(zip(*steps, strict=True)):
        assert torch.equal(state0, state1) and torch.equal(state0, alone), f"step {step}"


def test_logits_path_agrees_across_ranks_and_with_one_process(training_runs):
    ranks, single = training_runs
    assert torch.equal(ranks[0]["logits"]["final"], ranks[1]["logits"]["final"])
    # Losses from a matmul over a batch of 2B rows instead of B may differ in the last bit: close, not equal.
    torch.testing.assert_close(ranks[0]["logits"]["final"], single["logits"]["final"], rtol=1e-5, atol=1e-8)
    assert bool((single["logits"]["final"] != 1.0 / N).all())


def test_a_data_parallel_subgroup_shards_and_merges_over_its_own_ranks(training_runs):
    ranks, single = training_runs
    for rank in ranks:
        assert rank["own_group"]["layout"] == (1, 0)
        assert torch.equal(rank["own_group"]["final"], single["own_group"]["final"])


def test_without_sync_ranks_diverge(training_runs):
    # The control that shows the tests above can fail: with sync="off" the ranks see only their halves.
    ranks, _ = training_runs
    assert not torch.equal(ranks[0]["off"]["final"], ranks[1]["off"]["final"])
    assert any(
        not torch.equal(p0, p1) for p0, p1 in zip(ranks[0]["off"]["plans"], ranks[1]["off"]["plans"], strict=True)
    )


def test_per_rank_checkpoint_mid_epoch_resumes_exactly(training_runs):
    ranks, single = training_runs
    for rank in ranks:
        resumed = rank["resumed"]
        # The resumed epoch-2 plan is the saved one, and the merge after resuming still sees both halves.
        assert torch.equal(resumed["start_states"][1], single["start_states"][3])
        assert torch.equal(resumed["final"], single["final"])
        # The baseline travels only while it carries information: after a merge the values alone restore it.
        marks = ["visit_epoch", "visited"]  # the epoch's visit marks, saved per rank like the shard
        saved = ["beta1", "beta2", "score", "scored"]  # scored: which samples pruning may drop, per rank until merged
        assert rank["saved_keys"]["mid_epoch"] == [*saved, "sync_snapshot", *marks, "weight"]
        assert rank["saved_keys"]["merged"] == [*saved, *marks, "weight"]


# ----------------------------------------------------------------------------------------- ids above 2**24

BIG_IDS = {0: [2**24 + 1, 2**24 + 3, 2**24 + 999, 5], 1: [2**24 + 5, 2**24 + 7]}  # odd ids round in fp32


def _big_ids_job(rank: int) -> dict:
    ids = torch.tensor(BIG_IDS[rank])
    losses = torch.arange(1, ids.numel() + 1, dtype=torch.float32) + rank  # distinct, known
    results = {}
    for sync in ("step", "epoch"):
        state = EvolvedState(BIG_N, sync=sync)
        state.observe(ids, losses)
        gathered = state.sync_step(ids, losses)
        state.sync_epoch()
        changed = (state.score != 1.0 / BIG_N).nonzero().flatten()
        results[sync] = {
            "gathered_ids": gathered[0],
            "gathered_losses": gathered[1],
            "changed": changed,
            "values": torch.stack([state.score[changed], state.weight[changed]]),
        }
        del state
    return results


@pytest.fixture(scope="module")
def big_id_runs(distributed_runs):
    return [rank["big_ids"] for rank in distributed_runs]


def test_ids_above_2_pow_24_survive_sync(big_id_runs):
    assert float(torch.tensor(2**24 + 1, dtype=torch.float32)) != 2**24 + 1  # what a float all-gather would do
    everyone = sorted(BIG_IDS[0] + BIG_IDS[1])
    reference = EvolvedState(BIG_N)  # one process visiting both ranks' ids
    for rank, ids in BIG_IDS.items():
        reference.observe(torch.tensor(ids), torch.arange(1, len(ids) + 1, dtype=torch.float32) + rank)
    expected = torch.stack([reference.score[everyone], reference.weight[everyone]])
    for sync in ("step", "epoch"):
        for rank_results in big_id_runs:
            result = rank_results[sync]
            assert result["changed"].tolist() == everyone, sync
            assert torch.equal(result["values"], expected), sync
        if sync == "step":
            assert big_id_runs[0]["step"]["gathered_ids"].tolist() == BIG_IDS[0] + BIG_IDS[1]
            assert big_id_runs[0]["step"]["gathered_losses"].tolist() == [1.0, 2.0, 3.0, 4.0, 2.0, 3.0]
            assert torch.equal(big_id_runs[1]["step"]["gathered_ids"], big_id_runs[0]["step"]["gathered_ids"])


# ----------------------------------------------------------------------------------------- single process


def test_sync_is_a_no_op_without_torch_distributed():
    state = EvolvedState(10, sync="step")
    state.observe(torch.tensor([1, 4]), torch.tensor([2.0, 0.5]))
    before = _clone_state(state)
    ids, losses = state.sync_step(torch.tensor([1, 4]), torch.tensor([2.0, 0.5]))
    assert ids.tolist() == [1, 4] and losses.tolist() == [2.0, 0.5]
    state.sync_epoch()
    assert torch.equal(_clone_state(state), before)
    assert set(EvolvedState(10).state_dict()) == {"score", "weight", "beta1", "beta2", "scored"}  # no merge base


def test_sync_step_accepts_an_empty_step():
    ids, losses = EvolvedState(10, sync="step").sync_step(torch.empty(0, dtype=torch.int64), torch.empty(0))
    assert ids.numel() == 0 and losses.numel() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"sync": "epochs"}, ValueError, "sync"),
        ({"sync": None}, ValueError, "sync"),
        ({"process_group": "world"}, TypeError, "process_group"),
    ],
)
def test_bad_sync_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        EvolvedState(10, **kwargs)
    with pytest.raises(error, match=name):
        EvolvedTraining("es", 10, 3, **kwargs)


@pytest.mark.parametrize(
    ("ids", "losses", "error", "name"),
    [
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), TypeError, "indices"),
        (torch.tensor([[1, 2]]), torch.tensor([1.0, 1.0]), ValueError, "indices"),
        (torch.tensor([1, 10]), torch.tensor([1.0, 1.0]), ValueError, "indices"),
        (torch.tensor([1, 2]), torch.tensor([1.0]), ValueError, "losses"),
        (torch.tensor([1, 2]), torch.tensor([1, 2]), TypeError, "losses"),
        (torch.tensor([1, 2]), torch.tensor([1.0, float("nan")]), ValueError, "losses"),
    ],
)
def test_bad_sync_step_input_raises_and_leaves_state(ids, losses, error, name):
    state = EvolvedState(10, sync="step")
    before = _clone_state(state)
    with pytest.raises(error, match=name):
        state.sync_step(ids, losses)
    assert torch.equal(_clone_state(state), before)


def test_bad_sync_snapshot_is_refused_before_loading():
    state = EvolvedState(4)
    before = _clone_state(state)
    saved = EvolvedState(4).state_dict()
    saved["score"] = torch.ones(4)
    saved["sync_snapshot"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="sync_snapshot"):
        state.load_state_dict(saved)
    assert torch.equal(_clone_state(state), before)


def test_backend_updates_match_the_rule_sync_step_replays(backend):
    # sync_step applies other ranks' updates with the reference rule while each rank's own update ran on its
    # backend: ranks stay bit-identical only if every backend rounds the update exactly like the reference.
    if backend.name == "torch":
        pytest.skip("the replayed rule is the torch backend's own update")
    generator = torch.Generator().manual_seed(0)
    for betas in [(0.2, 0.9), (0.2, 0.8), (0.37, 0.61)]:
        on_backend, replayed = EvolvedState(200, *betas), EvolvedState(200, *betas)
        start = torch.rand(200, generator=generator)
        for state in (on_backend, replayed):
            state.score.copy_(start)
            state.weight.copy_(start.flip(0))
        ids = torch.randperm(200, generator=generator)[:64]  # small: Triton's interpreter is slow
        logits = torch.randn(64, 10, generator=generator) * 4
        targets = torch.randint(0, 10, (64,), generator=generator)
        _, losses = backend.select(on_backend, ids, 16, logits=logits, targets=targets, return_losses=True)
        ema_update_(replayed.score, replayed.weight, ids, losses, *betas)
        assert torch.equal(on_backend.score, replayed.score) and torch.equal(on_backend.weight, replayed.weight)


def test_communication_device_follows_the_backend():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert communication_device("gloo", cpu) == cpu
    assert communication_device("nccl", gpu) == gpu
    assert communication_device("cpu:gloo,cuda:nccl", gpu) == gpu
    assert communication_device("cpu:gloo,cuda:nccl", cpu) == cpu
    assert communication_device("gloo", gpu) == cpu  # staged through the host
    with pytest.raises(ValueError, match="device"):
        communication_device("nccl", cpu)


def test_a_saved_mid_epoch_checkpoint_merges_exactly_after_resuming(distributed_runs):
    expected = {name: torch.tensor(agreed) for name, agreed in AGREED.items()}
    for position, moved in MOVED.values():
        for name, value in moved.items():
            expected[name][position] = value
    for rank, results in enumerate(r["checkpoint"] for r in distributed_runs):
        # Saved again before the merge, the checkpoint comes back as it was written, key for key.
        written = _saved_mid_epoch(rank)
        again = results["saved_again"]
        assert sorted(again) == sorted(written)
        for key, value in written.items():
            if isinstance(value, dict):
                assert again[key].keys() == value.keys() and torch.equal(again[key]["latest"], value["latest"])
            elif isinstance(value, torch.Tensor):
                assert torch.equal(again[key], value), key
            else:
                assert again[key] == value, key
        # Each rank's move survives the merge bit for bit, where the agreed values would stand without the snapshots.
        for name, value in results["merged"].items():
            assert torch.equal(value, expected[name]), (rank, name)
        assert results["scored"].tolist() == [True, False, False, True]
        assert "sync_snapshot" not in results["saved_after_merge"]
        assert "sample_buffers_snapshot" not in results["saved_after_merge"]
