"""Evolved Sampling through Hugging Face's Trainer and TRL's SFTTrainer, on tiny models built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainingArguments,
    default_data_collator,
)

from es_kernels.train.hf import (  # noqa: E402
    FUSED_PATH,
    INDEX_KEY,
    EvolvedConfig,
    EvolvedTrainer,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB, LENGTH = 260, 12


def tiny_lm(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


class TokenData(torch.utils.data.Dataset):
    """Fixed-length byte sequences; the first tokens of each are a masked prompt, some rows are left-padded."""

    def __init__(self, n: int, seed: int = 0, extra_column: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 256, (n, LENGTH), generator=generator)
        self.pad = torch.randint(0, 4, (n,), generator=generator)
        self.prompt = torch.randint(1, 4, (n,), generator=generator)
        self.extra_column = extra_column

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        pad, prompt = int(self.pad[i]), int(self.prompt[i])
        mask = torch.ones(LENGTH, dtype=torch.int64)
        mask[:pad] = 0
        labels = self.ids[i].clone()
        labels[: pad + prompt] = -100
        item = {"input_ids": self.ids[i], "attention_mask": mask, "labels": labels}
        if self.extra_column:
            item["text"] = f"row {i}"
        return item


def arguments(tmp_path: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class Recording(EvolvedTrainer):
    """Records what each optimizer step's micro-batches were, and what compute_loss saw."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[list[dict], object]] = []
        self.selected_ids: list[list[int]] = []

    def _build_evolved(self):
        evolved = super()._build_evolved()
        select = evolved.select

        def recording_select(*args, **kwargs):
            batch = select(*args, **kwargs)
            self.selected_ids.append(batch.indices.tolist())
            return batch

        evolved.select = recording_select
        return evolved

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.steps.append(([{k: v.clone() for k, v in b.items()} for b in batches], num_items))
        return batches, num_items


def trained_rows(model: torch.nn.Module) -> list[int]:
    """Rows of every forward run with gradients (the training forwards), via a hook on the model."""
    rows: list[int] = []

    def hook(module, args, kwargs):
        assert INDEX_KEY not in kwargs, "the sample id reached model(**inputs)"
        if torch.is_grad_enabled():
            rows.append(kwargs["input_ids"].shape[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def test_smoke_es_trains_k_of_b_rows(tmp_path):
    model = tiny_lm()
    rows = trained_rows(model)
    trainer = EvolvedTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=TokenData(32),
        data_collator=default_data_collator,
        evolved=EvolvedConfig("es", anneal_start=0.0, anneal_end=0.0),
    )
    trainer.train()
    assert rows == [2] * 8  # 2 epochs x 4 meta-batches of 8, k = 2
    assert trainer.evolved_scoring.path == FUSED_PATH
