"""The quality gate of quantized exports: the quantized graph against the fp32 graph it was made from.

Logits parity against PyTorch says little about a quantized graph (every int4 export differs by
several logits), and an export that exits 0 with "reported only" let a Gemma-3 int4 bundle ship
that had lost 50 points of exact match (issue 29). So ``export --quantize`` measures what users
see, on a small calibration set, before anything is written at the output path:

- **decoders** (int8, int4): each calibration example is a prompt and a continuation: the
  reference response of a task's validation split or of a data file, or, for the built-in
  prompts, the fp32 graph's own greedy continuation of ``GATE_NEW_TOKENS`` tokens. Both graphs
  read prompt + continuation teacher-forced (no generation loop, so the figure does not depend on
  where a first divergence happens). **Greedy agreement** is the share of continuation positions
  where the quantized graph's top token is the fp32 graph's; **perplexity** is that of the
  continuation tokens under each graph, and the gate bounds its relative increase.
- **classifiers** (int8, int8-static): **label agreement** with the fp32 graph on the calibration
  rows, fed one at a time (unpadded, so padding never decides a label).

Data, first that applies: ``--calibration DATA`` (a builtin task's validation split, never test;
a file whole), the adapter's own task when it is a builtin one (the run's validation split), else
built-in prompts (decoders) or the export's sample sentences plus those prompts (classifiers).

A failed gate is one line naming the numbers and the options that help; ``allow_loss`` records
the numbers and keeps the export.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.decoder_runs import chat_prompts, greedy, teacher_forced_logits
from metatt_deploy.export.quantize import load_calibration_rows
from metatt_deploy.training.builtin_data import BUILTIN_TASKS
from metatt_deploy.training.lm_data import PROMPTS, load_text_task, tokenize_text_task

DECODER_ROWS = 32
CLASSIFIER_ROWS = 256
GATE_NEW_TOKENS = 16
# Measured (docs/reports/int4.md, the movie-sentiment validation split): the default int4 agrees with fp32 on
# 91% (SmolLM2-135M) and 99% (Gemma-3 270M) of the answer tokens at +7% / +10% perplexity; the int4 forms
# that lost 14-50 points of exact match agreed on 83-89%. int8 classifiers: 90-98% label agreement (docs/int8.md).
MIN_AGREEMENT = 0.9
MAX_PPL_INCREASE = 0.1
MIN_LABEL_AGREEMENT = 0.9
GATE_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colours.",
    "Explain in one sentence why the sky is blue.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a famous painting by Leonardo da Vinci.",
    "Give me a synonym for 'happy'.",
    "Is the sentiment of this movie review positive or negative? Answer with one word: positive or negative.\n\n"
    "Review: A gripping, beautifully shot film with a superb cast.",
    "Is the sentiment of this movie review positive or negative? Answer with one word: positive or negative.\n\n"
    "Review: Two hours of my life I will never get back.",
    "Premise: A man is playing a guitar on stage.\nHypothesis: A person is performing music.\nDoes the premise entail the hypothesis?",
    "Write the first line of a story about a lighthouse keeper.",
    "What does a thermometer measure?",
    "Suggest a name for a small black cat.",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "How many legs does a spider have?",
]
HINTS = {
    "int4": "try more --int4-edge-layers, --int4-head-bits 8 or 32, --int4-block-size 16 or --int4-accuracy-level 0, or --quantize int8",
    "int8": "export fp32, or --quantize int4 for a decoder",
    "int8-static": "try --calibration-method, more --calibration-rows or --fp32-down-projections, or --quantize int8",
}


@dataclass(frozen=True)
class QualityGate:
    """Calibration data and thresholds of the gate; ``task`` (the adapter's task) is filled in by the export."""

    data: str | None = None
    rows: int | None = None
    min_agreement: float | None = None
    max_ppl_increase: float = MAX_PPL_INCREASE
    allow_loss: bool = False
    task: str | None = None

    def check(self) -> None:
        if self.rows is not None and self.rows < 1:
            raise MetaTTError(f"--calibration-rows is {self.rows}; give at least 1")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise MetaTTError(f"--gate-min-agreement is {self.min_agreement}; give a share between 0 and 1")
        if not self.max_ppl_increase >= 0:
            raise MetaTTError(f"--gate-max-ppl-increase is {self.max_ppl_increase}; give 0 or more (0.1 = +10%)")


# ---------------------------------------------------------------- decoders

Example = tuple[list[int], list[int] | None]  # (prompt ids, continuation ids or None: the fp32 graph's greedy one)


def decoder_examples(gate: QualityGate, tokenizer: Any, max_length: int, seed: int = 0) -> tuple[list[Example], str]:
    """Calibration examples for a decoder and where they came from."""
    rows = gate.rows or DECODER_ROWS
    data = gate.data or (gate.task if gate.task in PROMPTS else None)
    if data is None:
        prompts = chat_prompts(tokenizer, GATE_PROMPTS[:rows])
        return [(p, None) for p in prompts], f"{len(prompts)} built-in prompts, {GATE_NEW_TOKENS} greedy fp32 tokens each"
    path = Path(data)
    if path.suffix.lower() in (".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise MetaTTError(f"calibration file not found: {path}; pass a prompt/response JSONL file or a builtin task name")
        task, split = load_text_task(test=str(path), max_samples={"test": rows}, seed=seed), "test"
    else:
        task, split = load_text_task(dataset=data, max_samples={"validation": rows}, seed=seed), "validation"
    if split not in task.splits:
        raise MetaTTError(f"'{data}' has no {split} split to calibrate on; pass --calibration FILE")
    task.splits = {split: task.splits[split]}
    ds = tokenize_text_task(task, tokenizer, max_length)[split][:]
    examples: list[Example] = [(ids[:n], ids[n:]) for ids, n in zip(ds["input_ids"], ds["prompt_length"])]
    return examples, f"{data} ({'file' if split == 'test' else 'validation split'}, {len(examples)} rows, reference responses)"


@dataclass
class Scored:
    """Per example: the continuation scored, the graph's top token at each of its positions, and their NLL."""

    continuation: list[int]
    top: np.ndarray
    nll: np.ndarray


def score_decoder(model: Any, examples: Sequence[Example], eos: Any, pad: int, reference: Sequence[Scored] | None = None) -> list[Scored]:
    """Teacher-forced top tokens and NLL on each example's continuation (the reference's when given)."""
    out = []
    for i, (prompt, continuation) in enumerate(examples):
        if reference is not None:
            continuation = reference[i].continuation
        elif continuation is None:
            continuation = greedy(model, prompt, GATE_NEW_TOKENS, eos, pad)
        logits = teacher_forced_logits(model, prompt + continuation)[len(prompt) - 1 : len(prompt) + len(continuation) - 1]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        nll = -log_probs[np.arange(len(continuation)), continuation]
        out.append(Scored(list(continuation), logits.argmax(axis=-1), nll.astype(np.float64)))
    return out


def decoder_quality(fp32: Sequence[Scored], quantized: Sequence[Scored]) -> dict[str, Any]:
    """Greedy agreement and perplexities of the quantized graph against the fp32 one."""
    tokens = sum(len(s.continuation) for s in fp32)
    agree = sum(int((a.top == b.top).sum()) for a, b in zip(fp32, quantized))
    ppl_fp32 = math.exp(sum(float(s.nll.sum()) for s in fp32) / tokens)
    ppl = math.exp(sum(float(s.nll.sum()) for s in quantized) / tokens)
    return {
        "examples": len(fp32),
        "tokens": tokens,
        "greedy_agreement": agree / tokens,
        "perplexity_fp32": ppl_fp32,
        "perplexity": ppl,
        "perplexity_change": ppl - ppl_fp32,
        "perplexity_increase": ppl / ppl_fp32 - 1,
    }


def judge_decoder(record: dict[str, Any], gate: QualityGate, quantize: str, source: str) -> dict[str, Any]:
    """Add the thresholds and the verdict to ``record``; raise one line when it fails and loss is not allowed."""
    min_agreement = MIN_AGREEMENT if gate.min_agreement is None else gate.min_agreement
    passed = record["greedy_agreement"] >= min_agreement and record["perplexity_increase"] <= gate.max_ppl_increase
    record = {
        "reference": "the fp32 ONNX graph of this export, on the CPU execution provider",
        "calibration": source,
        **record,
        "thresholds": {"min_greedy_agreement": min_agreement, "max_perplexity_increase": gate.max_ppl_increase},
        "passed": passed,
        "kept_with_allow_quality_loss": not passed and gate.allow_loss,
    }
    if not passed and not gate.allow_loss:
        raise MetaTTError(
            f"the {quantize} export loses quality against its fp32 graph on {source}: greedy agreement "
            f"{record['greedy_agreement']:.1%} (minimum {min_agreement:.0%}), perplexity {record['perplexity_fp32']:.3f} -> "
            f"{record['perplexity']:.3f} ({record['perplexity_increase']:+.1%}, maximum +{gate.max_ppl_increase:.0%}); "
            f"{HINTS[quantize]}, or keep it with --allow-quality-loss"
        )
    return record


# ---------------------------------------------------------------- classifiers


def classifier_rows(gate: QualityGate, samples: Sequence[str]) -> tuple[list[tuple[str, ...]], str]:
    """Calibration rows for a classifier's gate and where they came from."""
    data = gate.data or (gate.task if gate.task in BUILTIN_TASKS else None)
    if data is None:  # the export's sample sentences and the decoders' prompts: one changed label is 4%, not 12%
        rows: list[tuple[str, ...]] = [(s,) for s in [*samples, *GATE_PROMPTS][: gate.rows or CLASSIFIER_ROWS]]
        return rows, f"{len(rows)} built-in sentences"
    return load_calibration_rows(data, max_rows=gate.rows or CLASSIFIER_ROWS)


def labels_of(run: Callable[[tuple[str, ...]], np.ndarray], rows: Sequence[tuple[str, ...]]) -> np.ndarray:
    """The predicted label of each row, fed alone."""
    return np.array([int(np.asarray(run(row)).reshape(-1).argmax()) for row in rows])


def judge_classifier(fp32: np.ndarray, quantized: np.ndarray, gate: QualityGate, quantize: str, source: str) -> dict[str, Any]:
    """Label agreement with the fp32 graph, thresholded; raise one line when it fails and loss is not allowed."""
    min_agreement = MIN_LABEL_AGREEMENT if gate.min_agreement is None else gate.min_agreement
    agreement = float((fp32 == quantized).mean())
    passed = agreement >= min_agreement
    if not passed and not gate.allow_loss:
        raise MetaTTError(
            f"the {quantize} export loses quality against its fp32 graph on {source}: label agreement {agreement:.1%} "
            f"(minimum {min_agreement:.0%}, {int((fp32 != quantized).sum())} of {len(fp32)} labels changed); "
            f"{HINTS[quantize]}, or keep it with --allow-quality-loss"
        )
    return {
        "reference": "the fp32 ONNX graph of this export, on the CPU execution provider",
        "calibration": source,
        "rows": len(fp32),
        "label_agreement": agreement,
        "labels_changed": int((fp32 != quantized).sum()),
        "thresholds": {"min_label_agreement": min_agreement},
        "passed": passed,
        "kept_with_allow_quality_loss": not passed and gate.allow_loss,
    }


def quality_summary(record: dict[str, Any]) -> str:
    """The export summary's line for a quality-gate record."""
    verdict = "passed" if record["passed"] else "FAILED, kept with --allow-quality-loss"
    if "label_agreement" in record:
        return f"quality gate {verdict}: label agreement with fp32 {record['label_agreement']:.1%} on {record['calibration']}"
    return (
        f"quality gate {verdict}: greedy agreement with fp32 {record['greedy_agreement']:.1%}, perplexity "
        f"{record['perplexity_fp32']:.3f} -> {record['perplexity']:.3f} ({record['perplexity_increase']:+.1%}) on {record['calibration']}"
    )
