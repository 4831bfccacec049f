"""A factored decoder bundle as an ONNX Runtime GenAI model (``export BUNDLE --genai``).

ONNX Runtime GenAI (package ``onnxruntime-genai``) loads a folder holding a decoder graph, a
``genai_config.json`` that names the graph's inputs and outputs, and the tokenizer files its own
tokenizer (onnxruntime-extensions) reads. Its multi-adapter API is ONNX Runtime's:
``og.Adapters(model).load(path, name)`` reads an ``.onnx_adapter`` and
``generator.set_active_adapter(adapters, name)`` adds it to the RunOptions of every run of that
generator, overriding the graph inputs it names. That is exactly how ``model_adapter.onnx`` of a
factored bundle takes its task (input ``task_slice`` with an empty default), so MetaTT's own form
serves as it is, without GenAI's model builder: the bundle root becomes the GenAI model folder,
and every ``tasks/NAME.onnx_adapter`` (a few hundred bytes) is a GenAI adapter.

What GenAI needs besides the graph:

- ``genai_config.json``: model type ``decoder`` (GenAI's generic decoder-only model; the
  architecture-specific types carry fixes for graphs its builder writes), the graph's I/O names
  (optimum's: ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.%d.key`` ...
  -> ``logits``, ``present.%d.key`` ...), head counts and sizes, context length, bos/eos/pad ids,
  and ``past_present_share_buffer: false`` (the graph concatenates past and new keys itself; a
  shared buffer needs the builder's GroupQueryAttention).
- Tokenizer files that onnxruntime-extensions reads into the same ids as transformers. A
  byte-level BPE converted from GGUF (the embedded SmolLM2) carries a SentencePiece-style
  decoder (ByteFallback, Replace "▁") and ``tokenizer_class: LlamaTokenizer``; from those
  onnxruntime-extensions builds a SentencePiece BPE that maps every space-prefixed word of a
  prompt to id -1 (garbled generations). Written here: the decoder reset to ByteLevel and the
  class to GPT2Tokenizer for byte-level BPEs (encoding in transformers is unchanged: the decoder
  only turns ids back into text), and the chat template inside tokenizer_config.json.

The export checks both, with onnxruntime-genai itself: token ids of probe texts (plain and in
the chat template) equal transformers' and decode back to the same text, else a one-line error
and nothing is left behind; and greedy answers per task against the PyTorch adapter (reported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from metatt_deploy.adapters.base_model import friendly_load
from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.common.files import atomic_write_json, check_utf8, read_json
from metatt_deploy.export.factored import load_bundle
from metatt_deploy.inference.formats import (
    ADAPTER_GRAPH,
    BASE_DIR,
    BUNDLE_JSON,
    GENAI_CONFIG,
    context_length,
    is_decoder_bundle,
    read_bundle,
    task_file,
    task_records,
)
from metatt_deploy.inference.genai import genai_eos_ids, genai_tokens, import_genai

GENAI_TOKENIZER = "tokenizer.json"
GENAI_TOKENIZER_CONFIG = "tokenizer_config.json"
GENAI_FILES = (GENAI_CONFIG, GENAI_TOKENIZER, GENAI_TOKENIZER_CONFIG)
GENAI_MODEL_TYPE = "decoder"
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
PROBES = (
    "Review: a gripping film, I loved it! Sentiment?",
    "Premise: A man plays.  Hypothesis: ... Answer:",
    "Hello world  é ü 日本 \t tabs\n\nnew 12345 3.14 don't I'm",
    " leading space, trailing space ",
    "a\n\n\nb  c   d\r\nCRLF",
    "emoji 😀🎉 ok",
)
CHECK_NEW_TOKENS = 8


def genai_config(hf_config: Any, generation_config: Any, graph_file: str = ADAPTER_GRAPH) -> dict:
    """The genai_config.json of an optimum ``text-generation-with-past`` graph of ``hf_config``'s model."""
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    hidden = int(hf_config.hidden_size)
    head_size = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    context = context_length(hf_config.to_dict())
    if context is None:
        raise MetaTTError("the model config names no context length (max_position_embeddings); GenAI needs one")

    def pick(key: str) -> Any:
        value = getattr(generation_config, key, None)
        return value if value is not None else getattr(hf_config, key, None)

    eos = pick("eos_token_id")
    if eos is None:
        raise MetaTTError("the model has no eos_token_id (config or generation config); GenAI needs one to stop")
    pad = pick("pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    bos = pick("bos_token_id")
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "bos_token_id": bos if bos is not None else pad,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": int(hf_config.vocab_size),
            "context_length": context,
            "decoder": {
                "filename": graph_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_size,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": int(hf_config.num_hidden_layers),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": context,
            "min_length": 0,
            "past_present_share_buffer": False,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
            "early_stopping": True,
        },
    }


def _has_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []) or [])


def genai_tokenizer_files(tokenizer_dir: Path) -> tuple[dict, dict, dict]:
    """tokenizer.json and tokenizer_config.json as onnxruntime-extensions reads them, plus what was changed."""
    source = tokenizer_dir / GENAI_TOKENIZER
    if not source.is_file():
        raise MetaTTError(f"{tokenizer_dir} has no {GENAI_TOKENIZER} (a fast tokenizer); ONNX Runtime GenAI reads only that form")
    data = read_json(source, "tokenizer")
    config = (
        read_json(tokenizer_dir / GENAI_TOKENIZER_CONFIG, "tokenizer config") if (tokenizer_dir / GENAI_TOKENIZER_CONFIG).is_file() else {}
    )
    changes: dict[str, Any] = {}
    if data.get("model", {}).get("type") == "BPE" and _has_byte_level(data.get("pre_tokenizer")):
        if data.get("decoder") != BYTE_LEVEL_DECODER:
            changes["decoder"] = {"from": (data.get("decoder") or {}).get("type"), "to": "ByteLevel"}
            data["decoder"] = BYTE_LEVEL_DECODER
        if config.get("tokenizer_class") != "GPT2Tokenizer":
            changes["tokenizer_class"] = {"from": config.get("tokenizer_class"), "to": "GPT2Tokenizer"}
            config["tokenizer_class"] = "GPT2Tokenizer"
    template = tokenizer_dir / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        check_utf8(template, "chat template")
        config["chat_template"] = template.read_text(encoding="utf-8")
        changes["chat_template"] = "inlined into tokenizer_config.json"
    return data, config, changes


def check_tokenizer(og_tokenizer: Any, hf_tokenizer: Any) -> int:
    """Probe texts (and their chat-template prompts) encode to transformers' ids and decode back; returns the count."""
    texts = list(PROBES)
    if getattr(hf_tokenizer, "chat_template", None):
        try:
            texts += [
                hf_tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                for p in PROBES
            ]
        except jinja2.TemplateError as e:  # a damaged chat_template.jinja
            raise MetaTTError(f"the tokenizer's chat template does not render ({first_line(e)}); re-save the tokenizer") from None
    for text in texts:
        expected = list(hf_tokenizer(text).input_ids)
        got = [int(i) for i in og_tokenizer.encode(text)]
        if got != expected:
            k = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise MetaTTError(
                f"ONNX Runtime GenAI's tokenizer encodes {text[:40]!r} differently from transformers (from token {k}: "
                f"{got[k : k + 6]} vs {expected[k : k + 6]}); this tokenizer is not supported by GenAI as written"
            )
        back = og_tokenizer.decode(np.array(expected, dtype=np.int32))
        want = hf_tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if back != want:
            raise MetaTTError(f"ONNX Runtime GenAI's tokenizer decodes {text[:40]!r} as {back[:40]!r} (transformers: {want[:40]!r})")
    return len(texts)


def export_genai(bundle: str | Path, *, force: bool = False) -> dict:
    """Make a factored decoder bundle an ONNX Runtime GenAI model folder; returns the record stored in bundle.json.

    Writes genai_config.json and the tokenizer files at the bundle root (beside model_adapter.onnx:
    GenAI refuses graph paths outside its folder), checks the tokenizer ids with GenAI (else removes
    them again: one-line error), and reports greedy parity per task against the PyTorch adapter.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    og = import_genai()
    bundle = Path(bundle)
    info = read_bundle(bundle)
    if not is_decoder_bundle(info) or not info.get("onnx"):
        raise MetaTTError(f"{bundle} is not a factored bundle of a causal LM with ONNX graphs; --genai needs one (merge --factored)")
    if info.get("genai") and not force:
        raise MetaTTError(f"{bundle} already holds GenAI files ({GENAI_CONFIG}); pass --force to write them again")
    base = bundle / info.get("base_dir", BASE_DIR)
    hf_config = friendly_load(lambda: AutoConfig.from_pretrained(base), str(base), "model config")
    has_generation = (base / "generation_config.json").is_file()
    generation = friendly_load(lambda: GenerationConfig.from_pretrained(base), str(base), "generation config") if has_generation else None
    config = genai_config(hf_config, generation)
    tokenizer_json, tokenizer_config, changes = genai_tokenizer_files(base)
    written = [bundle / name for name in GENAI_FILES]
    try:
        atomic_write_json(bundle / GENAI_TOKENIZER, tokenizer_json)
        atomic_write_json(bundle / GENAI_TOKENIZER_CONFIG, tokenizer_config)
        atomic_write_json(bundle / GENAI_CONFIG, config)
        try:
            model = og.Model(str(bundle))
        except (RuntimeError, UnicodeDecodeError) as e:  # a corrupt graph or config (whose bytes in GenAI's message may not be UTF-8)
            raise MetaTTError(f"ONNX Runtime GenAI cannot load {bundle} ({first_line(e)}); rebuild it with merge --factored") from None
        hf_tokenizer = friendly_load(lambda: AutoTokenizer.from_pretrained(base), str(base), "tokenizer")
        probes = check_tokenizer(og.Tokenizer(model), hf_tokenizer)
        parity = _parity(og, model, bundle, info, hf_tokenizer, load_bundle(bundle))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if info.get("genai"):  # --force over earlier GenAI files: the record goes with them
            atomic_write_json(
                bundle / BUNDLE_JSON, {k: v for k, v in read_json(bundle / BUNDLE_JSON, "bundle description").items() if k != "genai"}
            )
        raise
    sizes = {r["task"]: task_file(bundle, r, "onnx_adapter").stat().st_size for r in task_records(bundle, info)}
    record = {
        "config": GENAI_CONFIG,
        "graph": ADAPTER_GRAPH,
        "model_type": GENAI_MODEL_TYPE,
        "onnxruntime_genai": getattr(og, "__version__", "unknown"),
        "tokenizer_changes": changes,
        "tokenizer_probes_identical": probes,
        "parity": parity,
        "adapter_bytes": sizes,
        "graph_bytes": (bundle / ADAPTER_GRAPH).stat().st_size,
    }
    atomic_write_json(bundle / BUNDLE_JSON, {**read_json(bundle / BUNDLE_JSON, "bundle description"), "genai": record})
    return record


def _parity(og: Any, model: Any, bundle: Path, info: dict, tokenizer: Any, mtm: Any) -> dict:
    """Greedy answers (CHECK_NEW_TOKENS tokens) of GenAI vs the PyTorch adapter, per task, on two probe prompts."""
    import torch

    adapters = og.Adapters(model)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        if getattr(tokenizer, "chat_template", None)
        else tokenizer(p).input_ids
        for p in PROBES[:2]
    ]
    eos = genai_eos_ids(bundle)
    out: dict[str, Any] = {"prompts": len(prompts), "new_tokens": CHECK_NEW_TOKENS, "tasks": {}}
    for rec in task_records(bundle, info):
        task = rec["task"]
        adapters.load(str(task_file(bundle, rec, "onnx_adapter")), task)
        same = 0
        for ids in prompts:
            got = list(genai_tokens(og, model, adapters, task, ids, CHECK_NEW_TOKENS))
            x = torch.tensor([ids])
            with torch.no_grad():
                ref = mtm.generate(x, attention_mask=torch.ones_like(x), task_ids=task, max_new_tokens=CHECK_NEW_TOKENS, do_sample=False)
            expected = _until_eos(ref[0, len(ids) :].tolist(), eos)
            same += got == expected
        out["tasks"][task] = same
    out["identical"] = sum(out["tasks"].values())
    out["total"] = len(prompts) * len(out["tasks"])
    return out


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """``tokens`` up to and including the first EOS (GenAI yields the EOS, then stops; generate pads after it)."""
    for k, t in enumerate(tokens):
        if t in eos:
            return tokens[: k + 1]
    return tokens
