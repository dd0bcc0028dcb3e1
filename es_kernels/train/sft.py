"""es-sft: supervised fine-tuning of a causal LM with Evolved Sampling through Hugging Face's Trainer.

    es-sft --demo                       # tiny byte-level Qwen2 from a config, Python's own docs, nothing downloaded
    es-sft --demo --quick               # the same, reduced (the test suite runs it)
    es-sft --model Qwen/Qwen2.5-0.5B --data pairs.jsonl --methods eswp --epochs 3

The demo fine-tunes on ``pydoc_data.topics`` (about 465k characters shipped with Python) as prompt/response pairs:
the prompt ``"<topic>:\\n"`` plus the text before a cut is masked with ``ignore_index``; the response after the cut
is scored. Baseline (batch k) vs ES and ESWP (meta-batch B = k / select_ratio, k back-propagated) over the same
epochs; prints held-out loss and perplexity, wall-clock, back-propagated sequences and tokens and the time saved,
writes them as JSON and plots held-out loss against wall-clock and against back-propagated tokens.

Timing: each method's run is repeated (``--repeats``, round-robin over the methods, their order rotated each round)
and the table gives the median wall-clock with its spread, and the median of the per-round ratios to the baseline's
time with their spread (time saved = 1 - that median). Before the
clock starts, every method trains one step on a throwaway model (the scoring path's first call: Triton compiling its
kernels on a GPU took 3.8 s, more than the baseline's whole quick run): no first-call cost is charged to a method.

With ``--model`` (a hub name or a local folder) and ``--data`` (JSON lines with ``prompt`` and ``completion``, or
``text``), the same trainer fine-tunes a real model; without a reachable hub or local folder it stops at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from es_kernels import _timing
from es_kernels.command import HelpFormatter, prog_name
from es_kernels.policies import POLICIES
from es_kernels.train.progress import add_progress_argument, shows_progress

BOS, EOS, PAD = 256, 257, 258
DEMO_VOCAB = 259
METHOD_CHOICES = tuple(POLICIES)  # every method of es_kernels.policies
SPREAD_LIMIT = 0.10  # a median whose runs spread more than this is not quoted without a warning


# ------------------------------------------------------------------------------------------ demo data


def topic_pairs(length: int, *, seed: int = 0) -> list[dict[str, list[int]]]:
    """Byte-level prompt/response windows over every pydoc topic, in a fixed order; prompt tokens are masked."""
    from pydoc_data.topics import topics

    rows = []
    for name in sorted(topics):
        text = topics[name].encode("utf-8", "replace")
        prompt_head = f"{name}:\n".encode()
        step = length // 2
        for start in range(0, max(1, len(text) - step), step):
            context, response = text[start : start + step // 2], text[start + step // 2 : start + step * 2]
            prompt = [BOS, *prompt_head[:16], *context]
            ids = (prompt + list(response) + [EOS])[:length]
            labels = [-100] * len(prompt) + ids[len(prompt) :]
            pad = length - len(ids)
            rows.append(
                {
                    "input_ids": ids + [PAD] * pad,
                    "attention_mask": [1] * len(ids) + [0] * pad,
                    "labels": labels[:length] + [-100] * pad,
                }
            )
    random.Random(seed).shuffle(rows)
    return rows


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(value) for key, value in self.rows[index].items()}


def demo_model(layers: int, hidden: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=DEMO_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


# ------------------------------------------------------------------------------------------ one run


def run_method(method: str, model, train, held_out, options: argparse.Namespace) -> dict[str, Any]:
    from transformers import TrainerCallback, TrainingArguments, default_data_collator

    from es_kernels.train.hf import EvolvedConfig, EvolvedTrainer

    config = EvolvedConfig(method, select_ratio=options.select_ratio, anneal_start=0.0, anneal_end=0.0)
    # Batch-level selectors score B = b / select_ratio rows and train b; every other method trains its b rows.
    batch = options.batch_size if not config.policy.selects else round(options.batch_size / options.select_ratio)
    args = TrainingArguments(
        output_dir=str(Path(options.out) / "runs" / method),
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=64,
        num_train_epochs=options.epochs,
        learning_rate=options.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        eval_strategy="epoch",
        eval_on_start=True,
        save_strategy="no",
        logging_strategy="epoch",
        disable_tqdm=not shows_progress(not options.no_progress),
        seed=options.seed,
        dataloader_num_workers=0,
    )
    curve: list[dict[str, float]] = []
    clock = {"train": 0.0, "since": None}

    class Curve(TrainerCallback):
        # Wall-clock of training only: evaluation time is taken out. On a GPU the queue is drained at both ends, so
        # an epoch's kernels are charged to it, not to the evaluation that follows.
        def on_epoch_begin(self, args, state, control, **kwargs):
            synchronize()
            clock["since"] = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            synchronize()
            clock["train"] += time.perf_counter() - clock["since"]

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            stats = trainer.evolved_stats
            curve.append(
                {
                    "epoch": state.epoch or 0.0,
                    "seconds": clock["train"],
                    "tokens": stats["trained_tokens"],
                    "sequences": stats["trained_sequences"],
                    "loss": metrics["eval_loss"],
                }
            )

    trainer = EvolvedTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=default_data_collator,
        evolved=config,
        callbacks=[Curve()],
    )
    trainer.train()
    final = curve[-1]
    return {
        "method": method,
        "batch": batch,
        "held_out_loss": final["loss"],
        "perplexity": math.exp(final["loss"]),
        "seconds": clock["train"],
        "sequences": trainer.evolved_stats["trained_sequences"],
        "tokens": trainer.evolved_stats["trained_tokens"],
        "scoring_path": trainer.evolved_scoring.path,
        "curve": curve,
    }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def warm_up(methods: list[str], train, held_out, options: argparse.Namespace) -> None:
    """One training step of every method on a throwaway model, outside the clock: the scoring path's first call
    (Triton compiling its kernels on a GPU), the optimizer's first step and the Trainer's own set-up."""
    tiny = copy.copy(options)
    tiny.epochs = 1
    tiny.out = str(Path(options.out) / "warm-up")
    rows = round(options.batch_size / options.select_ratio)  # one meta-batch: the shapes of a real step
    for method in methods:
        model = demo_model(options.layers, options.hidden, options.seed)
        run_method(method, model, Rows(train.rows[:rows]), Rows(held_out.rows[:2]), tiny)


def schedule(methods: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, method) in running order: round-robin, the methods' order rotated by one each round."""
    order = []
    for repeat in range(repeats):
        shift = repeat % len(methods)
        order.extend((repeat, method) for method in methods[shift:] + methods[:shift])
    return order


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: the first repeat's losses and counts (repeats differ in time only), the median wall-clock over
    repeats with its spread, and the median of its per-round time over the baseline's with its spread."""
    baseline = {r["repeat"]: r["seconds"] for r in runs if r["method"] == "baseline"}
    results = []
    for method in methods:
        group = [r for r in runs if r["method"] == method]
        seconds = [r["seconds"] for r in group]
        ratios = [r["seconds"] / baseline[r["repeat"]] for r in group if baseline]
        first = min(group, key=lambda r: r["repeat"])
        results.append(
            {
                **first,
                "seconds": statistics.median(seconds),
                "seconds_spread": _timing.relative_spread(seconds),
                "seconds_samples": seconds,
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_spread": _timing.relative_spread(ratios) if ratios else None,
                "repeats_agree": len({r["held_out_loss"] for r in group}) == 1,
            }
        )
    return results


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        curve = result["curve"]
        by_time.plot([p["seconds"] for p in curve], [p["loss"] for p in curve], marker="o", label=result["method"])
        by_tokens.plot([p["tokens"] for p in curve], [p["loss"] for p in curve], marker="o", label=result["method"])
    by_time.set(xlabel="training wall-clock (s)", ylabel="held-out loss (nats/token)")
    by_tokens.set(xlabel="back-propagated tokens", ylabel="held-out loss (nats/token)")
    for axes in (by_time, by_tokens):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("es-sft demo: tiny byte-level Qwen2 on pydoc topics")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| method | batch | held-out loss | perplexity | wall-clock (s), median (spread) | / baseline, median (spread) "
        "| back-prop sequences | back-prop tokens | time saved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r.get("ratio")
        saved = "-" if ratio is None or r["method"] == "baseline" else f"{1 - ratio:.0%}"
        loss = f"{r['held_out_loss']:.3f}" + ("" if r.get("repeats_agree", True) else " (repeats differ)")
        lines.append(
            f"| {r['method']} | {r['batch']} | {loss} | {r['perplexity']:.2f} | "
            f"{_timing.with_spread(r['seconds'], r.get('seconds_spread'), 1)} | "
            f"{_timing.with_spread(ratio, r.get('ratio_spread'), 2)} | {r['sequences']:,} | {r['tokens']:,} | {saved} |"
        )
    return "\n".join(lines)


def demo(options: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(options.threads)
    rows = topic_pairs(options.length, seed=options.seed)
    held = 32 if options.quick else 128
    rows = rows[: held + (64 if options.quick else options.train_size)]
    held_out, train = Rows(rows[:held]), Rows(rows[held:])
    print(f"es-sft demo: {len(train)} training and {len(held_out)} held-out sequences of {options.length} bytes")
    started = time.perf_counter()
    timed = _timing.TimedRuns()
    warm_up(options.methods, train, held_out, options)
    runs = []
    with timed:
        for repeat, method in schedule(options.methods, options.repeats):
            model = demo_model(options.layers, options.hidden, options.seed)
            timed.before_run()
            runs.append({**run_method(method, model, train, held_out, options), "repeat": repeat})
    results = summarise(runs, options.methods)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    print(table(results))
    print(
        f"medians over {options.repeats} interleaved run(s) per method; spread = interquartile range / median "
        "(range / median under 4 runs); every method trained one untimed step first (scoring path's first call, "
        "kernel compilation, optimizer set-up): no first-call cost is charged to a method"
    )
    print(f"total {time.perf_counter() - started:.0f}s; {options.threads} torch thread(s), {_timing.cores()} cores")
    timed.report(options.threads, [r["seconds_samples"] for r in results], SPREAD_LIMIT)
    (out / "sft_demo.json").write_text(json.dumps(results, indent=1))  # each row holds its repeats' seconds
    plot(results, out / "sft_demo.png")
    print(f"wrote {out / 'sft_demo.json'} and {out / 'sft_demo.png'}")
    return results


# ------------------------------------------------------------------------------------------ a real model


def resolve_model(name: str) -> None:
    """Fail at once, with the reason, if ``name`` is neither a local folder nor reachable on the hub (or cached)."""
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise SystemExit(f"es-sft: --model {name} is a folder without config.json; not a transformers model")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"es-sft: --model {name!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"(offline, unreachable or no such model): {str(error).splitlines()[0]}"
        ) from None


def read_jsonl(path: str, tokenizer, length: int) -> list[dict[str, list[int]]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt" in record and "completion" in record:
                prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
                response = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            elif "text" in record:
                prompt, response = [], tokenizer(record["text"])["input_ids"]
            else:
                raise SystemExit(f"es-sft: {path}:{number} needs 'prompt' and 'completion', or 'text'")
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids = (prompt + response + eos)[:length]
            labels = ([-100] * len(prompt) + response + eos)[:length]
            pad = length - len(ids)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            rows.append(
                {
                    "input_ids": ids + [pad_id] * pad,
                    "attention_mask": [1] * len(ids) + [0] * pad,
                    "labels": labels + [-100] * pad,
                }
            )
    if not rows:
        raise SystemExit(f"es-sft: {path} holds no rows")
    return rows


def finetune(options: argparse.Namespace) -> list[dict[str, Any]]:
    if not options.data or not Path(options.data).is_file():
        raise SystemExit(f"es-sft: --data {options.data!r} is not a file (JSON lines with prompt/completion or text)")
    resolve_model(options.model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(options.model)
    rows = read_jsonl(options.data, tokenizer, options.length)
    held = max(1, len(rows) // 20)
    model = AutoModelForCausalLM.from_pretrained(options.model)
    results = []
    for method in options.methods:
        results.append(run_method(method, model, Rows(rows[held:]), Rows(rows[:held]), options))
        model = AutoModelForCausalLM.from_pretrained(options.model)
    print(table(results))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog_name("es_kernels.train.sft", "es-sft"), description=__doc__, formatter_class=HelpFormatter
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--demo", action="store_true", help="tiny model from a config on pydoc topics; no download")
    what.add_argument("--model", help="hub name or local folder of a causal LM")
    parser.add_argument("--data", help="JSON lines with prompt/completion (or text); with --model")
    parser.add_argument("--quick", action="store_true", help="reduced demo (64 sequences, 1 epoch; for tests)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_CHOICES,
        default=["baseline", "es", "eswp"],
        help="methods to run one after another from the same initial model",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: 3 (demo), 1 (--quick)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="demo runs per method, interleaved; default: 3 (demo), 1 (--quick)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="k: sequences back-propagated per step")
    parser.add_argument(
        "--select-ratio", type=float, default=0.25, help="k/B; ES-family methods score B = k / ratio per step"
    )
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--train-size", type=int, default=3072, help="demo training sequences (128 more held out)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear decay to 0)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the demo model")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the demo model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on a shared machine)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the data split and the selection")
    parser.add_argument("--out", default="es_sft_out", help="folder for the JSON, the plot and run outputs")
    add_progress_argument(parser)
    return parser


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The command without exiting: returns each method's results."""
    options = build_parser().parse_args(argv)
    if options.epochs is None:
        options.epochs = 1 if options.quick else 3
    if options.repeats is None:
        options.repeats = 1 if options.quick else 3
    if options.repeats < 1:
        raise SystemExit(f"es-sft: --repeats must be at least 1, got {options.repeats}")
    if not 0.0 < options.select_ratio <= 1.0:
        raise SystemExit(f"es-sft: --select-ratio must be in (0, 1], got {options.select_ratio}")
    if options.model is not None:
        return finetune(options)
    return demo(options)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
