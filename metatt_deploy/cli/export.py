"""`metatt-deploy merge`, `export` and `validate`: from a trained adapter to a checked ONNX export.

Needs the ``[train]`` extra (merging and exporting run the model in PyTorch; validation compares
with it); `metatt_deploy.cli` loads this module only when one of these verbs runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from metatt_deploy.cli.base import CONTEXT_SETTINGS, Force, check_number, int_list, split_list, user_errors, verb_app
from metatt_deploy.cli.stack import quiet_libraries
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import read_json
from metatt_deploy.export.genai import export_genai
from metatt_deploy.export.int4 import INT4_ACCURACY_LEVEL, INT4_BLOCK_SIZE, INT4_EDGE_LAYERS, INT4_HEAD_BITS, Int4Options
from metatt_deploy.export.kinds import validation_kind
from metatt_deploy.export.merge import merge_adapter, merge_factored
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.export.options import Calibration, ExportOptions
from metatt_deploy.export.peft import to_peft
from metatt_deploy.export.quality import MAX_PPL_INCREASE, QualityGate, quality_summary
from metatt_deploy.export.quantize import CALIBRATION_ROWS
from metatt_deploy.export.validate import report_paths
from metatt_deploy.export.web import check_web_runtime, vendor_web_runtime
from metatt_deploy.inference.formats import GENAI_CONFIG, MANIFEST_NAME

app = verb_app()


@app.command(context_settings=CONTEXT_SETTINGS)
@user_errors
def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (a run's best/ folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for the merged Hugging Face model.")],
    task: Annotated[str | None, typer.Option(help="Task to merge (multi-task adapters).")] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model folder or hub name, if it moved since training (checked by fingerprint).")
    ] = None,
    max_rank: Annotated[
        int | None, typer.Option(help="Round the tensor train to this bond rank first and report the error it introduced.")
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="hf: a merged Hugging Face model; peft: a lossless PEFT LoRA adapter (no base model needed).")
    ] = "hf",
    factored: Annotated[
        bool,
        typer.Option(
            "--factored",
            help="Multi-task adapters: write a factored bundle (base once, shared cores once, a small file per task, factored ONNX graphs) instead of a dense model. With --task A,B and an existing bundle as --output, add those tasks to it.",
        ),
    ] = False,
    onnx: Annotated[
        bool, typer.Option("--onnx/--no-onnx", help="With --factored: also export the factored ONNX graphs and .onnx_adapter files.")
    ] = True,
    force: Force = False,
) -> None:
    """Fold alpha * dW into the base weights and write a standard Hugging Face model folder.

    With --to peft, write the exactly equivalent PEFT LoRA adapter instead (docs/adapter-format.md).
    With --factored, write a factored multi-task bundle (docs/multitask.md).
    """
    quiet_libraries()
    if factored:
        if to != "hf" or max_rank is not None:
            raise MetaTTError("--factored writes its own bundle format; drop --to and --max-rank")

        summary = merge_factored(adapter, output, tasks=split_list([task]) if task else None, onnx=onnx, base_model=base_model, force=force)
        verb = "added task(s)" if summary["added"] else "wrote factored bundle with task(s)"
        typer.echo(f"{verb} {', '.join(summary['tasks'])} -> {output} (bundle id {summary['bundle_id'][:12]})")
        return
    if to == "peft":
        if max_rank is not None:
            raise MetaTTError("--max-rank applies to --to hf only; round the adapter first, or drop --max-rank")

        to_peft(adapter, output, task=task, force=force)
        typer.echo(f"wrote PEFT LoRA adapter {output} (load it with peft.PeftModel.from_pretrained(base, '{output}'))")
        return
    if to != "hf":
        raise MetaTTError(f"unknown --to '{to}'; use hf or peft")

    record = merge_adapter(adapter, output, task=task, base_model=base_model, max_rank=max_rank, force=force)
    extra = f"; rounding error {record['rounding_relative_error']:.3e}" if "rounding_relative_error" in record else ""
    typer.echo(f"merged task '{record['task']}' into {output}{extra}")


_ExportModelDir = Annotated[
    Path,
    typer.Argument(
        help="Merged model folder (metatt-deploy merge); also any Hugging Face sequence classifier folder, or an adapter folder (merged on the fly)."
    ),
]
_ExportOutput = Annotated[Path | None, typer.Option("--output", "-o", help="Bundle folder (default: exported/<name>).")]
_ExportName = Annotated[
    str | None, typer.Option(help="Bundle name under exported/ (default: the model folder's name plus -opt, -int8 or -fp16).")
]
_ExportOpset = Annotated[int | None, typer.Option(help="ONNX opset (default: optimum's choice for the architecture).")]
_ExportOptimize = Annotated[
    bool, typer.Option("--optimize", help="Fuse attention, layer norms, GELU and embeddings with ONNX Runtime's transformer optimizer.")
]
_ExportQuantize = Annotated[
    str | None,
    typer.Option(
        help="int8: dynamic quantization (int8 weights of MatMul/Attention nodes, activation scales per batch); int8-static: QDQ with activation scales calibrated on --calibration data (a row's logits do not depend on its batch); int4 (decoders): weight-only 4-bit MatMulNBits, the LM head at --int4-head-bits. Logits parity is reported; a quality gate against the fp32 graph decides (see --allow-quality-loss)."
    ),
]
_ExportInt4AccuracyLevel = Annotated[
    int,
    typer.Option(
        help="With --quantize int4: MatMulNBits compute type, 4 = int8 activations quantized per block at run time (fastest on CPUs), 0 = float32 activations (see docs/decoders.md)."
    ),
]
_ExportInt4BlockSize = Annotated[
    int, typer.Option(help="With --quantize int4: weights per float scale along the input (16, 32, 64, 128 or 256).")
]
_ExportInt4HeadBits = Annotated[
    int,
    typer.Option(
        help="With --quantize int4: bits of the LM head and the (tied) embedding: 4, 8 or 32 (float32); see docs/reports/int4.md."
    ),
]
_ExportInt4EdgeLayers = Annotated[
    int,
    typer.Option(
        help="With --quantize int4: keep the projections of the first and last N decoder layers at 8 bits (4-bit edge layers broke Gemma-3 270M)."
    ),
]
_ExportCalibration = Annotated[
    str | None,
    typer.Option(
        help="With --quantize: calibration data, a builtin task (its validation split), a hub data set or a CSV/JSONL file: int8-static's activation ranges, and the quality gate's rows (default: the adapter's task if builtin, else built-in prompts or sample sentences)."
    ),
]
_ExportCalibrationRows = Annotated[
    int | None,
    typer.Option(
        help=f"Calibration rows (a fixed random subset, fed one at a time; default {CALIBRATION_ROWS} for int8-static and classifiers' gate, 32 for decoders' gate)."
    ),
]
_ExportGateMinAgreement = Annotated[
    float | None,
    typer.Option(
        help="Quality gate: minimum agreement with the fp32 graph, greedy next tokens for decoders (default 0.9), labels for classifiers (default 0.9)."
    ),
]
_ExportGateMaxPplIncrease = Annotated[
    float, typer.Option(help="Quality gate, decoders: maximum relative perplexity increase over the fp32 graph (0.1 = +10%).")
]
_ExportAllowQualityLoss = Annotated[
    bool,
    typer.Option("--allow-quality-loss", help="Keep a quantized export that fails the quality gate (the numbers stay in manifest.json)."),
]
_ExportCalibrationMethod = Annotated[str, typer.Option(help="Activation range estimate: minmax, percentile or entropy.")]
_ExportFp32DownProjections = Annotated[
    bool,
    typer.Option(
        "--fp32-down-projections/--int8-down-projections",
        help="With int8-static: keep the FFN down-projections fp32 (accuracy within 1 point on MiniLM) or quantize them too (faster, about -1.8 points; docs/int8.md).",
    ),
]
_ExportPerChannel = Annotated[bool, typer.Option("--per-channel/--per-tensor", help="int8 weight scales per output channel or per tensor.")]
_ExportReduceRange = Annotated[
    bool | None,
    typer.Option("--reduce-range/--full-range", help="7-bit int8 weights (default: only on CPUs without VNNI; see docs/int8.md)."),
]
_ExportLayout = Annotated[
    str, typer.Option(help="optimum, or transformers.js: also onnx/model.onnx and onnx/model_quantized.onnx for Transformers.js.")
]
_ExportFormats = Annotated[
    list[str] | None, typer.Option("--format", help="onnx (always), ort: also .ort models + the reduced build's operator config.")
]
_ExportWebRuntime = Annotated[
    Path | None,
    typer.Option(
        help="A node_modules folder with onnxruntime-web and @huggingface/transformers: copy the page's runtime files into web/vendor/."
    ),
]
_ExportThreads = Annotated[
    int | None,
    typer.Option(help="ONNX Runtime intra-op threads of the parity checks (default: every available CPU; fastest measured)."),
]
_ExportDtype = Annotated[
    str, typer.Option(help="fp32, or fp16 (for GPU execution providers; parity tolerance 1e-2 x max(1, max |logit|)).")
]
_ExportAdapter = Annotated[
    Path | None, typer.Option(help="Adapter the model was merged from, for the manifest (default: the one metatt_merge.json records).")
]
_ExportTask = Annotated[str | None, typer.Option(help="Task to merge when MODEL_DIR is a multi-task adapter.")]
_ExportGenai = Annotated[
    bool,
    typer.Option(
        "--genai",
        help="MODEL_DIR is a factored decoder bundle (merge --factored): make it an ONNX Runtime GenAI model folder (genai_config.json + tokenizer files; every tasks/NAME.onnx_adapter is a GenAI adapter), checked with onnxruntime-genai.",
    ),
]


@app.command(context_settings=CONTEXT_SETTINGS)
@user_errors
def export(
    model_dir: _ExportModelDir,
    output: _ExportOutput = None,
    name: _ExportName = None,
    opset: _ExportOpset = None,
    optimize: _ExportOptimize = False,
    quantize: _ExportQuantize = None,
    int4_accuracy_level: _ExportInt4AccuracyLevel = INT4_ACCURACY_LEVEL,
    int4_block_size: _ExportInt4BlockSize = INT4_BLOCK_SIZE,
    int4_head_bits: _ExportInt4HeadBits = INT4_HEAD_BITS,
    int4_edge_layers: _ExportInt4EdgeLayers = INT4_EDGE_LAYERS,
    calibration: _ExportCalibration = None,
    calibration_rows: _ExportCalibrationRows = None,
    gate_min_agreement: _ExportGateMinAgreement = None,
    gate_max_ppl_increase: _ExportGateMaxPplIncrease = MAX_PPL_INCREASE,
    allow_quality_loss: _ExportAllowQualityLoss = False,
    calibration_method: _ExportCalibrationMethod = "minmax",
    fp32_down_projections: _ExportFp32DownProjections = True,
    per_channel: _ExportPerChannel = True,
    reduce_range: _ExportReduceRange = None,
    layout: _ExportLayout = "optimum",
    formats: _ExportFormats = None,
    web_runtime: _ExportWebRuntime = None,
    threads: _ExportThreads = None,
    dtype: _ExportDtype = "fp32",
    adapter: _ExportAdapter = None,
    task: _ExportTask = None,
    genai: _ExportGenai = False,
    force: Force = False,
) -> None:
    """Export a merged model to an ONNX bundle (model.onnx, tokenizer, manifest.json) and check its parity.

    Decoders export with a KV cache (text-generation-with-past; --quantize int8 or int4), see docs/decoders.md.
    With --genai, a factored decoder bundle becomes an ONNX Runtime GenAI model, see docs/multitask-decoders.md.
    """
    quiet_libraries()
    if genai:
        others: dict[str, object] = {"--output": output, "--name": name, "--quantize": quantize, "--calibration": calibration}
        others["--web-runtime"] = web_runtime
        others.update({"--adapter": adapter, "--task": task, "--format": formats, "--optimize": optimize or None})
        others.update({"--dtype": None if dtype == "fp32" else dtype, "--layout": None if layout == "optimum" else layout})
        _export_genai(model_dir, force, others)
        return
    if web_runtime is not None:
        check_web_runtime(web_runtime)  # before anything is written: a bad folder must not cost the previous export
    options = ExportOptions(
        opset=opset,
        optimize=optimize,
        quantize=quantize,
        dtype=dtype,
        calibration=Calibration(calibration, calibration_rows or CALIBRATION_ROWS, calibration_method, fp32_down_projections),
        per_channel=per_channel,
        reduce_range=reduce_range,
        layout=layout,
        formats=("onnx", *(f for f in split_list(formats) or [] if f != "onnx")),
        threads=threads,
        int4=Int4Options(
            block_size=int4_block_size, accuracy_level=int4_accuracy_level, head_bits=int4_head_bits, edge_layers=int4_edge_layers
        ),
        gate=QualityGate(
            rows=calibration_rows, min_agreement=gate_min_agreement, max_ppl_increase=gate_max_ppl_increase, allow_loss=allow_quality_loss
        ),
    )
    out = export_onnx(model_dir, output, options, name=name, force=force, adapter_dir=adapter, task=task)
    if web_runtime is not None:
        vendor_web_runtime(out, web_runtime)
    echo_export_summary(out)


def _export_genai(model_dir: Path, force: bool, others: dict[str, object]) -> None:
    """--genai: the factored decoder bundle becomes a GenAI model folder; ``others`` (the export options it does not take) are refused."""
    given = [k for k, v in others.items() if v]
    if given:
        raise MetaTTError(f"--genai writes into the bundle itself and takes no {given[0]}; drop it")
    record = export_genai(model_dir, force=force)
    parity = record["parity"]
    sizes = ", ".join(f"{t} {b} B" for t, b in record["adapter_bytes"].items())
    typer.echo(
        f"wrote {GENAI_CONFIG} + tokenizer into {model_dir} (onnxruntime-genai {record['onnxruntime_genai']}; "
        f"{record['tokenizer_probes_identical']} tokenizer probes identical to transformers); adapters: {sizes}"
    )
    typer.echo(
        f"greedy parity GenAI vs PyTorch adapter: {parity['identical']}/{parity['total']} token-identical "
        f"({parity['prompts']} prompts x {parity['new_tokens']} tokens per task)"
    )


def echo_export_summary(out: Path) -> None:
    """The lines a person reads after an export: size, parity (float32 and float64), the quality gate, fused nodes."""
    manifest = read_json(out / MANIFEST_NAME, "export manifest")
    final = manifest["parity"]["final"]
    tolerance = "reported only" if final["tolerance"] is None else f"tolerance {final['tolerance']:.0e}"
    to64 = "" if final.get("max_abs_diff_float64") is None else f", float64 {final['max_abs_diff_float64']:.2e}"
    typer.echo(
        f"exported {out} (opset {manifest['opset']}, {manifest['sizes']['final_bytes'] / 2**20:.1f} MiB); "
        f"max |logit diff| vs PyTorch float32 {final['max_abs_logit_diff']:.2e}{to64} ({tolerance})"
    )
    if "quality_gate" in manifest:
        typer.echo(quality_summary(manifest["quality_gate"]))
    if "fused_nodes" in manifest:
        fused = ", ".join(
            f"{k} {v}" for k, v in manifest["fused_nodes"].items() if isinstance(v, int) and not isinstance(v, bool) and v and k != "layers"
        )
        typer.echo(f"fused nodes: {fused}")


_ValidateAdapter = Annotated[
    Path,
    typer.Argument(help="Adapter directory (a run's best/ folder; MetaTT, multi-task MetaTT or LoRA): the unmerged PyTorch reference."),
]
_ValidateOnnxDir = Annotated[Path, typer.Argument(help="ONNX bundle written by metatt-deploy export (exported/NAME).")]
_ValidateData = Annotated[
    str | None,
    typer.Option(
        help="Held-out data: a builtin task (movie-sentiment, snli, ...), a hub data set, or a CSV/TSV/JSONL/JSON file (labels optional). Default: built-in sample sentences."
    ),
]
_ValidateSplit = Annotated[str, typer.Option(help="Split of a builtin or hub data set (files are used whole).")]
_ValidateMaxExamples = Annotated[
    int | None,
    typer.Option(
        help="Use a fixed random subset of N held-out examples (default: all; 50 prompts for decoders; the output and report say when a subset is used)."
    ),
]
_ValidateBatchSizes = Annotated[str | None, typer.Option(help="Classifiers: batch sizes to time, comma-separated (default 1,8).")]
_ValidateSeqLen = Annotated[
    int | None,
    typer.Option(help="Classifiers: tokens per example, truncation for parity and the padded length for timing (default 128)."),
]
_ValidateRepeats = Annotated[
    int | None, typer.Option(help="Timed calls per runtime and batch size (medians and p95 are reported; default 30, decoders 10).")
]
_ValidateWarmup = Annotated[int | None, typer.Option(help="Classifiers: untimed warm-up calls per runtime and batch size (default 3).")]
_ValidateMaxSeconds = Annotated[
    float | None,
    typer.Option(help="Classifiers: cap on seconds per runtime and batch size, at least 3 calls still timed (default 60)."),
]
_ValidateThreads = Annotated[
    int | None,
    typer.Option(help="Intra-op threads for both PyTorch and ONNX Runtime (default: every available CPU; fastest measured)."),
]
_ValidateReferenceOnnx = Annotated[
    Path | None,
    typer.Option(help="The fp32 export of the same model: report the accuracy change and speed-up of an int8/fp16 export against it."),
]
_ValidateBaseModel = Annotated[
    str | None, typer.Option(help="Base model folder or hub name, if it moved since training (checked by fingerprint).")
]
_ValidateTask = Annotated[
    str | None, typer.Option(help="Task of a multi-task adapter (default: the one the export records, from merge/export --task).")
]
_ValidateTextColumn = Annotated[
    list[str] | None, typer.Option(help="Text column(s) of the data: one, or two for sentence pairs. Inferred when omitted.")
]
_ValidateLabelColumn = Annotated[
    str | None, typer.Option(help="Classifiers: label column of the data, absent: accuracy is not reported (default label).")
]
_ValidateOutput = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Folder for validation.json and validation.md, decoders also latency.png (default: beside the bundle, exported/NAME.validation.json, .md, .latency.png).",
    ),
]
_ValidateCompare = Annotated[
    list[Path] | None, typer.Option(help="Decoders: more exports of the same model (e.g. int8, int4) measured in the same run.")
]
_ValidatePromptLengths = Annotated[
    str | None, typer.Option(help="Decoders: prompt lengths (tokens) at which time to first token is measured (default 32,256).")
]
_ValidateNewTokens = Annotated[int | None, typer.Option(help="Decoders: tokens generated to measure decode tokens/s (default 32).")]


@app.command(context_settings=CONTEXT_SETTINGS)
@user_errors
def validate(
    adapter: _ValidateAdapter,
    onnx_dir: _ValidateOnnxDir,
    data: _ValidateData = None,
    split: _ValidateSplit = "test",
    max_examples: _ValidateMaxExamples = None,
    batch_sizes: _ValidateBatchSizes = None,
    seq_len: _ValidateSeqLen = None,
    repeats: _ValidateRepeats = None,
    warmup: _ValidateWarmup = None,
    max_seconds: _ValidateMaxSeconds = None,
    threads: _ValidateThreads = None,
    reference_onnx: _ValidateReferenceOnnx = None,
    base_model: _ValidateBaseModel = None,
    task: _ValidateTask = None,
    text_column: _ValidateTextColumn = None,
    label_column: _ValidateLabelColumn = None,
    output: _ValidateOutput = None,
    compare: _ValidateCompare = None,
    prompt_lengths: _ValidatePromptLengths = None,
    new_tokens: _ValidateNewTokens = None,
    force: Force = False,
) -> None:
    """Compare an ONNX export with its unmerged adapter: logits parity, label agreement, accuracy, latency.

    Works for single-task MetaTT, one task of a multi-task MetaTT adapter (--task) and the PEFT LoRA baseline.
    For decoders (docs/decoders.md): teacher-forced logits, greedy tokens, exact match and perplexity on
    --data, time to first token and decode tokens/s for PyTorch (unmerged, merged) and every bundle.
    """
    check_number(max_seconds, "--max-seconds", low=0)
    quiet_libraries()
    kind = validation_kind(adapter, onnx_dir)
    given: dict[str, Any] = {"data": data, "split": split, "max_examples": max_examples, "seq_len": seq_len, "repeats": repeats}
    given.update({"warmup": warmup, "max_seconds": max_seconds, "threads": threads, "reference_onnx": reference_onnx})
    given.update({"base_model": base_model, "task": task, "text_columns": split_list(text_column), "label_column": label_column})
    given.update({"output": output, "force": force, "log": typer.echo, "compare": compare, "new_tokens": new_tokens})
    given["batch_sizes"] = None if batch_sizes is None else int_list(batch_sizes, "--batch-sizes", "1,8")
    given["prompt_lengths"] = None if prompt_lengths is None else int_list(prompt_lengths, "--prompt-lengths", "32,256")
    report = kind.run_validation(adapter, onnx_dir, given)  # options left None take the kind's defaults (export/kinds.py)
    for line in kind.summary_lines(report, report_paths(onnx_dir, output)[1]):
        typer.echo(line)
