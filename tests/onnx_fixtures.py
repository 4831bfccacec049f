"""A tiny random BERT with a non-trivial MetaTT adapter, merged, for the export/validate tests.

Shared by test_export.py and test_validate.py (pytest puts this folder on sys.path). The model
uses the embedded model's tokenizer (so real sentences tokenize) but only 2 layers of width 32;
``initializer_range`` is large enough that logits are of order 1, so a 1e-4 parity bound is a
real check and not satisfied by logits that are all near zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tiny_models import save_tiny_bert

from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.adapters.model import attach, build_config, get_adapter, save_adapter
from metatt_deploy.export.merge import merge_adapter
from metatt_deploy.tt import cores as tt

LABELS = ["negative", "positive"]
LABELLED = [
    ("A wonderful film, I loved every minute.", "positive"),
    ("Dull, slow and badly acted.", "negative"),
    ("One of the best things I have seen this year.", "positive"),
    ("I want my money back.", "negative"),
    ("Charming and funny.", "positive"),
    ("The script is a mess.", "negative"),
]


@dataclass
class Tiny:
    base: Path
    adapter: Path
    merged: Path


def build_tiny(root: Path, seed: int = 0) -> Tiny:
    """Base model folder, adapter folder (random no-no-no-no cores) and merged folder under ``root``."""
    tokenizer = load_tokenizer(None)
    base = root / "base"
    model = save_tiny_bert(
        base,
        seed,
        intermediate_size=64,
        max_position_embeddings=128,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    adapter_config = build_config(model, rank=4, base_model=str(base))
    attach(model, adapter_config)
    get_adapter(model).set_cores(tt.init_cores("no-no-no-no", adapter_config.core_shapes(), seed=1))
    adapter = save_adapter(model, root / "adapter", tokenizer)
    merged = root / "merged"
    merge_adapter(adapter, merged)
    return Tiny(base, adapter, merged)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
