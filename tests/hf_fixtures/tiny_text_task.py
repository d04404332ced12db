"""A tiny BERT and a learnable token-classification task, built locally (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

VOCAB_SIZE = 50
SEQUENCE_LENGTH = 8

TINY_RUN_ARGS: dict[str, Any] = dict(
    learning_rate=0.1,
    per_device_train_batch_size=8,
    max_steps=3,
    max_grad_norm=0.0,
    lr_scheduler_type="constant",
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
)
"""`TrainingArguments` settings for a short, deterministic CPU run: a constant lr, no
clipping, nothing saved or reported."""


def build_tiny_model(seed: int = 0) -> BertForSequenceClassification:
    """A one-layer BERT classifier without dropout, so that every run is deterministic."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQUENCE_LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def build_dataset(num_examples: int = 48, seed: int = 0) -> Dataset:
    """Random token sequences labelled by whether their second token is in the upper half."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB_SIZE, (num_examples, SEQUENCE_LENGTH), generator=generator)
    labels = (input_ids[:, 1] > VOCAB_SIZE // 2).long()
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "labels": labels.tolist(),
        }
    )
