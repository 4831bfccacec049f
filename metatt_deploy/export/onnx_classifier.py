"""The sequence-classifier export pipeline: optimum's graph, optionally optimised, int8 or fp16, checked against PyTorch.

export/onnx.py's ``export_onnx`` runs it (through export/kinds.py) inside a temporary folder that is
renamed into place at the end (nothing half-written); the bundle loads as it is in
``optimum.onnxruntime.ORTModelForSequenceClassification``. Steps:

1. optimum ``main_export(task="text-classification")`` writes the fp32 graph;
2. parity of that fp32 graph vs PyTorch on sample inputs, enforced at ``FP32_ATOL`` against float32
   or float64 PyTorch (export/parity.py: float32 PyTorch rounds too);
3. ``optimize``: ONNX Runtime's transformer optimizer fuses attention, layer norms, GELU and the
   embeddings (opt_level 0: pure graph fusions, no provider-specific rewrites, so the file runs
   on every execution provider);
4. ``dtype="fp16"``: float16 weights and compute, float32 inputs/outputs (``keep_io_types``);
5. ``quantize="int8"``: dynamic quantization, int8 weights (per output channel) of MatMul (and
   fused Attention) nodes;
6. parity of the final graph, loaded through ORTModelForSequenceClassification; enforced at
   ``FP32_ATOL`` for fp32 graphs (plain or optimised), at ``FP16_RTOL`` (relative to the largest
   logit) for fp16, reported only for int8 (NaN fails) (quantization error is judged by accuracy: see
   ``metatt-deploy validate --reference-onnx``).

Then the optional Transformers.js layout, ``.ort`` copies and the web app. Causal language models
take the other pipeline (a KV-cache graph, int8 or int4): onnx_lm.py.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from metatt_deploy.adapters.base_model import friendly_load
from metatt_deploy.adapters.config import check_finite
from metatt_deploy.common.errors import MetaTTError, first_line
from metatt_deploy.common.threads import session_options_record
from metatt_deploy.export.onnx_files import graph_fields, has_external_data, model_bytes, replace_model
from metatt_deploy.export.options import ExportOptions
from metatt_deploy.export.ort_format import convert_to_ort
from metatt_deploy.export.parity import GRAPH_HINT, References, enforce, label_agreement, logit_parity, max_abs, reference_logits
from metatt_deploy.export.quality import classifier_rows, judge_classifier, labels_of
from metatt_deploy.export.quantize import (
    TextCalibrationReader,
    cpu_summary,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from metatt_deploy.export.web import single_task_spec, write_web_app
from metatt_deploy.inference.formats import CLASSIFIER_PIPELINE, ONNX_NAME, context_length
from metatt_deploy.inference.sessions import as_numpy, available_providers, make_session, onnx_feeds

CPU = ["CPUExecutionProvider"]
TJS_DIR = "onnx"  # Transformers.js reads <model>/onnx/model.onnx (fp32) and model_quantized.onnx (q8)
TJS_QUANTIZED = "model_quantized.onnx"

FP32_ATOL = 1e-4  # max |logit diff| ONNX fp32 (plain or optimised) vs PyTorch float32
FP16_RTOL = 1e-2  # fp16: max |logit diff| <= FP16_RTOL * max(1, max |logit|)

# Fused operators the transformer optimizer can produce, recorded in the manifest.
FUSED_OPS = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "Gelu",
    "FastGelu",
    "BiasGelu",
)
# Hugging Face model_type -> ONNX Runtime optimizer model_type
OPTIMIZER_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "mpnet": "bert",
    "gpt2": "gpt2",
}

# calibration rows are truncated to this (as training truncates), or to the model's own length where that is shorter
CALIBRATION_MAX_TOKENS = 128
SAMPLE_SENTENCES = [
    "A wonderful, heartfelt film with a superb cast.",
    "The plot was dull and the acting even worse.",
    "I have seen better, but it was not a waste of time.",
    "Absolutely loved it!",
    "Two hours of my life I will never get back, and the ending made no sense at all.",
    "The soundtrack is great; the dialogue is not.",
    "ok",
    "An uneven but ultimately rewarding story about family, loss and the small joys of everyday life.",
]


def model_max_tokens(config: dict, tokenizer: Any) -> int | None:
    """The most tokens one input may have: the tokenizer's model_max_length, capped by the position table.

    (RoBERTa's table has 514 rows for 512 tokens: the tokenizer's figure is the one that holds.)
    """
    limits = [n for n in (context_length(config), getattr(tokenizer, "model_max_length", None)) if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def sample_encoding(tokenizer, max_length: int = 128) -> list[dict[str, Any]]:
    """Parity inputs: the sample sentences as one padded batch, and the first one alone."""
    batch = tokenizer(SAMPLE_SENTENCES, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    single = tokenizer(SAMPLE_SENTENCES[:1], truncation=True, max_length=max_length, return_tensors="pt")
    return [dict(batch), dict(single)]


def export_classifier_into(tmp: Path, source: Path, hf_config: Any, options: ExportOptions) -> dict:
    """The classifier pipeline (the module docstring's steps 1-6), then the extra layouts, formats and web/.

    Its options were checked by its kind (export/kinds.py); a model without a classification head is refused here.
    """
    architectures = hf_config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise MetaTTError(
            f"{source} is not a sequence classifier (architectures: {', '.join(architectures) or 'none'}), so its head "
            "would be random; export a merged adapter (metatt-deploy merge) or a classifier folder"
        )
    tokenizer, encodings, refs = _classifier_reference(source)
    _run_main_export(source, tmp, options.opset)
    fields: dict[str, Any] = {
        "pipeline_task": CLASSIFIER_PIPELINE,
        "model_type": hf_config.model_type,
        "labels": {str(k): v for k, v in (hf_config.id2label or {}).items()},
        **graph_fields(tmp / ONNX_NAME),
        "variant": {"dtype": options.dtype, "optimize": bool(options.optimize), "quantize": options.quantize},
        "session": session_options_record(options.threads),
        "cpu": cpu_summary(),
    }
    fp32_session = make_session(tmp / ONNX_NAME, CPU, options.threads)
    fp32_parity = {**_parity(fp32_session, encodings, refs, FP32_ATOL), "provider": CPU[0]}
    longest = model_max_tokens(hf_config.to_dict(), tokenizer) or CALIBRATION_MAX_TOKENS  # rows longer would index past the positions
    if options.quantize:
        gate_rows, gate_source = classifier_rows(options.gate, SAMPLE_SENTENCES)
        fp32_labels = labels_of(_row_logits(fp32_session, tokenizer, longest), gate_rows)
    del fp32_session
    enforce(fp32_parity, "the fp32 ONNX export", GRAPH_HINT)
    sizes = {"fp32_bytes": model_bytes(tmp)}
    stash = None
    if options.layout == "transformers.js":  # the plain fp32 graph, kept aside (optimum's loader would see a 2nd model.onnx)
        stash = Path(tempfile.mkdtemp(prefix="metatt-fp32-"))
        shutil.copyfile(tmp / ONNX_NAME, stash / ONNX_NAME)
    fields.update(_transform(tmp, hf_config, tokenizer, fields["inputs"], min(CALIBRATION_MAX_TOKENS, longest), options))
    if options.quantize:
        labels = labels_of(_row_logits(make_session(tmp / ONNX_NAME, CPU, options.threads), tokenizer, longest), gate_rows)
        fields["quality_gate"] = judge_classifier(fp32_labels, labels, options.gate, options.quantize, gate_source)
    fields["sizes"] = {**sizes, "final_bytes": model_bytes(tmp)}
    fields["parity"] = {
        "reference": "PyTorch merged model (AutoModelForSequenceClassification) on CPU, float32 and float64",
        "inputs": f"{len(SAMPLE_SENTENCES)} sample sentences as one padded batch, plus the first one alone",
        "fp32_export": fp32_parity,
        "final": _final_parity(tmp, encodings, refs, options),
    }
    if stash is not None:
        try:
            (tmp / TJS_DIR).mkdir()
            shutil.move(stash / ONNX_NAME, tmp / TJS_DIR / ONNX_NAME)
        finally:
            shutil.rmtree(stash, ignore_errors=True)
        fields["transformers_js"] = _transformers_js_layout(tmp, encodings, refs, options)
    if "ort" in options.formats:
        fields["ort_format"] = _ort_format(tmp, encodings, options.threads)
    spec = single_task_spec(fields["labels"], fields["inputs"], TJS_DIR if stash is not None else None)
    fields["web"] = write_web_app(tmp, spec, tmp)
    return fields


def _classifier_reference(source: Path) -> tuple[Any, list[dict[str, Any]], References]:
    """The tokenizer, the parity inputs and the PyTorch logits on them (float32, then float64) of a classifier folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = friendly_load(lambda: AutoTokenizer.from_pretrained(source), str(source), "tokenizer")
    reference = friendly_load(
        lambda: AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32), str(source), "model"
    ).eval()
    check_finite(dict(reference.named_parameters()), "model")
    encodings = sample_encoding(tokenizer)
    return tokenizer, encodings, reference_logits(reference, lambda model, enc: model(**enc).logits, encodings)


def _transform(tmp: Path, hf_config: Any, tokenizer: Any, inputs: list[str], max_tokens: int, options: ExportOptions) -> dict:
    """The optional steps, in order: fusions (--optimize), float16 (--dtype fp16), int8 (--quantize); their manifest fields."""
    fields: dict[str, Any] = {}
    if options.optimize:
        fields["optimizer"], fields["fused_nodes"] = _optimize(tmp, hf_config, use_gpu=options.dtype == "fp16")
    if options.dtype == "fp16":
        _to_fp16(tmp)
    if options.quantize:
        fields["quantization"] = _quantize(tmp, tokenizer, inputs, max_tokens, options)
        if options.calibration.source:
            fields["quantization"]["calibration"]["data"] = options.calibration.source
    return fields


def _final_parity(tmp: Path, encodings: list[dict[str, Any]], refs: References, options: ExportOptions) -> dict:
    """Parity of the bundle as served (step 6): enforced for fp32 and fp16, reported for int8 (NaN fails)."""
    quantize, dtype = options.quantize, options.dtype
    providers = available_providers() if dtype == "fp16" else CPU
    final = _ort_model_parity(tmp, providers, encodings, refs, _final_tolerance(quantize, dtype, refs))
    if quantize:
        final["note"] = "int8 logits are reported; the quality gate judges int8 by label agreement with the fp32 graph"
    what = "the int8 ONNX export" if quantize else "the fp16 ONNX export" if dtype == "fp16" else "the ONNX export"
    enforce(final, what, _hint(options.optimize, quantize, dtype))
    return final


def _quantize(tmp: Path, tokenizer: Any, inputs: list[str], max_tokens: int, options: ExportOptions) -> dict:
    """Replace the bundle's graph by its int8 form; returns the manifest's ``quantization``.

    int8-static feeds the calibration rows truncated to ``max_tokens``, with the graph's ``inputs`` only.
    """
    external = has_external_data(tmp)
    per_channel, reduce_range = options.per_channel, bool(options.reduce_range)
    if options.quantize == "int8":
        return replace_model(
            tmp,
            lambda path: quantize_dynamic_int8(
                tmp / ONNX_NAME, path, per_channel=per_channel, reduce_range=reduce_range, external=external
            ),
        )

    def feeds(batch):
        enc = tokenizer(*[list(c) for c in zip(*batch)], truncation=True, max_length=max_tokens, return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in inputs}

    calibration = options.calibration
    reader = TextCalibrationReader(list(calibration.texts), feeds)
    return replace_model(
        tmp,
        lambda path: quantize_static_int8(
            tmp / ONNX_NAME,
            path,
            reader,
            per_channel=per_channel,
            reduce_range=reduce_range,
            method=calibration.method,
            fp32_down_projections=calibration.fp32_down_projections,
            external=external,
        ),
    )


def _transformers_js_layout(tmp: Path, encodings, refs: References, options: ExportOptions) -> dict:
    """``onnx/model.onnx`` (fp32, checked) and ``onnx/model_quantized.onnx`` (the bundle's int8, else dynamic int8)."""
    quantize, threads = options.quantize, options.threads
    folder = tmp / TJS_DIR
    quantized = folder / TJS_QUANTIZED
    if quantize:
        shutil.copyfile(tmp / ONNX_NAME, quantized)
    else:
        quantize_dynamic_int8(folder / ONNX_NAME, quantized, per_channel=options.per_channel, reduce_range=bool(options.reduce_range))
    fp32 = _parity(make_session(folder / ONNX_NAME, ["CPUExecutionProvider"], threads), encodings, refs, FP32_ATOL)
    enforce(fp32, "onnx/model.onnx", GRAPH_HINT)
    q8 = _parity(make_session(quantized, ["CPUExecutionProvider"], threads), encodings, refs, None)
    enforce(q8, "onnx/model_quantized.onnx", "export without --layout transformers.js")
    return {
        "files": [f"{TJS_DIR}/{ONNX_NAME}", f"{TJS_DIR}/{TJS_QUANTIZED}"],
        "quantized_form": quantize or "int8",
        "parity": {"model.onnx": fp32, "model_quantized.onnx": q8},
        "load_with": "pipeline('text-classification', NAME) with env.localModelPath = the bundle's parent, env.allowRemoteModels = false",
    }


def _ort_format(tmp: Path, encodings, threads) -> dict:
    """``.ort`` copies of the bundle's graphs and the reduced build's operator config; parity checked."""
    written = convert_to_ort(tmp)
    checked = {}
    for ort_file in written["models"]:
        onnx_file = (tmp / ort_file).with_suffix(".onnx")
        cpu = ["CPUExecutionProvider"]
        session = make_session(onnx_file, cpu, threads)
        reference = [session.run(["logits"], onnx_feeds(session, e))[0] for e in encodings]
        parity = _parity(make_session(tmp / ort_file, cpu, threads), encodings, References(reference), FP32_ATOL)
        enforce(
            parity, f"the ORT format model {ort_file} (vs its .onnx)", "the .ort conversion changed the graph; export without --format ort"
        )
        checked[ort_file] = parity
    return {**written, "parity_vs_onnx": checked}


def _run_main_export(source: Path, tmp: Path, opset: int | None) -> None:
    from optimum.exporters.onnx import main_export

    try:
        main_export(str(source), output=str(tmp), task=CLASSIFIER_PIPELINE, opset=opset, do_validation=False)
    except (ValueError, KeyError) as e:
        raise MetaTTError(f"optimum cannot export {source} ({first_line(e)}); export a supported sequence-classification model") from None


def _parity(session, encodings, refs: References, tolerance: float | None) -> dict:
    outputs = [session.run(["logits"], onnx_feeds(session, enc))[0] for enc in encodings]
    return _classifier_parity(outputs, refs, tolerance)


def _classifier_parity(outputs: list[np.ndarray], refs: References, tolerance: float | None) -> dict:
    fields = logit_parity(outputs, refs.float32, refs.float64, tolerance)
    fields["label_agreement"], fields["examples"] = label_agreement(outputs, refs.float32)
    return fields


def _row_logits(session, tokenizer, max_tokens: int):
    """A function of one calibration row (one text, or a sentence pair) to its logits, fed alone and unpadded."""

    def run(row: tuple[str, ...]) -> np.ndarray:
        enc = tokenizer(*row, truncation=True, max_length=max_tokens, return_tensors="np")
        return session.run(["logits"], onnx_feeds(session, enc))[0]

    return run


def _ort_model_parity(folder: Path, providers: list[str], encodings, refs: References, tolerance: float | None) -> dict:
    """Parity of the bundle as served: loaded by ORTModelForSequenceClassification."""
    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification

    try:
        model = ORTModelForSequenceClassification.from_pretrained(folder, providers=providers)
    except Exception as e:  # a bundle optimum cannot load is a bug in this exporter, not a user error
        raise RuntimeError(f"ORTModelForSequenceClassification cannot load the export: {e}") from e
    outputs = []
    for enc in encodings:
        with torch.no_grad():
            feeds = {k: v for k, v in enc.items() if k in model.input_names}
            outputs.append(as_numpy(model(**feeds).logits))
    return {
        **_classifier_parity(outputs, refs, tolerance),
        "provider": providers[0],
        "loaded_with": "optimum.onnxruntime.ORTModelForSequenceClassification",
    }


def _final_tolerance(quantize: str | None, dtype: str, refs: References) -> float | None:
    """None for int8 (the quality gate judges it), relative to the largest logit for fp16, else FP32_ATOL."""
    if quantize:
        return None
    return FP16_RTOL * max(1.0, max_abs(refs.float32)) if dtype == "fp16" else FP32_ATOL


def _hint(optimize: bool, quantize: str | None, dtype: str) -> str:
    if quantize:
        return "export without --quantize"
    if dtype == "fp16":
        return "float16 loses too much on this model; export fp32"
    return "export without --optimize" if optimize else GRAPH_HINT


def optimizer_settings(hf_config) -> dict:
    """model_type, num_heads and hidden_size for ONNX Runtime's transformer optimizer."""
    model_type = OPTIMIZER_MODEL_TYPES.get(hf_config.model_type)
    if model_type is None:
        raise MetaTTError(
            f"--optimize does not know the '{hf_config.model_type}' architecture (supported: "
            f"{', '.join(sorted(OPTIMIZER_MODEL_TYPES))}); export without --optimize"
        )
    heads = getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_heads", None) or getattr(hf_config, "n_head", 0)
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "dim", None) or getattr(hf_config, "n_embd", 0)
    return {"model_type": model_type, "num_heads": int(heads or 0), "hidden_size": int(hidden or 0), "opt_level": 0}


def _optimize(folder: Path, hf_config, use_gpu: bool) -> tuple[dict, dict]:
    from onnxruntime.transformers.optimizer import optimize_model

    settings = optimizer_settings(hf_config)
    counts: dict[str, int] = {}

    def write(path: Path) -> None:
        optimized = optimize_model(str(folder / ONNX_NAME), use_gpu=use_gpu, **settings)
        ops = Counter(node.op_type for node in optimized.model.graph.node)
        counts.update({op: ops.get(op, 0) for op in FUSED_OPS})
        optimized.save_model_to_file(str(path), use_external_data_format=has_external_data(folder))

    replace_model(folder, write)
    layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layers", None) or getattr(hf_config, "n_layer", None)
    if layers:
        counts["complete"] = (
            counts["Attention"] + counts["MultiHeadAttention"] == layers
            and counts["SkipLayerNormalization"] >= layers
            and counts["Gelu"] + counts["FastGelu"] + counts["BiasGelu"] == layers
        )
        counts["layers"] = int(layers)
    return {**settings, "use_gpu": use_gpu}, counts


def _to_fp16(folder: Path) -> None:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    def write(path: Path) -> None:
        model = OnnxModel(onnx.load(str(folder / ONNX_NAME)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(path), use_external_data_format=has_external_data(folder))

    replace_model(folder, write)
