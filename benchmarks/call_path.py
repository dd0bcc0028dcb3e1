"""What one ``evolved_select`` call costs on a GPU, against what users would otherwise write; which backend ``auto``
picks per call form; and the ViT-L/16 training step with the default value checks.

    python3 -m benchmarks.call_path --json OUT.json [--auto-table es_kernels/_auto_table.py] [--quick]

Sections (each CUDA-synchronised, medians of interleaved rounds: one timed batch of calls per path per round, so
a change of load shifts every path alike):

* ``per_call``: wall-clock per call at B x C in {256 x 1000 fp32, 4096 x 1000 fp32, 1024 x 32000 bf16,
  64 x 128256 bf16} for auto / Triton / extension with the default checks and with ``check_values=False``, the
  hand-written PyTorch ES step (``F.cross_entropy(reduction="none")``, the EMA by index, ``torch.multinomial``
  without replacement) and a Composer-style selective backprop (losses, then the top-k rows by loss); beside each,
  the host time per call (the loop without synchronising, while the GPU queue is not full) and the GPU kernel time
  per call (torch.profiler).
* ``auto``: per call form (class logits, given losses, token logits, hidden states, pruning), every available
  backend with the default checks; ``--auto-table`` writes the figures as ``es_kernels/_auto_table.py``.
* ``vit_large``: timm ViT-L/16 at 224 px, random init, B = 128, k = 32, bf16 autocast, fused AdamW: baseline step,
  ES with the defaults, ES with ``check_values=False``, and the analytic limit (F(B) + F(k) + Bw(k)) / (F(B) + Bw(B)).
* ``deferred``: on CUDA, a bad call leaves the state unchanged and its error comes at a later call and at
  ``state.check()``; a training step with the defaults captures in a CUDA graph and replays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from es_kernels import EvolvedState, backend_status, evolved_prune, evolved_select, sequence_losses
from es_kernels.backends import auto_order

SHAPES = ((256, 1000, "fp32"), (4096, 1000, "fp32"), (1024, 32000, "bf16"), (64, 128256, "bf16"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_SAMPLES = 1_000_000
BETAS = (0.2, 0.9)


def _available(device: str) -> list[str]:
    return [name for name, status in backend_status(device).items() if status == "available"]


def _time_calls(function, calls: int) -> tuple[float, float]:
    """(wall seconds per call with the GPU done, host seconds per call to enqueue them)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (done - start) / calls, (enqueued - start) / calls


def _kernel_seconds(paths: dict, calls: int = 20) -> dict[str, float]:
    """GPU time per call of each path's kernels, from one profiler session (each session costs seconds): the
    device time of the kernels launched inside each path's ``record_function`` range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for name, function in paths.items():
            with record_function(f"path::{name}"):
                for _ in range(calls):
                    function()
            torch.cuda.synchronize()
    totals = {event.name[len("path::") :]: event.device_time_total for event in prof.events()
              if event.name.startswith("path::")}  # fmt: skip
    return {name: totals.get(name, float("nan")) / calls * 1e-6 for name in paths}


def _interleaved(paths: dict, rounds: int, calls: int, kernels: bool = False) -> dict[str, dict[str, float]]:
    for function in paths.values():  # warm-up: compilation, allocator, first-call costs
        function()
        function()
    walls: dict[str, list[float]] = {name: [] for name in paths}
    hosts: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, function in paths.items():
            wall, host = _time_calls(function, calls)
            walls[name].append(wall)
            hosts[name].append(host)
    kernel = _kernel_seconds(paths) if kernels else {}
    out = {}
    for name in paths:
        wall = statistics.median(walls[name])
        out[name] = {
            "us": 1e6 * wall,
            "spread_percent": 100 * (max(walls[name]) - min(walls[name])) / wall,
            "host_us": 1e6 * statistics.median(hosts[name]),
        }
        if name in kernel:
            out[name]["kernel_us"] = 1e6 * kernel[name]
    return out


def hand_written_es(state_s, state_w, indices, logits, labels, k):
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    old = state_s[indices]
    state_w[indices] = BETAS[0] * old + (1 - BETAS[0]) * losses
    state_s[indices] = BETAS[1] * old + (1 - BETAS[1]) * losses
    return torch.multinomial(state_w[indices], k, replacement=False).sort().values


def composer_style(logits, labels, k):
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    return torch.topk(losses, k).indices.sort().values


def _shape_paths(batch: int, classes: int, dtype: str, backends: list[str]) -> tuple[dict, EvolvedState]:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.rand(batch, classes, generator=generator) * 8 - 4).to(DTYPES[dtype]).cuda()
    labels = torch.randint(0, classes, (batch,), generator=generator).cuda()
    indices = torch.randperm(NUM_SAMPLES, generator=generator)[:batch].cuda()
    k = batch // 4
    state = EvolvedState(NUM_SAMPLES, *BETAS, device="cuda")
    score, weight = state.score.clone(), state.weight.clone()
    paths = {}
    for backend in ("auto", *backends):
        for checks in (True, False):
            paths[f"{backend}, checks {'default' if checks else 'off'}"] = lambda backend=backend, checks=checks: (
                evolved_select(state, indices, k, logits=logits, targets=labels, backend=backend, check_values=checks)
            )
    paths["hand-written PyTorch ES"] = lambda: hand_written_es(score, weight, indices, logits, labels, k)
    paths["Composer-style SB"] = lambda: composer_style(logits, labels, k)
    return paths, state


def per_call(rounds: int, calls: int) -> list[dict]:
    rows = []
    backends = [name for name in _available("cuda") if name != "torch"]
    for batch, classes, dtype in SHAPES:
        paths, state = _shape_paths(batch, classes, dtype, backends)
        result = _interleaved(paths, rounds, calls, kernels=True)
        state.check()
        rows.append({"batch": batch, "classes": classes, "dtype": dtype, "paths": result})
        figures = ", ".join(f"{name} {entry['us']:.0f} us" for name, entry in result.items())
        print(f"per call B={batch} C={classes} {dtype}: {figures}")
    return rows


def _form_paths(form: str, backends: list[str]) -> tuple[dict, str]:
    """One call of ``form`` per backend on shared inputs (made on the GPU: a CPU randn of the token logits alone
    takes seconds), and the shape it measures."""
    generator = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=generator, device="cuda")

    if form in ("logits", "losses"):
        batch, classes = 1024, 32000
        state = EvolvedState(NUM_SAMPLES, device="cuda")
        indices = torch.randperm(NUM_SAMPLES, generator=generator, device="cuda")[:batch]
        scored = (
            {"logits": randn(batch, classes, dtype=torch.bfloat16), "targets": randint(classes, batch)}
            if form == "logits"
            else {"losses": torch.rand(batch, generator=generator, device="cuda")}
        )
        calls = {b: lambda b=b: evolved_select(state, indices, batch // 4, backend=b, **scored) for b in backends}
        return calls, f"B={batch} C={classes}"
    if form in ("tokens", "hidden"):
        batch, steps, dim, vocab = 8, 1024, 2048, 32000
        targets = randint(vocab, batch, steps)
        if form == "tokens":
            logits = randn(batch, steps, vocab, dtype=torch.bfloat16)
            calls = {b: lambda b=b: sequence_losses(targets, logits=logits, backend=b) for b in backends}
            return calls, f"B={batch} T={steps} V={vocab}"
        hidden = randn(batch, steps, dim, dtype=torch.bfloat16)
        weight = (randn(vocab, dim) / dim**0.5).to(torch.bfloat16)
        calls = {b: lambda b=b: sequence_losses(targets, hidden_states=hidden, lm_head_weight=weight, backend=b)
                 for b in backends}  # fmt: skip
        return calls, f"B={batch} T={steps} D={dim} V={vocab}"
    n = 10**8
    state = EvolvedState(n, device="cuda")
    state.weight.copy_(torch.rand(n, generator=generator, device="cuda"))
    return {b: lambda b=b: evolved_prune(state, int(0.8 * n), backend=b) for b in backends}, f"n={n} keep=0.8n"


def auto_choice(rounds: int) -> dict:
    forms = {}
    for form in ("logits", "losses", "tokens", "hidden", "prune"):
        paths, shape = _form_paths(form, _available("cuda"))
        calls = 3 if form in ("hidden", "prune", "tokens") else 20
        result = _interleaved(paths, rounds, calls)
        forms[form] = {"shape": shape, "us": {name: round(r["us"], 1) for name, r in result.items()},
                       "auto_before": [b.value for b in auto_order("cuda", form)]}  # fmt: skip
        print(f"auto {form} ({shape}): " + ", ".join(f"{n} {r['us']:.0f} us" for n, r in result.items()))
        del paths
        torch.cuda.empty_cache()
    return forms


def write_auto_table(path: str, forms: dict, device_line: str) -> None:
    shapes = "; ".join(f"{form}: {entry['shape']}" for form, entry in forms.items())
    figures = ",\n".join(f'        "{form}": {json.dumps(entry["us"])}' for form, entry in forms.items())
    text = f'''"""What ``backend="auto"`` runs, per device type and call form: the fastest backend measured, recorded
here.

Written by ``python3 -m benchmarks.call_path --auto-table es_kernels/_auto_table.py`` on the device named in
``SOURCE`` (wall-clock per call, CUDA-synchronised, medians of interleaved rounds, value checks at their defaults);
``ORDER`` is derived from ``MICROSECONDS`` so that ``auto`` never picks a backend measured slower than another
available one. A device type with no figures (the CPU: Triton runs there only under its interpreter, for tests)
uses ``FALLBACK``.
"""

SOURCE = {device_line!r}

# device type -> call form -> backend -> median microseconds per call ({shapes}).
MICROSECONDS = {{
    "cuda": {{
{figures},
    }},
}}

FALLBACK = ("extension", "torch")

ORDER = {{
    device: {{form: tuple(sorted(times, key=times.__getitem__)) for form, times in forms.items()}}
    for device, forms in MICROSECONDS.items()
}}
'''
    with open(path, "w") as handle:
        handle.write(text)


def vit_large(rounds: int, steps: int) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=1000).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batch, keep = 128, 32
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    state = EvolvedState(100_000, device="cuda")
    cursor = [0]

    def train(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def es_step(checks):
        ids = torch.arange(cursor[0], cursor[0] + batch, device="cuda") % state.num_samples
        cursor[0] += batch
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(images)
        rows = evolved_select(state, ids, keep, logits=logits, targets=labels, check_values=checks)
        train(images[rows], labels[rows])

    def forward(size):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(model(images[:size]), labels[:size])

    def backward_only(size):
        loss = forward(size)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def score():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(images)

    paths = {
        "baseline": lambda: train(images, labels),
        "es_defaults": lambda: es_step(True),
        "es_checks_off": lambda: es_step(False),
        "score_B": score,
        "fwd_B": lambda: forward(batch),
        "fwd_k": lambda: forward(keep),
    }
    timed = _interleaved(paths, rounds, steps)
    times = {name: entry["us"] / 1e3 for name, entry in timed.items()}
    bwd = {size: statistics.median(backward_only(size) for _ in range(rounds)) * 1e3 for size in (batch, keep)}
    state.check()
    limit = (times["score_B"] + times["fwd_k"] + bwd[keep]) / (times["fwd_B"] + bwd[batch])
    result = {
        "ms": {**times, "bwd_B": bwd[batch], "bwd_k": bwd[keep]},
        "spread_percent": {name: entry["spread_percent"] for name, entry in timed.items()},
        "es_defaults_over_baseline": times["es_defaults"] / times["baseline"],
        "es_checks_off_over_baseline": times["es_checks_off"] / times["baseline"],
        "defaults_over_checks_off": times["es_defaults"] / times["es_checks_off"],
        "analytic_limit_without_optimizer": limit,
    }
    print("vit_large:", json.dumps(result))
    return result


def deferred_on_cuda() -> dict:
    """The deferred checks' GPU-only paths: the pinned error copy read by a later call, and CUDA-graph capture."""
    state = EvolvedState(64, device="cuda")
    logits = torch.randn(8, 10, device="cuda")
    labels = torch.randint(0, 10, (8,), device="cuda")
    bad = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6], device="cuda")
    evolved_select(state, bad, 2, logits=logits, targets=labels)
    unchanged = bool(torch.equal(state.weight, torch.full_like(state.weight, 1 / 64)))
    raised_after = None
    for call in range(1, 200):
        try:
            evolved_select(state, torch.arange(8, 16, device="cuda") + call % 6, 2, logits=logits, targets=labels)
        except ValueError as error:
            raised_after, message = call, str(error)
            break
    if raised_after is None:
        try:
            state.check()
            message = "no error"
        except ValueError as error:
            message = str(error)
    # A captured step with the defaults: the checks stay on the device, so capture works and replays update.
    graph_state = EvolvedState(1000, device="cuda")
    ids = torch.arange(8, device="cuda")
    static_logits = torch.randn(8, 10, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            evolved_select(graph_state, ids, 2, logits=static_logits, targets=labels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chosen = evolved_select(graph_state, ids, 2, logits=static_logits, targets=labels)
    before = graph_state.weight.clone()
    static_logits.copy_(torch.randn(8, 10, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    replay_updates = not torch.equal(before, graph_state.weight)
    ids.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 2000], device="cuda"))  # out of range, inside the graph
    bad_before = graph_state.weight.clone()
    graph.replay()
    try:
        graph_state.check()
        graph_error = None
    except ValueError as error:
        graph_error = str(error)
    result = {
        "bad_call_left_state_unchanged": unchanged,
        "raised_at_later_call": raised_after,
        "message": message,
        "graph_replay_updates": replay_updates,
        "graph_positions": chosen.tolist(),
        "graph_bad_replay_unchanged": bool(torch.equal(bad_before, graph_state.weight)),
        "graph_bad_replay_error": graph_error,
    }
    print("deferred:", json.dumps(result))
    ok = unchanged and raised_after is not None and replay_updates and graph_error is not None
    result["ok"] = bool(ok and result["graph_bad_replay_unchanged"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--auto-table", default=None, help="write the auto choice table here")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--sections", nargs="*", default=["deferred", "per_call", "auto", "vit_large"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("call_path: no CUDA device; nothing measured")
        return 2
    rounds, calls = (3, 5) if args.quick else (7, 50)
    name = torch.cuda.get_device_name()
    device_line = f"{name}, torch {torch.__version__}"
    try:
        import triton

        device_line += f", triton {triton.__version__}"
    except ImportError:
        pass
    result = {"device": device_line}
    sections = {
        "deferred": deferred_on_cuda,
        "per_call": lambda: per_call(rounds, calls),
        "auto": lambda: auto_choice(rounds),
        "vit_large": lambda: vit_large(rounds, 3 if args.quick else 5),
    }
    failed = False
    for section in args.sections:
        try:
            result[section] = sections[section]()
        except Exception as error:  # report and go on: one section's failure must not hide the others
            failed = True
            result[section] = {"error": f"{type(error).__name__}: {error}"}
            print(f"SECTION FAILED {section}: {type(error).__name__}: {error}", file=sys.stderr)
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    if args.auto_table and isinstance(result.get("auto"), dict) and "error" not in result["auto"]:
        write_auto_table(args.auto_table, result["auto"], device_line)
    deferred_ok = result.get("deferred", {}).get("ok", True)
    return 1 if failed or not deferred_ok else 0


if __name__ == "__main__":
    sys.exit(main())
