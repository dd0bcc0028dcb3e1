"""Sweep the Triton hidden-state kernel's tile configurations on a CUDA GPU (``python3 -m benchmarks.tune_hidden``).

For each shape (bf16, B=8 T=1024 D=2048 V=32000, and B=4 T=4096 D=4096 V=128256) it prints the median time of one
``hidden_sequence_losses`` call (partials + merge) per configuration of ``sequence_kernels.HIDDEN_CONFIGS`` and per
``HIDDEN_PROGRAMS_PER_SM``, with the matmul rate it implies (2·B·T·D·V flops), then Cut Cross-Entropy and
Liger-Kernel's fused linear cross-entropy (``reduction="none"``) when they are installed. Set the fastest row's
numbers in ``es_kernels/triton/sequence_kernels.py`` (and check the AOT gate still passes: a configuration that
spills on sm_80 fails it). Without CUDA it prints "no CUDA" and exits 0.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

SHAPES = ((8, 1024, 2048, 32000), (4, 4096, 4096, 128256))
# (block_m, block_n, block_k, num_warps, num_stages); the first is the default.
CONFIGS = (
    (128, 64, 32, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 64, 64, 8, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (256, 128, 64, 8, 3),
)
PROGRAMS_PER_SM = (1, 2, 4)


def _row(name: str, milliseconds: float, flops: float) -> str:
    return f"| {name} | {milliseconds:.3f} | {flops / milliseconds / 1e9:.0f} |"


def _optional_rows(hidden, weight, targets, flops, do_bench) -> list[str]:
    rows = []
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        rows.append("| Cut Cross-Entropy | not installed | - |")
    else:
        milliseconds = do_bench(lambda: linear_cross_entropy(hidden, weight, targets, reduction="none"))
        rows.append(_row("Cut Cross-Entropy (reduction='none')", milliseconds, flops))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        rows.append("| Liger-Kernel | not installed | - |")
    else:
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        milliseconds = do_bench(lambda: loss(weight, flat_hidden, flat_targets))
        rows.append(_row("Liger-Kernel fused linear cross-entropy (reduction='none')", milliseconds, flops))
    return rows


def sweep(batch, time, dim, vocab, do_bench) -> None:
    from es_kernels.triton import sequence_kernels

    key = (torch.bfloat16, True)
    default_programs = sequence_kernels.HIDDEN_PROGRAMS_PER_SM
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, time, dim, device=device, dtype=torch.bfloat16, generator=generator)
    weight = (torch.randn(vocab, dim, device=device, generator=generator) / dim**0.5).bfloat16()
    targets = torch.randint(0, vocab, (batch, time), device=device, generator=generator)
    flops = 2.0 * batch * time * dim * vocab
    print(f"\nbf16 B={batch} T={time} D={dim} V={vocab}\n")
    print("| configuration (block_m, block_n, block_k, warps, stages; programs/SM) | median ms | TFLOP/s |")
    print("|---|---|---|")
    for config in CONFIGS:
        for programs in PROGRAMS_PER_SM if config == CONFIGS[0] else (default_programs,):
            sequence_kernels.HIDDEN_CONFIGS[key] = sequence_kernels.HiddenConfig(*config)
            sequence_kernels.HIDDEN_PROGRAMS_PER_SM = programs
            sequence_kernels._programs_target.cache_clear()
            try:
                milliseconds = do_bench(lambda: sequence_kernels.hidden_sequence_losses(hidden, weight, None, targets))
            except Exception as error:  # a configuration that does not fit (shared memory) is a row too
                print(f"| {config}; {programs} | failed: {type(error).__name__} | - |")
                continue
            print(_row(f"{config}; {programs}", milliseconds, flops), flush=True)
    for line in _optional_rows(hidden, weight, targets, flops, do_bench):
        print(line)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA")
        return 0
    from triton.testing import do_bench

    from es_kernels.triton import sequence_kernels

    key = (torch.bfloat16, True)
    default = sequence_kernels.HIDDEN_CONFIGS[key]
    default_programs = sequence_kernels.HIDDEN_PROGRAMS_PER_SM
    try:
        for shape in SHAPES:
            sweep(*shape, lambda f: do_bench(f, warmup=10, rep=50))
            torch.cuda.empty_cache()
    finally:
        sequence_kernels.HIDDEN_CONFIGS[key] = default
        sequence_kernels.HIDDEN_PROGRAMS_PER_SM = default_programs
        sequence_kernels._programs_target.cache_clear()
    print(f"\ndefault: {dataclasses.astuple(default)}; {default_programs} programs/SM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
