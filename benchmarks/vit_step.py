"""End-to-end cost of Evolved Sampling in a ViT training step, and the analytic limit it should approach.

    python -m benchmarks.vit_step [--size full|ci] [--rounds N] [--json out.json]

Parts, each timed separately with a fresh autograd graph (model in train mode, 2 threads on CPU):

* ``baseline``: forward + backward on the meta-batch of B images (loss, ``backward``, grads reset to None);
* ``es``: the ES step — scoring forward on B under ``no_grad``, ``evolved_select`` (auto backend, default value
  checks, C = 1000 logits), then forward + backward on the k = B/4 selected images (gathered by index);
* ``select``: the ``evolved_select`` call alone on the scoring forward's logits;
* ``score_B``: forward on B under ``no_grad``; ``fwd_B``/``bwd_B`` and ``fwd_k``/``bwd_k``: forward with autograd
  recording, and backward alone (its forward done untimed just before), on B and on k.

Reported (per round, then the median over rounds): selection overhead = select / es step; measured ratio =
es / baseline; analytic limit =
(score_B + fwd_k + bwd_k) / (fwd_B + bwd_B) — the paper's (F(B) + F(k) + Bw(k)) / (F(B) + Bw(B)) with the
scoring forward measured as it runs (under no_grad); gap = measured / limit - 1, what ES costs beyond the ideal.

The optimizer step is left out of both steps: it does not depend on B, adds the same to both, and would only
pull the ratio towards 1. Rounds interleave the parts (one of each per round, medians over rounds), so a change
of machine load during the run shifts every part alike instead of skewing one of them.

Default size (CPU, "full"): a 4-block ViT-Tiny-width model (dim 192, 3 heads) on 32x32 images in 4x4 patches
(65 tokens), 1000 classes, B = 256, k = 64. Its step takes seconds on 2 cores, while a selection over 256 x 1000
logits takes well under a millisecond: the overhead is far below 1%, as on a GPU with a real ViT, where a step is
tens of milliseconds and a fused selection microseconds. B = 256 keeps k = 64 large enough that the forward and
backward on k scale with k (tiny batches under-use the cores and would make ES look worse than the model of its cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import pin_threads, synchronizer
from es_kernels import EvolvedState, evolved_select, last_backend

PARTS = ("baseline", "es", "select", "score_B", "fwd_B", "bwd_B", "fwd_k", "bwd_k")


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 32
    patch_size: int = 4
    depth: int = 4
    embed_dim: int = 192
    num_heads: int = 3
    num_classes: int = 1000
    batch: int = 256
    keep: int = 64
    rounds: int = 11


CONFIGS = {
    "full": ViTConfig(),
    # Harness check only: tiny enough for CI, too small for meaningful ratios.
    "ci": ViTConfig(img_size=16, patch_size=8, depth=1, embed_dim=48, num_heads=2, batch=32, keep=8, rounds=2),
}


class StepBench:
    """The model, one meta-batch, the ES state, and one timed callable (with its untimed setup) per part."""

    def __init__(self, config: ViTConfig, device: str = "cpu", backend: str = "auto") -> None:
        import timm  # lazily: only the ViT benchmark needs it

        self.config, self.device, self.backend = config, device, backend
        torch.manual_seed(0)
        self.model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=config.img_size, patch_size=config.patch_size,
            depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads,
            num_classes=config.num_classes,
        ).to(device).train()  # fmt: skip
        generator = torch.Generator().manual_seed(0)
        b = config.batch
        self.images = torch.randn(b, 3, config.img_size, config.img_size, generator=generator).to(device)
        self.labels = torch.randint(0, config.num_classes, (b,), generator=generator).to(device)
        self.num_samples = 1_000_000
        self.indices = torch.randperm(self.num_samples, generator=generator)[:b].to(device)
        self.state = EvolvedState(self.num_samples, device=device)
        self.generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            self.logits = self.model(self.images)
        self.sync = synchronizer(device)

    def _train(self, images, labels) -> None:
        F.cross_entropy(self.model(images), labels).backward()
        self.model.zero_grad(set_to_none=True)

    def _select(self, logits) -> torch.Tensor:
        return evolved_select(
            self.state, self.indices, self.config.keep, logits=logits, targets=self.labels,
            generator=self.generator, backend=self.backend,
        )  # fmt: skip

    def baseline(self) -> None:
        self._train(self.images, self.labels)

    def es(self) -> None:
        with torch.no_grad():
            logits = self.model(self.images)
        rows = self._select(logits)
        self._train(self.images[rows], self.labels[rows])

    def select(self) -> None:
        self._select(self.logits)

    def score_B(self) -> None:
        with torch.no_grad():
            self.model(self.images)

    def _forward(self, size: int) -> torch.Tensor:
        return F.cross_entropy(self.model(self.images[:size]), self.labels[:size])

    def fwd_B(self) -> None:
        self._forward(self.config.batch)

    def fwd_k(self) -> None:
        self._forward(self.config.keep)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def parts(self) -> dict[str, tuple]:
        """part -> (timed callable taking the setup's positional args, untimed setup or None)."""
        calls: dict[str, tuple] = {name: (getattr(self, name), None) for name in PARTS if not name.startswith("bwd")}
        calls["bwd_B"] = (self._backward, lambda: ((self._forward(self.config.batch),), {}))
        calls["bwd_k"] = (self._backward, lambda: ((self._forward(self.config.keep),), {}))
        return calls

    def time_part(self, name: str) -> float:
        call, setup = self.parts()[name]
        args = setup()[0] if setup is not None else ()
        self.sync()
        start = time.perf_counter()
        call(*args)
        self.sync()
        return time.perf_counter() - start


def summarize(times: dict[str, float]) -> dict[str, float]:
    """The derived figures from one time per part (seconds)."""
    limit = (times["score_B"] + times["fwd_k"] + times["bwd_k"]) / (times["fwd_B"] + times["bwd_B"])
    ratio = times["es"] / times["baseline"]
    return {
        "select_percent_of_es_step": 100 * times["select"] / times["es"],
        "select_percent_of_baseline_step": 100 * times["select"] / times["baseline"],
        "es_over_baseline": ratio,
        "analytic_limit": limit,
        "gap_percent": 100 * (ratio / limit - 1),
    }


def measure(config: ViTConfig, device: str = "cpu", backend: str = "auto", rounds: int | None = None) -> dict:
    bench = StepBench(config, device, backend)
    for name in PARTS:  # warm-up: allocator, timm's lazy paths, the extension's first call
        bench.time_part(name)
    samples: dict[str, list[float]] = {name: [] for name in PARTS}
    for _ in range(rounds or config.rounds):
        for name in PARTS:
            samples[name].append(bench.time_part(name))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    # The figures are medians of per-round figures: the parts of one round ran within seconds of each other, so a
    # load change between rounds cancels in each round's ratios (medians of the parts would mix rounds).
    per_round = [summarize({name: samples[name][i] for name in PARTS}) for i in range(len(samples["es"]))]
    summary = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    gaps = [r["gap_percent"] for r in per_round]
    quartiles = statistics.quantiles(gaps, n=4) if len(gaps) > 1 else gaps * 3
    summary["gap_percent_quartiles"] = [quartiles[0], quartiles[2]]
    return {
        "config": asdict(config),
        "device": device,
        "backend": last_backend(),
        "threads": torch.get_num_threads(),
        "seconds": medians,
        "samples": samples,
        "per_round": per_round,
        "summary": summary,
    }


def markdown(result: dict) -> str:
    c, s, d = result["config"], result["seconds"], result["summary"]
    lines = [
        f"ViT (depth {c['depth']}, dim {c['embed_dim']}, {c['img_size']}x{c['img_size']} images, patch "
        f"{c['patch_size']}, {c['num_classes']} classes), B = {c['batch']}, k = {c['keep']}, {result['device']}, "
        f"{result['threads']} threads, selection backend {result['backend']}; medians of {len(result['samples']['es'])}"
        " interleaved rounds",
        "",
        "| part | time (ms) |",
        "|:---|---:|",
    ]
    labels = {
        "baseline": "baseline step: fwd + bwd on B",
        "es": "ES step: no_grad fwd on B + select + fwd + bwd on k",
        "select": "evolved_select alone",
        "score_B": "F(B), scoring forward (no_grad)",
        "fwd_B": "F(B), forward with autograd",
        "bwd_B": "Bw(B)",
        "fwd_k": "F(k)",
        "bwd_k": "Bw(k)",
    }
    lines += [f"| {labels[name]} | {1e3 * s[name]:.3f} |" for name in PARTS]
    lines += [
        "",
        "| figure | value |",
        "|:---|---:|",
        f"| selection overhead, % of the ES step | {d['select_percent_of_es_step']:.4f}% |",
        f"| selection overhead, % of the baseline step | {d['select_percent_of_baseline_step']:.4f}% |",
        f"| measured ES / baseline step | {d['es_over_baseline']:.3f} |",
        f"| analytic limit (F(B) + F(k) + Bw(k)) / (F(B) + Bw(B)) | {d['analytic_limit']:.3f} |",
        f"| gap to the limit | {d['gap_percent']:+.1f}% |",
        "| gap, quartiles over rounds | {:+.1f}% .. {:+.1f}% |".format(*d["gap_percent_quartiles"]),
        "",
        "Figures are medians over rounds of each round's figure; part times are medians over rounds.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="meta-batch B (k = B/4)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        pin_threads()
    config = CONFIGS[args.size]
    if args.batch is not None:
        config = ViTConfig(**{**asdict(config), "batch": args.batch, "keep": args.batch // 4})
    result = measure(config, args.device, args.backend, args.rounds)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
