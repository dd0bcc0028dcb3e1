"""What ``backend="auto"`` runs, per device type and call form: the fastest backend measured, recorded
here.

Written by ``python3 -m benchmarks.call_path --auto-table es_kernels/_auto_table.py`` on the device named in
``SOURCE`` (wall-clock per call, CUDA-synchronised, medians of interleaved rounds, value checks at their defaults);
``ORDER`` is derived from ``MICROSECONDS`` so that ``auto`` never picks a backend measured slower than another
available one. A device type with no figures (the CPU: Triton runs there only under its interpreter, for tests)
uses ``FALLBACK``.
"""

SOURCE = (
    "NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, 2026-12-04, commit 43fb2c8 (before the C++ deferred-check ops "
    "and this session's kernel changes; value checks deferred through torch ops, the same cost on every backend)"
)

# device type -> call form -> backend -> median microseconds per call. Shapes: logits and losses B=1024 C=32000 bf16;
# tokens B=8 T=1024 V=32000 bf16; hidden B=8 T=1024 D=2048 V=32000 bf16; prune n=1e8, keep 0.8n.
MICROSECONDS = {
    "cuda": {
        "logits": {"triton": 2255.5, "extension": 1998.4, "torch": 2706.3},
        "losses": {"triton": 2472.8, "extension": 2297.8, "torch": 2951.7},
        "tokens": {"triton": 520.6, "extension": 461.1, "torch": 7041.6},
        "hidden": {"triton": 32009.5, "extension": 2754.6, "torch": 31934.8},
        "prune": {"triton": 12080.0, "extension": 2727.1, "torch": 13273.8},
    },
}

FALLBACK = ("extension", "torch")

ORDER = {
    device: {form: tuple(sorted(times, key=times.__getitem__)) for form, times in forms.items()}
    for device, forms in MICROSECONDS.items()
}
