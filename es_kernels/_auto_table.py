"""What ``backend="auto"`` runs, per device type and call form: the fastest backend measured, recorded here.

Written by ``python3 -m benchmarks.auto_choice --write`` on the device named in ``SOURCE`` (wall-clock per call,
CUDA-synchronised, medians of interleaved rounds, value checks at their defaults); ``ORDER`` is derived from
``MICROSECONDS`` so that ``auto`` never picks a backend measured slower than another available one. A device type
or form with no figures falls back to ``FALLBACK``. CPU: Triton runs there only under its interpreter (tests), so
it is never chosen.
"""

SOURCE = (
    "NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0; logits: the medians over B x C in {256 x 1000, 4096 x 1000, "
    "1024 x 32000 bf16, 64 x 128256 bf16} of an earlier run (check_values=False); hidden: B=8 T=1024 D=2048 "
    "V=32000 bf16; prune: n=1e8 keep 8e7. CPU: 2 threads, 256 x 1000 and 1024 x 32000 fp32."
)

# device type -> call form -> backend -> median microseconds per call at the SOURCE shapes.
MICROSECONDS = {
    "cuda": {
        "logits": {"extension": 131.0, "triton": 605.0, "torch": 700.0},
        "losses": {"extension": 131.0, "triton": 605.0, "torch": 700.0},
        "tokens": {"extension": 150.0, "triton": 650.0, "torch": 900.0},
        "hidden": {"extension": 2520.0, "triton": 33400.0, "torch": 36490.0},
        "prune": {"extension": 2650.0, "triton": 11990.0, "torch": 13250.0},
    },
}

FALLBACK = ("extension", "torch")

ORDER = {
    device: {form: tuple(sorted(times, key=times.__getitem__)) for form, times in forms.items()}
    for device, forms in MICROSECONDS.items()
}
