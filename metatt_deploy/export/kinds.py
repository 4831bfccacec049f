"""The export kind of a model, chosen once: what differs between exporting and validating a classifier and a causal LM.

One `ExportKind` per task kind (keyed like the manifests, ``inference.formats.CLASSIFICATION`` /
``CAUSAL_LM``) brings its base model's kind (adapters/model_kinds.py), the manifest's
``pipeline_task``, its export pipeline (onnx_classifier.py, onnx_lm.py), the export options it
does not take, its validation routine (validate.py, validate_lm.py) with the options that routine
takes, its defaults, and the lines a person reads after it. `EXPORT_KINDS` is the dispatch list
(PEFT's ``_create_new_module`` style, as training/kinds.py); `source_kind` (what ``export_onnx``
is given: an adapter's recorded kind, else a model folder's saved architectures) and `bundle_kind`
(an export's manifest) are the only places export/ decides a kind. Options a kind does not take
are refused with one line naming them and the kind, before anything is loaded or written; both
kinds check the adapter's weights sha256 (export/reference.py) and write their reports beside the
bundle, never inside it.

`validate` is the public validation entry point: it reads the bundle's kind and runs that kind's routine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metatt_deploy.adapters.config import CONFIG_NAME, MetaTTConfig
from metatt_deploy.adapters.lora import is_lora_adapter, lora_task_type
from metatt_deploy.adapters.model_kinds import CAUSAL_LM_MODEL, CLASSIFIER_MODEL, ModelKind, saved_kind
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export import validate as validate_cls
from metatt_deploy.export import validate_lm
from metatt_deploy.export.onnx_classifier import export_classifier_into
from metatt_deploy.export.onnx_lm import export_decoder_into
from metatt_deploy.export.options import ExportOptions
from metatt_deploy.export.quantize import DECODER_ONLY
from metatt_deploy.inference.formats import CLASSIFIER_PIPELINE, DECODER_PIPELINE, read_manifest

DECODER_QUANTIZE = (None, "int8", "int4")  # weight-only int4 and dynamic int8 (with its float32 exclusions, export/quantize.py)
SHARED_VALIDATE = ("data", "split", "max_examples", "repeats", "threads", "base_model", "output", "force", "log")


def _classifier_refused(options: ExportOptions) -> list[str]:
    """The CLI options a classifier export does not take: the decoders' weight-only quantization."""
    return [f"--quantize {options.quantize}"] if options.quantize in DECODER_ONLY else []


def _decoder_refused(options: ExportOptions) -> list[str]:
    """The CLI options a decoder export does not take: a KV-cache graph exports as an optimum bundle, fp32, int8 or int4."""
    given = {
        "--optimize": options.optimize,
        f"--dtype {options.dtype}": options.dtype != "fp32",
        f"--quantize {options.quantize}": options.quantize not in DECODER_QUANTIZE,
        f"--layout {options.layout}": options.layout != "optimum",
        f"--format {','.join(f for f in options.formats if f != 'onnx')}": set(options.formats) != {"onnx"},
    }
    return [option for option, set_ in given.items() if set_]


def flag(keyword: str) -> str:
    """The CLI option of a validation keyword (``text_columns`` is given as --text-column, once per column)."""
    return "--text-column" if keyword == "text_columns" else "--" + keyword.replace("_", "-")


def refuse(given: Sequence[str], what: str, hint: str) -> None:
    """One line naming every option ``given`` that ``what`` does not take, and what it does take (``hint``)."""
    if given:
        one = len(given) == 1
        raise MetaTTError(f"{', '.join(given)} {'does' if one else 'do'} not apply to {what}; drop {'it' if one else 'them'} ({hint})")


@dataclass(frozen=True)
class ExportKind:
    """What a kind of model brings to export and validation; one instance per kind, in `EXPORT_KINDS`."""

    model: ModelKind  # the base model's kind (adapters/model_kinds.py): its name keys manifests and reports
    noun: str  # what a person calls it in a message: "classifier", "decoder"
    pipeline: str  # the manifest's pipeline_task (optimum's task)
    export_into: Callable[[Path, Path, Any, ExportOptions], dict]  # (temporary bundle, source folder, HF config, options) -> fields
    export_refused: Callable[[ExportOptions], list[str]]  # options -> the CLI options given that this kind does not take
    export_hint: str  # what this kind does export, for the refusal
    validate: Callable[..., dict]  # (adapter, bundle, **options) -> the report, written beside the bundle
    validate_options: tuple[str, ...]  # the keywords of `validate` this kind's routine takes
    validate_hint: str
    summary_lines: Callable[[dict, Path], list[str]]  # (report, its markdown) -> the lines a person reads

    @property
    def name(self) -> str:
        return self.model.name

    def check_export(self, options: ExportOptions, source: Path) -> None:
        refuse(self.export_refused(options), f"a {self.noun} export ({source})", self.export_hint)

    def run_validation(self, adapter_dir: str | Path, onnx_dir: str | Path, given: dict[str, Any]) -> dict:
        """The kind's validation with the options ``given`` (not None): those it does not take refused first, in one line."""
        given = {k: v for k, v in given.items() if v is not None}
        adapter = _adapter_kind(Path(adapter_dir))  # None: no adapter, which the kind's validation says in its own words
        if adapter is not None and adapter is not self:
            raise MetaTTError(
                f"{adapter_dir} is a {adapter.noun}'s adapter and {onnx_dir} a {self.noun} export; validate the export of this adapter"
            )
        refuse([flag(k) for k in given if k not in self.validate_options], f"a {self.noun} export ({onnx_dir})", self.validate_hint)
        return self.validate(adapter_dir, onnx_dir, **given)  # options left out take the routine's own defaults


CLASSIFIER_EXPORT = ExportKind(
    model=CLASSIFIER_MODEL,
    noun="classifier",
    pipeline=CLASSIFIER_PIPELINE,
    export_into=export_classifier_into,
    export_refused=_classifier_refused,
    export_hint="a classifier exports fp32, --optimize, --dtype fp16, --quantize int8 or int8-static",
    validate=validate_cls.validate_classifier,
    validate_options=(
        *SHARED_VALIDATE,
        *("batch_sizes", "seq_len", "warmup", "max_seconds", "reference_onnx", "task", "text_columns", "label_column"),
    ),
    validate_hint="a classifier takes --batch-sizes, --seq-len, --warmup, --max-seconds, --reference-onnx, --task and the column options",
    summary_lines=validate_cls.summary_lines,
)
DECODER_EXPORT = ExportKind(
    model=CAUSAL_LM_MODEL,
    noun="decoder",
    pipeline=DECODER_PIPELINE,
    export_into=export_decoder_into,
    export_refused=_decoder_refused,
    export_hint="a decoder exports a KV-cache optimum bundle: fp32, --quantize int8 or --quantize int4",
    validate=validate_lm.validate_decoder,
    validate_options=(*SHARED_VALIDATE, "compare", "prompt_lengths", "new_tokens"),
    validate_hint="a decoder takes --compare for more bundles, --prompt-lengths and --new-tokens",
    summary_lines=validate_lm.summary_lines,
)
EXPORT_KINDS: tuple[ExportKind, ...] = (CLASSIFIER_EXPORT, DECODER_EXPORT)


def export_kind_named(name: str) -> ExportKind:
    for kind in EXPORT_KINDS:
        if kind.name == name:
            return kind
    raise MetaTTError(f"no export kind for task type '{name}'; use {', '.join(k.name for k in EXPORT_KINDS)}")


def _adapter_kind(folder: Path) -> ExportKind | None:
    """The kind a MetaTT or LoRA adapter folder records; None for a folder that is no adapter."""
    if (folder / CONFIG_NAME).is_file():
        return export_kind_named(MetaTTConfig.load(folder).kind.name)
    if is_lora_adapter(folder):
        return export_kind_named(lora_task_type(folder))
    return None


def source_kind(model_dir: Path) -> ExportKind:
    """The kind of what ``export_onnx`` is given: a MetaTT or LoRA adapter's recorded kind, else the model folder's saved architectures."""
    return _adapter_kind(model_dir) or export_kind_named(saved_kind(str(model_dir)).name)


def bundle_kind(onnx_dir: str | Path) -> ExportKind:
    """The kind of an export bundle, from its manifest's ``pipeline_task`` (bundles before kinds recorded no task_type)."""
    manifest = read_manifest(onnx_dir)
    for kind in EXPORT_KINDS:
        if manifest.get("pipeline_task") == kind.pipeline:
            return kind
    return CLASSIFIER_EXPORT  # bundles older than pipeline_task are classifiers


def validation_kind(adapter_dir: str | Path, onnx_dir: str | Path) -> ExportKind:
    """The kind whose validation compares ``onnx_dir`` with ``adapter_dir``: the bundle's, once both folders exist."""
    if not Path(adapter_dir).is_dir():
        raise MetaTTError(f"adapter directory not found: {adapter_dir}; pass the adapter folder (a run's best/)")
    if not Path(onnx_dir).is_dir():
        raise MetaTTError(f"ONNX directory not found: {onnx_dir}; pass a folder written by metatt-deploy export")
    return bundle_kind(onnx_dir)


def validate(
    adapter_dir: str | Path,
    onnx_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    max_examples: int | None = None,
    batch_sizes: Sequence[int] | None = None,
    seq_len: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    max_seconds: float | None = None,
    threads: int | None = None,
    reference_onnx: str | Path | None = None,
    base_model: str | None = None,
    task: str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    output: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    compare: Sequence[str | Path] | None = None,
    prompt_lengths: Sequence[int] | None = None,
    new_tokens: int | None = None,
) -> dict:
    """Compare the ONNX export in ``onnx_dir`` with its unmerged adapter; write the report beside the bundle and return it.

    The bundle's kind (`bundle_kind`) runs its own validation: a classifier's (validate.py: logits,
    labels, accuracy, latency per batch size; ``batch_sizes`` (1, 8), ``seq_len`` 128, ``repeats``
    30, ``warmup`` 3, ``max_seconds`` 60, ``label_column`` "label" when left None) or a decoder's
    (validate_lm.py: logits, greedy tokens, exact match, perplexity, time to first token and
    tokens/s; ``data`` required, ``max_examples`` 50, ``repeats`` 10, ``compare`` more bundles).
    An option given (not None) that the bundle's kind does not take is refused with one line, before any work.
    """
    given = {
        "data": data,
        "split": split,
        "max_examples": max_examples,
        "batch_sizes": batch_sizes,
        "seq_len": seq_len,
        "repeats": repeats,
        "warmup": warmup,
        "max_seconds": max_seconds,
        "threads": threads,
        "reference_onnx": reference_onnx,
        "base_model": base_model,
        "task": task,
        "text_columns": text_columns,
        "label_column": label_column,
        "output": output,
        "force": force,
        "log": log,
        "compare": compare,
        "prompt_lengths": prompt_lengths,
        "new_tokens": new_tokens,
    }
    return validation_kind(adapter_dir, onnx_dir).run_validation(adapter_dir, onnx_dir, given)
