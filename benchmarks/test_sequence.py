"""CPU benchmark of the language-model scoring path: per-sequence losses from hidden states and the LM
head, chunked (never holding the logits) against "materialise the logits, ``F.cross_entropy(reduction="none")``,
reduce per sequence". B = 8, T = 512, D = 1024, V = 32,000, fp32, 2 threads.

    taskset -c 0,1 python -m pytest benchmarks/test_sequence.py --benchmark-only     # time per call
    taskset -c 0,1 python -m benchmarks.test_sequence                                 # interleaved ratio + memory

Peak extra memory is measured in a fresh subprocess per path: it builds the inputs, warms the path up on a small
shape (BLAS and thread-pool buffers are then allocated already), resets the kernel's peak-RSS mark (``echo 5 >
/proc/self/clear_refs``), runs one call and reports ``VmHWM - VmRSS before the call``: every page the call touched
at its peak, whatever allocated it (torch's CPU allocator, BLAS, the C++ code). Linux only. Timings swing with the
machine's load, so ``main`` interleaves the paths round by round and reports the median ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from es_kernels.reference import sequence as reference

BATCH, TIME, DIM, VOCAB = 8, 512, 1024, 32000
PATHS = ("materialised", "reference chunked", "C++ chunked")


def inputs(batch=BATCH, time_=TIME, dim=DIM, vocab=VOCAB):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, time_, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) / dim**0.5
    targets = torch.randint(0, vocab, (batch, time_), generator=generator)
    targets[:, : time_ // 4] = -100  # a prompt that is not scored, as in SFT
    return hidden, weight, targets


def materialised(hidden, weight, targets):
    logits = hidden @ weight.t()
    tokens = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return reference.reduce_per_sequence(tokens, targets != -100, "mean")


def path_function(name):
    if name == "materialised":
        return materialised
    if name == "reference chunked":
        return lambda h, w, y: reference.hidden_sequence_losses(h, w, None, y)
    from es_kernels import extension

    ops = extension._ops()  # the registered dispatcher op es_kernels_C::hidden_sequence_losses (CPU kernel)
    return lambda h, w, y: ops.hidden_sequence_losses(h, w, None, y, -100, "mean", 0.0, 1.0, None)


def _status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure_peak_extra_bytes(name):
    """Run in a fresh process: peak resident bytes one call adds on top of its inputs."""
    torch.set_num_threads(2)
    function = path_function(name)
    function(*inputs(2, 64, DIM, 4096))  # warm-up: library buffers, thread pools
    hidden, weight, targets = inputs()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    function(hidden, weight, targets)
    return (_status_kib("VmHWM") - before) * 1024


def peak_extra_bytes(name):
    code = f"from benchmarks.test_sequence import measure_peak_extra_bytes as m; print(m({name!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


LOGITS_BYTES = BATCH * TIME * VOCAB * 4


@pytest.fixture(scope="module")
def data():
    return inputs()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc is Linux-only")
@pytest.mark.parametrize("name", PATHS)
def test_scoring_path(benchmark, data, name):
    function = path_function(name)
    benchmark.group = f"sequence losses B={BATCH} T={TIME} D={DIM} V={VOCAB} fp32"
    peak = peak_extra_bytes(name)
    benchmark.extra_info.update(path=name, peak_extra_bytes=peak, logits_bytes=LOGITS_BYTES)
    losses = benchmark.pedantic(function, args=data, rounds=3, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(losses, materialised(*data), rtol=1e-4, atol=1e-4)


def main(rounds=5):
    torch.set_num_threads(2)
    data = inputs()
    functions = {name: path_function(name) for name in PATHS}
    for function in functions.values():
        function(*data)
    seconds = {name: [] for name in PATHS}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function(*data)
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["materialised"])
    rows = []
    for name in PATHS:
        ratios = [a / b for a, b in zip(seconds[name], seconds["materialised"], strict=True)]
        peak = peak_extra_bytes(name)
        rows.append(dict(path=name, median_s=statistics.median(seconds[name]), ratio=statistics.median(ratios),
                         peak_extra_MiB=peak / 2**20, peak_over_logits=peak / LOGITS_BYTES))  # fmt: skip
    print(f"B={BATCH} T={TIME} D={DIM} V={VOCAB} fp32, {torch.get_num_threads()} threads, logits "
          f"{LOGITS_BYTES / 2**20:.0f} MiB, materialised median {base:.2f} s, load {os.getloadavg()}")  # fmt: skip
    print("| path | time per call (s) | time / materialised (median of interleaved rounds) | peak extra memory (MiB) "
          "| peak / logits bytes |")  # fmt: skip
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['median_s']:.2f} | {row['ratio']:.2f}x | {row['peak_extra_MiB']:.0f} | "
              f"{row['peak_over_logits']:.3f} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
