"""Shared fixtures: a tiny BERT folder with the embedded tokenizer, and a tiny JSONL task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.training.data import load_task


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a shared, oversubscribed CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = {"positive": ["good", "great", "fine", "lovely", "happy"], "negative": ["bad", "awful", "poor", "sad", "boring"]}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer BERT of width 32 (with dropout, as real models have) and the embedded tokenizer."""
    root = tmp_path_factory.mktemp("tiny-base")
    tokenizer = load_tokenizer(None)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def sentiment_rows(n: int, offset: int) -> list[dict]:
    """Rows of a trivially learnable two-class task (the label word decides)."""
    rows = []
    for i in range(offset, offset + n):
        label = "positive" if i % 2 else "negative"
        words = WORDS[label]
        rows.append({"text": f"this was {words[i % 5]} and {words[(i // 5) % 5]} today", "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-data")
    for name, n, offset in (("train", 32, 0), ("validation", 16, 100), ("test", 16, 200)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n, offset)))
    return root


@pytest.fixture(scope="session")
def tiny_task(tiny_task_dir):
    return load_task(
        train=str(tiny_task_dir / "train.jsonl"),
        validation=str(tiny_task_dir / "validation.jsonl"),
        test=str(tiny_task_dir / "test.jsonl"),
    )
