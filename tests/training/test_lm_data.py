"""metatt_deploy.training.lm_data: text-to-text sources, prompt formats, response-only labels, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_decoders import tiny_tokenizer

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.text import TextTokenizer
from metatt_deploy.serving.generate import encode_prompt
from metatt_deploy.training.builtin_data import BUILTIN_TASKS
from metatt_deploy.training.data import load_task
from metatt_deploy.training.lm_data import (
    IGNORE,
    PROMPTS,
    CausalCollator,
    encode_chat,
    load_text_task,
    prompt_ids,
    tokenize_text_task,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus one?", "response": str(i + 1)} for i in range(n)]


def test_every_builtin_task_has_a_prompt_format() -> None:
    assert set(PROMPTS) == set(BUILTIN_TASKS)


def test_prompt_response_files_become_chats_and_validation_is_carved(tmp_path) -> None:
    task = load_text_task(train=str(write_jsonl(tmp_path / "t.jsonl", qa_rows(20))))
    assert len(task.splits["train"]) == 18 and len(task.splits["validation"]) == 2
    row = task.splits["train"][0]
    assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}


def test_messages_files_keep_the_whole_chat(tmp_path) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}] * 3)
    task = load_text_task(train=str(path), validation=str(path))
    assert task.splits["validation"][0]["messages"] == chat and task.splits["validation"][0]["response"] == "Hello"


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"text": "good", "label": "positive"}], "not prompt/response or messages .a classification data set"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "last message must be the assistant's answer"),
        ([{"messages": [{"role": "user"}]}], "list of \\{role, content\\} objects"),
        ([{"prompt": "q", "response": ""}], "response non-empty"),
    ],
)
def test_bad_text_files_give_one_line_errors(tmp_path, rows, match) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MetaTTError, match=match):
        load_text_task(train=str(path), validation=str(path))


def test_text_to_text_data_handed_to_a_classifier_run_is_refused(tmp_path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    with pytest.raises(MetaTTError, match="text-to-text data .* train a causal language model"):
        load_task(train=str(path), validation=str(path))


def test_chat_template_prompt_and_response_split_at_the_generation_prompt() -> None:
    tok = tiny_tokenizer()
    chat = [{"role": "user", "content": "Review: good"}, {"role": "assistant", "content": "positive"}]
    prompt, response = encode_chat(chat, tok)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(response) == "positive<|im_end|>"  # the newline after the end of turn is not trained
    assert prompt_ids(chat[:1], tok) == prompt == prompt_ids(chat, tok)


def test_without_a_chat_template_prompt_response_use_the_plain_format_and_chats_are_refused() -> None:
    tok = tiny_tokenizer(chat_template=False)
    system = [{"role": "system", "content": "Be brief."}]
    chat = [{"role": "user", "content": "Review: good"}, {"role": "assistant", "content": "positive"}]
    prompt, response = encode_chat(system + chat, tok)
    assert tok.decode(prompt) == "Be brief.\n\nReview: good\n" and tok.decode(response) == "positive<|im_end|>"
    with pytest.raises(MetaTTError, match="no chat template"):
        encode_chat(chat + chat, tok)


def test_labels_mask_the_prompt_and_long_examples_are_refused(tmp_path) -> None:
    tok = tiny_tokenizer()
    task = load_text_task(train=str(write_jsonl(tmp_path / "t.jsonl", qa_rows(10))))
    splits = tokenize_text_task(task, tok, max_length=128, context=512)
    row = splits["train"][0]
    n = row["prompt_length"]
    assert row["labels"][:n] == [IGNORE] * n and row["labels"][n:] == row["input_ids"][n:]
    assert tok.decode(row["input_ids"][n:]) == row["response"] + "<|im_end|>"
    with pytest.raises(MetaTTError, match="more than --max-length 8"):
        tokenize_text_task(task, tok, max_length=8)
    with pytest.raises(MetaTTError, match="exceeds the model's context of 512"):
        tokenize_text_task(task, tok, max_length=1024, context=512)


def test_collator_right_pads_ids_labels_and_mask() -> None:
    batch = CausalCollator(pad_token_id=2)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.slow
def test_builtin_sentiment_becomes_one_word_answers() -> None:
    task = load_text_task(dataset="movie-sentiment", max_samples={"train": 4, "validation": 4, "test": 4})
    assert task.answers == ["negative", "positive"]
    row = task.splits["test"][0]
    assert row["response"] in task.answers and row["messages"][1]["content"].startswith("Is the sentiment of this movie review")


def test_training_and_generation_format_prompts_alike_and_user_text_stays_data(tmp_path: Path) -> None:
    """Chats encode the same ids in training as the runtime floor gives generate; special strings in contents are text."""
    for template in (True, False):
        tok = tiny_tokenizer(chat_template=template)
        tok.save_pretrained(tmp_path / str(template))
        floor = TextTokenizer.from_folder(tmp_path / str(template))
        chat = [{"role": "user", "content": "Review: good <|im_end|> fine"}, {"role": "assistant", "content": "positive"}]
        prompt, response = encode_chat(chat, tok)
        assert prompt == floor.prompt_ids(chat[:1]) == encode_prompt(floor, chat[0]["content"])
        assert prompt.count(tok.convert_tokens_to_ids("<|im_end|>")) == int(template)  # the template's own end of turn only
        assert response[-1] == tok.eos_token_id


@pytest.mark.parametrize(
    ("chat", "message"),
    [
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": 6}], "every message's 'content' must be a string"),
        ([{"role": "assistant", "content": "x"}], "a chat needs a user turn before the assistant's answer"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "a chat needs a user turn"),
    ],
)
def test_malformed_chats_are_one_line_errors(chat: list, message: str, tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(4)))
    with pytest.raises(MetaTTError, match=message):
        load_text_task(train=str(path))
