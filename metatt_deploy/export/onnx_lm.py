"""Exporting a causal language model to ONNX with a KV cache, checked against PyTorch.

optimum's ``text-generation-with-past`` task writes one graph, ``model.onnx``, taking
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.*`` and returning
``logits`` and ``present.*``: the prompt runs with an empty cache, every later token with the
cache of the step before. ``optimum.onnxruntime.ORTModelForCausalLM`` loads the bundle as it is
and runs ``generate()`` on it. The bundle keeps the tokenizer, chat template and generation
config, so it serves without the source folder.

Parity, on ``SAMPLE_PROMPTS`` formatted with the model's chat template and run through the
bundle as served (ORTModelForCausalLM on the CPU execution provider):

- teacher-forced logits of every prompt position, enforced for fp32 at ``fp32_tolerance``:
  ``FP32_ATOL`` (1e-4) times ``max(1, max |logit| / LOGIT_SCALE)``. Decoder logits are large
  (SmolLM2's reach 38 on the chat template's first tokens) and float32 rounding grows with them:
  the untouched SmolLM2 exports at 9.5e-5 and a merged MetaTT-4D adapter at 1.06e-4, both
  2.5-2.8e-6 of the largest logit, so a flat 1e-4 fails on rounding alone. Logits up to
  LOGIT_SCALE (10, the range of classifier logits) keep the flat 1e-4;
- greedy continuations of ``PARITY_NEW_TOKENS`` tokens, which must be token-identical for fp32;
- int8 / int4 exports report both (agreement instead of identity); what gates them is the quality
  gate (export/quality.py): greedy agreement and perplexity against the fp32 graph on calibration data.

A tied embedding that optimum writes twice (Gemma-3: the LM head as its own transposed constant)
is stored once (int4.tie_duplicate_head), so the fp32 size counts one copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from metatt_deploy.adapters.base_model import friendly_load
from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.export.decoder_runs import chat_prompts, greedy, load_ort_decoder, teacher_forced_logits, teacher_forced_logits_tensor
from metatt_deploy.export.int4 import quantize_int4, store_tied_table_once
from metatt_deploy.export.onnx_files import graph_fields, has_external_data, model_bytes, replace_model
from metatt_deploy.export.options import ExportOptions
from metatt_deploy.export.parity import GRAPH_HINT, References, describe, enforce, logit_parity, reference_logits
from metatt_deploy.export.quality import decoder_examples, decoder_quality, judge_decoder, score_decoder
from metatt_deploy.export.quantize import DECODER_INT8_EXCLUDE, quantize_dynamic_int8
from metatt_deploy.inference.formats import CAUSAL_LM, DECODER_PIPELINE, ONNX_NAME, context_length

FP32_ATOL = 1e-4
LOGIT_SCALE = 10.0


def fp32_tolerance(max_abs_logit: float) -> float:
    """1e-4, scaled up for logits beyond LOGIT_SCALE in magnitude (float32 rounding is relative)."""
    return FP32_ATOL * max(1.0, max_abs_logit / LOGIT_SCALE)


PARITY_NEW_TOKENS = 12
SAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Is the sentiment of this movie review positive or negative? Answer with one word: positive or negative.\n\n"
    "Review: A gripping, beautifully shot film with a superb cast.",
    "Write a haiku about the sea.",
    "Premise: A man is playing a guitar on stage.\nHypothesis: A person is performing music.\nDoes the premise entail the hypothesis?",
    "List three colours.",
]


def export_decoder_into(
    tmp: Path,
    source: Path,
    hf_config: Any,
    options: ExportOptions,
) -> dict:
    """Export ``source`` (a causal-LM folder) into ``tmp`` and check it; returns the manifest's export fields."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantize, gate = options.quantize, options.gate  # the options a decoder does not take were refused by its kind (export/kinds.py)
    tokenizer = friendly_load(lambda: AutoTokenizer.from_pretrained(source), str(source), "tokenizer")
    reference = friendly_load(lambda: AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), str(source), "model").eval()
    prompts = chat_prompts(tokenizer, SAMPLE_PROMPTS)
    eos, pad = reference.generation_config.eos_token_id, tokenizer.pad_token_id
    ref_tokens = [greedy(reference, p, PARITY_NEW_TOKENS, eos, pad) for p in prompts]
    refs = reference_logits(reference, teacher_forced_logits_tensor, prompts)
    del reference

    _run_main_export(source, tmp, options.opset)
    tied = store_tied_table_once(tmp)
    fields: dict[str, Any] = {
        "pipeline_task": DECODER_PIPELINE,
        "task_type": CAUSAL_LM,
        "model_type": hf_config.model_type,
        "labels": {},
        **graph_fields(tmp / ONNX_NAME),
        "kv_cache": True,
        "variant": {"dtype": "fp32", "optimize": False, "quantize": quantize},
    }
    if tied:
        fields["tied_embedding"] = {"stored_once": tied, "note": "the LM head reads the embedding table through a Transpose"}
    sizes = {"fp32_bytes": model_bytes(tmp)}
    fp32_model = load_ort_decoder(tmp)
    fp32 = _parity(fp32_model, prompts, refs, ref_tokens, eos, pad, quantize=None)
    _enforce(fp32, "the fp32 ONNX export")
    final = fp32
    if quantize:
        examples, calibration = decoder_examples(gate, tokenizer, context_length(hf_config.to_dict()) or 2048)
        fp32_scores = score_decoder(fp32_model, examples, eos, pad)
    del fp32_model
    external = has_external_data(tmp)
    if quantize == "int8":
        fields["quantization"] = replace_model(
            tmp, lambda path: quantize_dynamic_int8(tmp / ONNX_NAME, path, external=external, exclude=DECODER_INT8_EXCLUDE)
        )
    elif quantize == "int4":
        fields["quantization"] = replace_model(tmp, lambda path: quantize_int4(tmp / ONNX_NAME, path, options.int4, external=external))
    if quantize:
        quantized = load_ort_decoder(tmp)
        final = _parity(quantized, prompts, refs, ref_tokens, eos, pad, quantize=quantize)
        final["note"] = f"{quantize} logits and tokens are reported; the quality gate judges them"
        _enforce(final, f"the {quantize} ONNX export")
        scores = score_decoder(quantized, examples, eos, pad, reference=fp32_scores)
        fields["quality_gate"] = judge_decoder(decoder_quality(fp32_scores, scores), gate, quantize, calibration)
    sizes["final_bytes"] = model_bytes(tmp)
    fields["sizes"] = sizes
    fields["parity"] = {
        "reference": "PyTorch causal LM (AutoModelForCausalLM) on CPU: logits in float32 and float64, greedy tokens in float32",
        "inputs": f"{len(SAMPLE_PROMPTS)} sample prompts in the chat template; logits teacher-forced, {PARITY_NEW_TOKENS} greedy tokens",
        "fp32_export": fp32,
        "final": final,
    }
    return fields


def _run_main_export(source: Path, tmp: Path, opset: int | None) -> None:
    from optimum.exporters.onnx import main_export

    optimum_log = logging.getLogger("optimum")
    level = optimum_log.level
    optimum_log.setLevel(logging.ERROR)  # its "different candidate initializers for the tied weights": store_tied_table_once handles them
    try:
        main_export(str(source), output=str(tmp), task=DECODER_PIPELINE, opset=opset, do_validation=False)
    except (ValueError, KeyError) as e:
        raise MetaTTError(
            f"optimum cannot export {source} with a KV cache ({first_line(e)}); export a supported decoder (llama, qwen2, gpt2, ...)"
        ) from None
    finally:
        optimum_log.setLevel(level)
    if not (tmp / ONNX_NAME).is_file():
        raise RuntimeError(f"optimum wrote no {ONNX_NAME} into the export folder")


def _parity(model: Any, prompts, refs: References, ref_tokens, eos, pad, quantize: str | None) -> dict:
    """Logits and greedy tokens of the bundle, loaded as served (load_ort_decoder), against the PyTorch reference.

    fp32 graphs are held to ``fp32_tolerance``; quantized ones (``quantize``) are reported, and fail only on NaN.
    """
    outputs = [teacher_forced_logits(model, ids) for ids in prompts]
    fields = logit_parity(outputs, refs.float32, refs.float64)
    fields["tolerance"] = None if quantize else fp32_tolerance(fields["max_abs_logit"])
    identical = sum(greedy(model, ids, PARITY_NEW_TOKENS, eos, pad) == tokens for ids, tokens in zip(prompts, ref_tokens))
    return {
        **fields,
        "greedy_identical": identical / len(prompts),
        "prompts": len(prompts),
        "provider": "CPUExecutionProvider",
        "loaded_with": "optimum.onnxruntime.ORTModelForCausalLM",
    }


def _enforce(parity: dict, what: str) -> None:
    """The logits within tolerance (export/parity.py: NaN fails) and, for fp32, every greedy token identical."""
    hint = "export without --quantize" if parity["tolerance"] is None else GRAPH_HINT
    enforce(parity, what, hint)
    if parity["tolerance"] is not None and parity["greedy_identical"] != 1.0:
        raise MetaTTError(
            f"{what} differs from the PyTorch model: greedy tokens identical on {parity['greedy_identical']:.0%} of the prompts "
            f"({describe(parity)}); {hint}"
        )
