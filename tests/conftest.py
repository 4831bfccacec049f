"""Shared fixtures: a tiny BERT folder with the embedded tokenizer, a tiny JSONL task, fake builtin data sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_bert

from metatt_deploy.training.builtin_data import BUILTIN_TASKS, write_task
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
    save_tiny_bert(root)
    return root


@pytest.fixture(scope="session")
def tiny_base_128(tmp_path_factory) -> Path:
    """The tiny BERT with 128 positions: the CLI's defaults (max length, validate --seq-len) fit it."""
    root = tmp_path_factory.mktemp("tiny-base-128")
    save_tiny_bert(root, max_position_embeddings=128)
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


NLI = {"entailment": "is", "neutral": "may be", "contradiction": "is not"}


def nli_rows(n: int, offset: int) -> list[dict]:
    labels = list(NLI)
    return [
        {"premise": f"the cat {i} sleeps", "hypothesis": f"the cat {NLI[labels[i % 3]]} asleep", "label": labels[i % 3]}
        for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="session")
def fake_builtins(tmp_path_factory) -> Path:
    """A METATT_DATA_DIR holding small builds of the builtin tasks (no download, same format and info.json)."""
    root = tmp_path_factory.mktemp("builtin-data")
    for name, task in BUILTIN_TASKS.items():
        make = nli_rows if task.text_columns == ("premise", "hypothesis") else sentiment_rows
        splits = {split: make(n, offset) for split, n, offset in (("train", 40, 0), ("validation", 12, 100), ("test", 12, 200))}
        write_task(task, splits, root / name)
    return root
