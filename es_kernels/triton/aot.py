"""Ahead-of-time compile gate: every kernel variant the launchers can launch, compiled to cubin without a GPU.

Run ``python -m es_kernels.triton.aot`` (``--help`` for options). For each variant and target (sm_80, sm_90) it
prints registers, spilled bytes, shared memory and vector global loads, and exits non-zero on any compile error,
any spill in a default configuration, a fused multiply-add in the state update, an aligned variant (and the
pruning kernel) whose PTX has no vector load (``ld.global.v2/v4``, or an 8/16-byte ``cp.async`` for ``tl.dot``
operands), or a bf16/fp16 hidden-state variant whose sm_90 PTX has no ``wgmma`` (Hopper's tensor cores).

Coverage: the kernel is built so Triton can only specialise on its constexprs and one layout class (see
``kernels.py``); before compiling, the gate binds a grid of user-like launches (odd sizes, offset views, transposes,
strided ids, labels and losses) with Triton's binder and fails if any would compile a variant it does not check.

Variants are derived, not listed by hand: for representative CPU tensors of each dtype, mode and memory layout the
launchers' own argument builders (``launch.fused_select_arguments``, ``launch.prune_keys_arguments``) produce the
arguments, and Triton's own binder turns them into the signature, constexprs and specialisations it would compile
at launch time. Register and spill counts come from the ``ptxas -v`` log of Triton's own ptxas invocation.

The no-FMA proof: Triton compiles with ``--fmad=false`` when ``enable_fp_fusion=False``; the gate also reads the
PTX and fails if any instruction attributed (``.loc``) to the update lines of ``kernels.py`` is an fma/mad.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from es_kernels.command import HelpFormatter

TARGETS = (80, 90)
# Source lines of the state update whose products must stay unfused.
_UPDATE_MARKERS = ("weight_part = score_old * beta1", "score_new = score_part + loss * one_minus_beta2")


@dataclass
class Variant:
    name: str
    kernel: object
    args: tuple
    kwargs: dict
    # The variant's bulk loads must compile to vector loads (ld.global.v2/v4); the gate fails if none do.
    vectorised: bool = False
    # The variant's tl.dot must run on Hopper's tensor cores (wgmma in its sm_90 PTX); the gate fails if not.
    tensor_cores: bool = False


@dataclass
class Result:
    variant: str
    arch: int
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None
    fma_in_update: int = 0
    vector_loads: int | None = None
    vectorised: bool = False
    wgmma: int | None = None
    tensor_cores: bool = False


def variants() -> Iterator[Variant]:
    """One variant per (mode, dtype, layout) the launchers produce, plus the pruning-key kernel."""
    import torch

    from es_kernels.triton import kernels, launch

    batch, classes, n = 8, 64, 256
    score = torch.zeros(n)
    weight = torch.zeros(n)
    indices = torch.arange(batch)
    seed = torch.zeros(1, dtype=torch.int64)
    labels = torch.zeros(batch, dtype=torch.int64)
    float_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    # The two layout classes the launcher tells apart (``launch._row_major_aligned``); the any-layout kernel
    # specialises on nothing of the layout, so one view of that class stands for all.
    layouts = {"aligned": lambda t: t, "any-layout": lambda t: t.t().contiguous().t()}

    def fused(name, vectorised=False, **given):
        arguments = dict(
            score=score, weight=weight, indices=indices, seed=seed, k=2, beta1=0.2, beta2=0.9, logits=None,
            labels_a=None, labels_b=None, soft_targets=None, lam=1.0, losses=None, label_smoothing=0.1,
        )  # fmt: skip
        arguments.update(given)
        kernel, args, kwargs, _, _ = launch.fused_select_arguments(**arguments)
        return Variant(name, kernel, args, kwargs, vectorised)

    for dtype_name, dtype in float_dtypes.items():
        yield fused(f"fused losses={dtype_name}", losses=torch.zeros(batch, dtype=dtype))
    for dtype_name, dtype in float_dtypes.items():
        for layout_name, layout in layouts.items():
            logits = layout(torch.zeros(batch, classes, dtype=dtype))
            name = f"fused labels logits={dtype_name} {layout_name}"
            yield fused(name, layout_name == "aligned", logits=logits, labels_a=labels)
    for dtype_name, dtype in float_dtypes.items():
        for target_name, target_dtype in float_dtypes.items():
            for layout_name, layout in layouts.items():
                logits = layout(torch.zeros(batch, classes, dtype=dtype))
                soft = layout(torch.zeros(batch, classes, dtype=target_dtype))
                name = f"fused soft logits={dtype_name} targets={target_name} {layout_name}"
                yield fused(name, layout_name == "aligned", logits=logits, soft_targets=soft)
    args, kwargs, _ = launch.prune_keys_arguments(torch.zeros(n), seed)
    yield Variant("prune_keys values=fp32", kernels.prune_keys_kernel, args, kwargs, vectorised=True)
    # Language-model sequence losses. Their aligned forms are specialised for the same layout class as
    # the fused kernel's (unit last stride, 16-element strides, 16-byte data), so they must vectorise too.
    from es_kernels.triton import sequence_kernels

    for name, kernel, args, kwargs in sequence_kernels.aot_variants():
        tensor_cores = "hidden_loss" in name and ("bf16" in name or "fp16" in name)
        yield Variant(name, kernel, args, kwargs, vectorised=" aligned" in name, tensor_cores=tensor_cores)


def _bind(kernel, args: tuple, kwargs: dict, backend) -> tuple:
    """(bound args, specialisation, options): what Triton's own binder makes of a launch, as at launch time."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    return binder(*args, **{"debug": False, **kwargs})


def _specialization(kernel, args: tuple, kwargs: dict, backend) -> tuple:
    """What Triton compiles for this launch: the kernel, each argument's type and specialisation, the constexprs."""
    _, specialization, options = _bind(kernel, args, kwargs, backend)
    return (id(kernel), tuple(specialization), tuple(sorted(options.items())))


def probe_launches() -> Iterator[tuple[str, object, tuple, dict]]:
    """(description, kernel, args, kwargs) of launches with inputs as users pass them: odd sizes, views at an
    offset, transposes, strided ids, labels and losses. Every one must compile to a variant the gate checked."""
    import torch

    from es_kernels.triton import kernels, launch

    score, weight = torch.zeros(5000), torch.zeros(5000)
    seed = torch.zeros(1, dtype=torch.int64)

    def views(batch, classes, dtype):
        base = torch.zeros(batch + 3, 2 * classes + 5, dtype=dtype)
        yield "contiguous", torch.zeros(batch, classes, dtype=dtype)
        yield "offset view", base[1 : batch + 1, 3 : classes + 3]
        yield "every other column", base[:batch, : 2 * classes : 2]
        yield "transposed", torch.zeros(classes, batch, dtype=dtype).t()
        yield "expanded row", torch.zeros(1, classes, dtype=dtype).expand(batch, classes)

    for batch, classes in ((1, 2), (3, 1000), (16, 64), (32, 1001), (64, 32000)):
        index_views = {"ids": torch.arange(batch), "ids at an offset": torch.arange(batch + 1)[1:]}
        label_views = {
            "labels": torch.zeros(batch, dtype=torch.int64),
            "strided labels": torch.zeros(2 * batch, dtype=torch.int64)[::2],
        }
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for (index_name, ids), (label_name, labels) in zip(index_views.items(), label_views.items(), strict=True):
                common = dict(score=score, weight=weight, indices=ids, seed=seed, k=1, beta1=0.2, beta2=0.9,
                              label_smoothing=0.1)  # fmt: skip
                losses = torch.zeros(2 * batch, dtype=dtype)
                for losses_name, given in (("losses", losses[:batch]), ("strided losses", losses[::2])):
                    yield (
                        f"{losses_name} {dtype} B={batch} {index_name}",
                        *launch.fused_select_arguments(**common, logits=None, labels_a=None, labels_b=None,
                                                       soft_targets=None, lam=1.0, losses=given)[:3],
                    )  # fmt: skip
                for view_name, logits in views(batch, classes, dtype):
                    for kind, targets in (
                        ("labels", dict(labels_a=labels, labels_b=None, soft_targets=None, lam=1.0)),
                        ("mixup", dict(labels_a=labels, labels_b=labels.flip(0), soft_targets=None, lam=0.3)),
                        ("soft", dict(labels_a=None, labels_b=None, soft_targets=logits.float(), lam=1.0)),
                        ("soft transposed", dict(labels_a=None, labels_b=None, lam=1.0,
                                                 soft_targets=torch.zeros(classes, batch, dtype=dtype).t())),
                    ):  # fmt: skip
                        name = f"{kind} {dtype} {view_name} B={batch} C={classes} {index_name} {label_name}"
                        arguments = launch.fused_select_arguments(**common, logits=logits, losses=None, **targets)
                        yield (name, *arguments[:3])
    prune_args, prune_kwargs, _ = launch.prune_keys_arguments(torch.zeros(10**6), seed)
    yield "prune keys n=10**6", kernels.prune_keys_kernel, prune_args, prune_kwargs
    from es_kernels.triton import sequence_kernels

    yield from sequence_kernels.probe_launches()


def uncovered_launches(arch: int = TARGETS[0]) -> tuple[list[str], int]:
    """(probe launches whose compiled variant is none of ``variants()``, number of probes): what the gate would not
    have checked."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    checked = {_specialization(v.kernel, v.args, v.kwargs, backend) for v in variants()}
    probes = list(probe_launches())
    missed = [name for name, *launch in probes if _specialization(*launch, backend) not in checked]
    return missed, len(probes)


def _update_lines() -> set[int]:
    from es_kernels.triton import kernels

    lines, first = inspect.getsourcelines(kernels)
    numbers = [first + i for i, line in enumerate(lines) if any(m in line for m in _UPDATE_MARKERS)]
    if len(numbers) != 2:
        raise RuntimeError(f"cannot find the state update in kernels.py (markers {_UPDATE_MARKERS})")
    return set(range(numbers[0], numbers[1] + 1))


def _update_instructions(ptx: str, lines: set[int]) -> tuple[int, int]:
    """(fma/mad count, separately rounded mul/add count) among the f32 instructions the PTX attributes to
    ``lines`` of kernels.py."""
    files = {m.group(1) for m in re.finditer(r'\.file\s+(\d+)\s+"([^"]*kernels\.py)"', ptx)}
    current, fused, rounded = None, 0, 0
    for raw in ptx.splitlines():
        line = raw.strip()
        location = re.match(r"\.loc\s+(\d+)\s+(\d+)\s+\d+", line)
        if location:
            current = (location.group(1), int(location.group(2)))
            continue
        if current and current[0] in files and current[1] in lines:
            fused += bool(re.match(r"(fma|mad)\.[a-z.]*f32", line))
            rounded += bool(re.match(r"(mul|add)\.rn\.f32", line))
    return fused, rounded


def vector_loads(ptx: str) -> int:
    """Number of vector global loads in ``ptx``: ``ld.global[.qualifiers].v2/.v4``, and asynchronous copies of 8 or
    16 bytes (``cp.async.c[ag].shared.global [..], [..], 0x8|0x10``), the form in which Triton pipelines the
    ``tl.dot`` operands through shared memory on sm_80+ (those loads never appear as ``ld.global``)."""
    plain = re.findall(r"^\s*(?:@!?%\w+\s+)?ld\.global(?:\.[\w:]+)*?\.v[248]\.", ptx, flags=re.MULTILINE)
    copies = re.findall(
        r"^\s*(?:@!?%\w+\s+)?cp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*0x(?:8|10)\b",
        ptx,
        flags=re.MULTILINE,
    )
    return len(plain) + len(copies)


def wgmma_instructions(ptx: str) -> int:
    """Number of Hopper warpgroup matrix multiply-accumulates (``wgmma.mma_async``) in ``ptx``."""
    return len(re.findall(r"^\s*(?:@!?%\w+\s+)?wgmma\.mma_async\.", ptx, flags=re.MULTILINE))


def _ptxas_numbers(log: str) -> tuple[int | None, int | None]:
    registers = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    reg = max(int(r) for r in registers) if registers else None
    spill = max(int(s) + int(lo) for s, lo in spills) if spills else None
    return reg, spill


def compile_variant(variant: Variant, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    result = Result(variant.name, arch, vectorised=variant.vectorised, tensor_cores=variant.tensor_cores)
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        kernel = variant.kernel
        kwargs = {"debug": False, **variant.kwargs}
        bound_args, specialization, options = _bind(kernel, variant.args, kwargs, backend)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
        source = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
        log = io.StringIO()
        # A cache hit would skip ptxas and its -v log; always compile, and capture the log Triton prints.
        with (
            triton.knobs.nvidia.scope(),
            triton.knobs.compilation.scope(),
            contextlib.redirect_stdout(log),
        ):
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True
            compiled = triton.compile(source, target=target, options=options.__dict__)
        result.registers, result.spill_bytes = _ptxas_numbers(log.getvalue())
        result.shared_bytes = int(compiled.metadata.shared)
        result.vector_loads = vector_loads(compiled.asm["ptx"])
        result.wgmma = wgmma_instructions(compiled.asm["ptx"])
        if variant.kernel.__name__ == "fused_select_kernel":
            result.fma_in_update, rounded = _update_instructions(compiled.asm["ptx"], _update_lines())
            if rounded < 4:
                # Without the update's own mul/add in sight, "no fma" would prove nothing.
                result.error = f"found {rounded} rounded mul/add of the state update in the PTX, expected 4"
        if result.registers is None:
            result.error = "no ptxas -v output to read registers from"
    except Exception as error:  # every failure is a row of the table, not an abort of the gate
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    result.seconds = time.perf_counter() - start
    return result


def _failures(result: Result) -> list[str]:
    problems = []
    if result.error:
        problems.append(result.error)
    if result.spill_bytes:
        problems.append(f"{result.spill_bytes} bytes spilled")
    if result.fma_in_update:
        problems.append(f"{result.fma_in_update} fma in the state update")
    if result.vectorised and result.vector_loads == 0:
        problems.append("no vector load (ld.global.v2/v4) in a variant that must vectorise")
    if result.tensor_cores and result.arch >= 90 and result.wgmma == 0:
        problems.append("no wgmma in the sm_90 PTX of a variant that must use tensor cores")
    return problems


def table(results: list[Result]) -> str:
    rows = [
        "| kernel variant | target | registers | spilled bytes | shared memory (bytes) | vector loads | wgmma "
        "| status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        status = "; ".join(_failures(r)) or "ok"
        cells = [r.variant, f"sm_{r.arch}", r.registers, r.spill_bytes, r.shared_bytes, r.vector_loads, r.wgmma, status]
        rows.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m es_kernels.triton.aot", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, action="append", help="compute capability like 80 (repeatable; default: every target)"
    )
    parser.add_argument("--only", default="", help="compile only variants whose name contains this text (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument(
        "--coverage-only", action="store_true", help="only check that user-like launches map onto the variants"
    )
    parser.add_argument(
        "--enable-fp-fusion", action="store_true", help="compile with FMA contraction on, to see the gate catch it"
    )
    options = parser.parse_args(argv)
    from es_kernels.triton import interpreter_requested

    if interpreter_requested():
        print("unset TRITON_INTERPRET: the interpreter builds no compilable kernels", file=sys.stderr)
        return 2
    archs = options.arch or list(TARGETS)
    uncovered, probes = uncovered_launches()
    print(f"launch coverage: {len(uncovered)} of {probes} probe launches not covered")
    for name in uncovered:
        print(f"  not covered: {name}")
    if options.coverage_only:
        return 1 if uncovered else 0
    chosen = [v for v in variants() if options.only in v.name]
    if options.enable_fp_fusion:
        for variant in chosen:
            variant.kwargs["enable_fp_fusion"] = True
    jobs = [(v, arch) for v in chosen for arch in archs]
    start = time.perf_counter()
    if options.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(options.jobs) as pool:
            work = [(v.name, arch, options.enable_fp_fusion) for v, arch in jobs]
            results = list(pool.map(_compile_by_name, work))
    else:
        results = [compile_variant(v, arch) for v, arch in jobs]
    print(table(results))
    failed = [r for r in results if _failures(r)]
    print(
        f"\n{len(results)} compiles ({len(chosen)} variants x {len(archs)} targets) in "
        f"{time.perf_counter() - start:.0f} s: {len(failed)} failed"
    )
    return 1 if failed or uncovered or not results else 0


def _compile_by_name(job: tuple[str, int, bool]) -> Result:
    # Kernels do not pickle; a worker process rebuilds the variant from its name.
    name, arch, enable_fp_fusion = job
    variant = next(v for v in variants() if v.name == name)
    if enable_fp_fusion:
        variant.kwargs["enable_fp_fusion"] = True
    return compile_variant(variant, arch)


if __name__ == "__main__":
    sys.exit(main())
