"""Evaluating causal language models: greedy generation with exact match, and perplexity.

Exact match compares the generated answer with the reference after SQuAD-style normalisation
(lower case, punctuation and the articles a/an/the removed, whitespace collapsed), so
"Positive." matches "positive". Perplexity is exp of the mean negative log-likelihood of the
reference response tokens (the end-of-turn token included), teacher-forced, over the whole split.
The same functions score PyTorch models and ONNX Runtime ones (export/validate_lm.py), so the
numbers compare.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metatt_deploy.training.lm_data import IGNORE, CausalCollator

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        return 0.0
    return sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)) / len(references)


def max_new_tokens_for(responses: Sequence[list[int]] | Sequence[int], slack: int = 2) -> int:
    """Enough new tokens for the longest reference answer (ids, or lengths) and a little more."""
    longest = max((r if isinstance(r, int) else len(r)) for r in responses) if responses else 1
    return longest + slack


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch (generation appends on the right) and its attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def strip_after_eos(ids: Sequence[int], eos: int | Sequence[int] | None) -> list[int]:
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    out = []
    for i in ids:
        if i in stops:
            break
        out.append(int(i))
    return out


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int = 16
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (ids), cut at the first EOS; batches sorted by length."""
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], pad)
        generated = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(rows):
            out[i] = strip_after_eos(generated[row, ids.shape[1] :].tolist(), tokenizer.eos_token_id)
    return out


@torch.no_grad()
def response_nll(model: nn.Module, features: Sequence[dict], pad_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Summed negative log-likelihood of the response tokens and their count (teacher-forced)."""
    model.eval()
    collate = CausalCollator(pad_id)
    total, count = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = collate(list(features[start : start + batch_size]))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total_b, count_b = nll_from_logits(logits, batch["labels"])
        total += total_b
        count += count_b
    return total, count


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed NLL, token count) of ``labels`` (-100 ignored) under next-token ``logits``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return float(loss), int((shift_labels != IGNORE).sum())


def evaluate_generation(model: nn.Module, tokenizer: Any, split: Any, batch_size: int = 16, max_new_tokens: int | None = None) -> dict:
    """Exact match of greedy answers and perplexity of the reference responses on a tokenized split.

    ``split`` holds input_ids, labels, prompt_length and response (lm_data.tokenize_text_task).
    Returns the metrics and the generated answers (``predictions``).
    """
    rows = split[:]
    features = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
    prompts = [ids[:n] for ids, n in zip(rows["input_ids"], rows["prompt_length"])]
    if max_new_tokens is None:
        max_new_tokens = max_new_tokens_for([len(ids) - n for ids, n in zip(rows["input_ids"], rows["prompt_length"])])
    generated = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    answers = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
    nll, count = response_nll(model, features, tokenizer.pad_token_id, batch_size)
    return {
        "exact_match": exact_match(answers, rows["response"]),
        "perplexity": math.exp(nll / max(count, 1)),
        "examples": len(prompts),
        "predictions": answers,
    }
