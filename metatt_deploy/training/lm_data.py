"""Text-to-text data for causal language models: loading, prompt formats, tokenization, batches.

Every source becomes one shape: a ``messages`` column (a chat, ``[{"role", "content"}, ...]``,
whose last message is the assistant's answer to learn) and a ``response`` column (that answer as
text, for exact match). Sources:

- a builtin classification task (``--dataset movie-sentiment``, ``snli``, ...): each row becomes
  a question whose answer is its label name, with the prompt formats in ``PROMPTS`` (documented
  in docs/decoders.md);
- JSONL/JSON files with ``prompt`` and ``response`` fields, or a chat ``messages`` field.

Tokenization applies the model's chat template when it has one (the prompt is the template of
all messages but the last with the generation prompt; the response is what the full chat adds
after it, up to and including the end-of-turn token). Without a template, prompt/response data
use the plain format ``[system + "\\n\\n"] + prompt + "\\n"`` then ``response + EOS``; longer chats need a
template. Labels
are -100 on the prompt, so the loss covers the response tokens only.
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.text import TextTokenizer
from metatt_deploy.training.data import SPLITS, load_task, read_data_file

IGNORE = -100
# builtin task -> (system message, user message with the row's text columns); the answer is the label
# name. A short system message of our own: a chat template without one inserts its default
# (SmolLM2's costs 17 tokens per example, which CPU time pays for). The question and the answer
# words go in the user turn: the untouched SmolLM2 answered in sentences when the question sat in
# the system turn (zero-shot exact match 3% on 32 movie reviews; 34% as below; measured once).
SYSTEM = "You are a helpful assistant."
SENTIMENT = "Is the sentiment of this {what} positive or negative? Answer with one word: positive or negative.\n\n{label}: {{text}}"
PROMPTS: dict[str, tuple[str, str]] = {
    "movie-sentiment": (SYSTEM, SENTIMENT.format(what="movie review", label="Review")),
    "amazon-sentiment": (SYSTEM, SENTIMENT.format(what="product review", label="Review")),
    "nyt-sentiment": (SYSTEM, SENTIMENT.format(what="newspaper sentence", label="Sentence")),
    "tweet-sentiment": (SYSTEM, SENTIMENT.format(what="tweet", label="Tweet")),
    "snli": (
        SYSTEM,
        "Does the premise entail the hypothesis? Answer with one word: entailment, neutral or contradiction.\n\n"
        "Premise: {premise}\nHypothesis: {hypothesis}",
    ),
}


@dataclass
class TextTask:
    """A text-to-text task: ``splits`` hold ``messages`` and ``response``; ``answers`` is the closed
    answer set of a builtin task (None for free-form data)."""

    name: str
    splits: dict[str, Dataset]
    answers: list[str] | None = None

    @property
    def label_names(self) -> list[str]:
        """No classes: a decoder answers in text (adapter records keep an empty list)."""
        return []


def load_text_task(
    *,
    dataset: str | None = None,
    train: str | None = None,
    validation: str | None = None,
    test: str | None = None,
    max_samples: dict[str, int] | None = None,
    seed: int = 0,
) -> TextTask:
    """A builtin task as text-to-text, or prompt/response / messages files."""
    if dataset:
        if train or validation or test:
            raise MetaTTError("pass either --dataset or data files (--train/--validation/--test), not both")
        if dataset not in PROMPTS:
            raise MetaTTError(
                f"'{dataset}' has no text-to-text form; causal LMs train on a builtin task ({', '.join(PROMPTS)}) "
                "or on JSONL files with prompt/response or messages fields"
            )
        task = load_task(dataset=dataset, max_samples=max_samples, seed=seed)
        system, user = PROMPTS[dataset]
        splits = {
            split: ds.map(
                lambda row, names=task.label_names, columns=task.text_columns: as_chat(
                    user.format(**{c: row[c] for c in columns}), names[row["label"]], system
                ),
                remove_columns=ds.column_names,
                desc=f"{dataset} {split} as text",
            )
            for split, ds in task.splits.items()
        }
        return TextTask(dataset, splits, list(task.label_names))
    files = {split: path for split, path in zip(SPLITS, (train, validation, test)) if path}
    if not files:
        raise MetaTTError("no data given; pass --dataset NAME or --train FILE (JSONL with prompt/response or messages)")
    splits = {split: _text_split(Path(path)) for split, path in files.items()}
    if "train" in splits and "validation" not in splits:
        if len(splits["train"]) < 2:
            raise MetaTTError(
                f"{files['train']} has {len(splits['train'])} row, too few to carve a validation split from; pass --validation"
            )
        parts = splits["train"].train_test_split(test_size=max(1, len(splits["train"]) // 10), shuffle=True, seed=0)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    if max_samples:
        splits = {
            s: ds.shuffle(seed=seed).select(range(max_samples[s])) if max_samples.get(s, len(ds)) < len(ds) else ds
            for s, ds in splits.items()
        }
    return TextTask(Path(files.get("train") or next(iter(files.values()))).stem, splits)


def as_chat(prompt: str, response: str, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": messages, "response": response}


def _text_split(path: Path) -> Dataset:
    """One file of prompt/response or messages rows; a classification file is refused with a hint."""
    ds = read_data_file(path)
    columns = ds.column_names
    if "messages" in columns:
        rows = ds.select_columns(["messages"])[:]["messages"]
        for i, chat in enumerate(rows, 1):
            if (
                not chat
                or not isinstance(chat, list)
                or any(not isinstance(m, dict) or "role" not in m or "content" not in m for m in chat)
            ):
                raise MetaTTError(f"row {i} of {path.name}: 'messages' must be a list of {{role, content}} objects; fix the file")
            if any(not isinstance(m["content"], str) for m in chat):
                raise MetaTTError(f"row {i} of {path.name}: every message's 'content' must be a string; fix the file")
            if chat[-1]["role"] != "assistant":
                raise MetaTTError(
                    f"row {i} of {path.name}: the last message must be the assistant's answer (role 'assistant'); fix the file"
                )
            if not any(m["role"] == "user" for m in chat[:-1]):
                raise MetaTTError(f"row {i} of {path.name}: a chat needs a user turn before the assistant's answer; fix the file")
        return Dataset.from_dict({"messages": rows, "response": [chat[-1]["content"] for chat in rows]})
    if "prompt" in columns and "response" in columns:
        values = ds.select_columns(["prompt", "response"])[:]
        for i, (p, r) in enumerate(zip(values["prompt"], values["response"]), 1):
            if not isinstance(p, str) or not isinstance(r, str) or not r.strip():
                raise MetaTTError(f"row {i} of {path.name}: 'prompt' and 'response' must be text, the response non-empty; fix the file")
        return Dataset.from_list([as_chat(p, r) for p, r in zip(values["prompt"], values["response"])])
    hint = (
        " (a classification data set: train a classifier on it with --task-type classification and an encoder model)"
        if "label" in columns
        else ""
    )
    raise MetaTTError(
        f"{path.name} has columns {', '.join(columns)}, not prompt/response or messages{hint}; causal LMs need text-to-text data"
    )


# ---------------------------------------------------------------- tokenization


_TEXT_TOKENIZERS: weakref.WeakKeyDictionary[Any, TextTokenizer] = weakref.WeakKeyDictionary()


def text_tokenizer(tokenizer: Any) -> TextTokenizer:
    """The runtime floor's tokenizer for a transformers tokenizer (its files written once, then cached per tokenizer).

    Training formats chats through the same `TextTokenizer` that `generate` and `serve` use, so a
    model is trained on exactly the ids it is served with, user text encoded as data in both.
    """
    cached = _TEXT_TOKENIZERS.get(tokenizer)
    if cached is None:
        with tempfile.TemporaryDirectory(prefix="metatt-tok-") as folder:
            tokenizer.save_pretrained(folder)
            cached = _TEXT_TOKENIZERS[tokenizer] = TextTokenizer.from_folder(folder)
    return cached


def encode_chat(messages: Sequence[dict], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a chat whose last message is the answer; message contents are encoded as data."""
    tok = text_tokenizer(tokenizer)
    if tok.chat_template:
        prompt = tok.chat_ids(list(messages[:-1]), add_generation_prompt=True)
        full = tok.chat_ids(list(messages), add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise MetaTTError("this model's chat template does not write the answer after the generation prompt; pass prompt/response data")
        response = full[len(prompt) :]
        eos = tok.eos_token_id
        if eos in response:  # drop what the template writes after the end of the turn (a newline)
            response = response[: response.index(eos) + 1]
        return prompt, response
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise MetaTTError(
            "this model's tokenizer has no chat template, so chats cannot be formatted; pass prompt/response data or a chat model"
        )
    prompt = tok.prompt_ids(list(messages[:-1]))
    return prompt, tok.encode_text(messages[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]


def prompt_ids(messages: Sequence[dict], tokenizer: Any) -> list[int]:
    """The ids a model generates after: the prompt part of ``encode_chat`` (``messages`` ends with the answer or not)."""
    if messages and messages[-1]["role"] == "assistant":
        return encode_chat(messages, tokenizer)[0]
    return encode_chat([*messages, {"role": "assistant", "content": ""}], tokenizer)[0]


def tokenize_text_task(task: TextTask, tokenizer: Any, max_length: int, context: int | None = None) -> dict[str, Dataset]:
    """input_ids, labels (-100 on the prompt), prompt_length and response per split, unpadded."""
    if context is not None and max_length > context:
        raise MetaTTError(f"--max-length {max_length} exceeds the model's context of {context} tokens; lower --max-length")
    out = {}
    for split, ds in task.splits.items():
        encoded = ds.map(
            _encode_rows, batched=True, remove_columns=["messages"], fn_kwargs={"tokenizer": tokenizer}, desc=f"tokenizing {split}"
        )
        lengths = [len(ids) for ids in encoded["input_ids"]]
        too_long = next((i for i, n in enumerate(lengths) if n > max_length), None)
        if too_long is not None:
            limit = f"; the model's context is {context}" if context else ""
            raise MetaTTError(
                f"example {too_long + 1} of the {split} split has {lengths[too_long]} tokens, more than --max-length {max_length}"
                f"{limit}: raise --max-length or shorten the data"
            )
        out[split] = encoded
    return out


def _encode_rows(batch: dict[str, list], tokenizer: Any) -> dict[str, list]:
    ids, labels, prompt_lengths = [], [], []
    for messages in batch["messages"]:
        prompt, response = encode_chat(messages, tokenizer)
        ids.append(prompt + response)
        labels.append([IGNORE] * len(prompt) + response)
        prompt_lengths.append(len(prompt))
    return {"input_ids": ids, "labels": labels, "prompt_length": prompt_lengths}


class CausalCollator:
    """Right-pads input_ids (pad id), labels (-100) and the attention mask of a training batch."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
