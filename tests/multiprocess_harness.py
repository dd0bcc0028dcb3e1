"""Runs one job on 2 gloo processes on CPU and returns what each rank's job returned: the launcher of the tests that
check distributed runs against one process (test_distributed.py, test_policies.py).

A job is a module-level function ``job(rank) -> dict``, called in each worker between ``init_process_group`` and
``destroy_process_group``; ``launch(job, out_dir)`` returns the ranks' dicts in rank order.

- Fork, not spawn: a forked worker does not import torch and the test module again, so a job takes seconds. torch
  marks its thread pools unusable in a forked child and re-creates them, as DataLoader workers rely on. Where fork is
  unavailable the workers are spawned: the job is then pickled by reference (its module and name) and imported
  again in the child, which is why ``launch`` takes the function itself and no name to look up in a table (a table
  patched in the parent would not be seen by a spawned child).
- A file store in ``out_dir`` for the rendezvous: no port to choose, nothing clashes with other jobs on the machine.
- Deadlines: a rank stuck in a collective raises after ``COLLECTIVE_TIMEOUT_S``, and the parent kills the workers
  still alive after ``JOB_TIMEOUT_S``, so a broken collective fails the test instead of hanging it.
- Results: each rank ``torch.save``s its dict to ``out_dir/rank{r}.pt`` and the parent loads it with
  ``weights_only=True`` (tensors, numbers, strings, lists and dicts of them); a rank that raises writes its traceback
  to ``rank{r}.err``, which the failure message carries.
"""

from __future__ import annotations

import datetime
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
COLLECTIVE_TIMEOUT_S = 30  # a rank stuck in a collective raises after this instead of waiting forever
JOB_TIMEOUT_S = 120  # the whole job; the parent kills the workers after it

Job = Callable[[int], dict]


def _worker(rank: int, job: Job, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes share two cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            results = job(rank)
        finally:
            dist.destroy_process_group()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def launch(job: Job, out_dir: Path) -> list[dict]:
    """Runs ``job`` on ranks 0 and 1 and returns their results; fails if a rank raises, exits non-zero or hangs."""
    name = f"{job.__module__}.{job.__qualname__}"
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    workers = [
        context.Process(target=_worker, args=(rank, job, str(out_dir / "store"), str(out_dir)), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, worker in enumerate(workers) if worker.is_alive()]
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(10)
    errors = "\n".join(path.read_text() for path in sorted(out_dir.glob("rank*.err")))
    assert not hung, f"ranks {hung} of job {name} still running after {JOB_TIMEOUT_S}s\n{errors}"
    codes = [worker.exitcode for worker in workers]
    assert codes == [0] * WORLD_SIZE, f"job {name} exit codes {codes}\n{errors}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
