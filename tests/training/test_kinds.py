"""training/kinds.py: a run's task kind is decided once, from the --task-type, the model or the tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_decoders import save_tiny_decoder, tiny_decoder
from tiny_models import tiny_model

from metatt_deploy.adapters.base_model import DEFAULT_DECODER, DEFAULT_MODEL
from metatt_deploy.adapters.model import build_config
from metatt_deploy.adapters.model_kinds import CAUSAL_LM_MODEL, CLASSIFIER_MODEL
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import CAUSAL_LM, CLASSIFICATION
from metatt_deploy.training.causal import TIE_BREAK
from metatt_deploy.training.config import DEFAULT_EVAL_BATCH_SIZE
from metatt_deploy.training.data import TaskData
from metatt_deploy.training.kinds import (
    CAUSAL_LM_KIND,
    CLASSIFIER_KIND,
    TaskSpec,
    kind_for_adapter,
    kind_for_model,
    kind_named,
    kind_of_task,
)
from metatt_deploy.training.lm_data import TextTask


def test_auto_reads_the_kind_from_the_model_and_a_named_kind_wins(tiny_base: Path, tmp_path: Path) -> None:
    decoder = save_tiny_decoder(tmp_path, "llama")
    assert kind_for_model(str(tiny_base)) is CLASSIFIER_KIND and kind_for_model(str(decoder)) is CAUSAL_LM_KIND
    assert kind_for_model(str(tiny_base), CAUSAL_LM) is CAUSAL_LM_KIND and kind_named(CLASSIFICATION) is CLASSIFIER_KIND
    with pytest.raises(MetaTTError, match="unknown --task-type 'seq2seq'; use auto, classification, causal-lm"):
        kind_named("seq2seq")


def test_a_causal_run_on_the_default_encoder_uses_the_embedded_decoder() -> None:
    assert CAUSAL_LM_KIND.model_or_default(DEFAULT_MODEL) == CAUSAL_LM_KIND.model_or_default(None) == DEFAULT_DECODER
    assert CLASSIFIER_KIND.model_or_default(None) == DEFAULT_MODEL and CAUSAL_LM_KIND.model_or_default("my/model") == "my/model"


def test_the_kind_of_a_task_follows_its_type() -> None:
    assert kind_of_task(TextTask.__new__(TextTask)) is CAUSAL_LM_KIND
    assert kind_of_task(TaskData.__new__(TaskData)) is CLASSIFIER_KIND
    with pytest.raises(MetaTTError, match="no task kind trains str"):
        kind_of_task("movie")  # type: ignore[arg-type]


def test_scores_pick_the_best_epoch_by_the_kinds_metric() -> None:
    fields, score = CLASSIFIER_KIND.score({"a": {"accuracy": 0.5}, "b": {"accuracy": 0.7}})
    assert fields["mean_accuracy"] == pytest.approx(0.6) and score == pytest.approx(0.6)
    fields, score = CAUSAL_LM_KIND.score({"a": {"exact_match": 0.5, "perplexity": 2.0}, "b": {"exact_match": 0.7, "perplexity": 4.0}})
    assert fields["mean_perplexity"] == pytest.approx(3.0) and score == pytest.approx(0.6 - TIE_BREAK * 3.0)
    assert CLASSIFIER_KIND.eval_batch_size(16) == DEFAULT_EVAL_BATCH_SIZE and CAUSAL_LM_KIND.eval_batch_size(16) == 32
    assert CAUSAL_LM_KIND.eval_batch_size(64) == 64


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_each_kind_reads_its_own_data_and_a_given_name_wins(tmp_path: Path) -> None:
    labelled = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(6)]
    pairs = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(6)]
    files = {"train": _jsonl(tmp_path / "cls.train.jsonl", labelled), "validation": _jsonl(tmp_path / "cls.val.jsonl", labelled)}
    task = CLASSIFIER_KIND.read(TaskSpec("mine", files=files), None, 0, {"label_column": "label", "text_columns": None})
    assert isinstance(task, TaskData) and task.name == "mine" and task.label_names == ["a", "b"]
    files = {"train": _jsonl(tmp_path / "qa.jsonl", pairs), "validation": _jsonl(tmp_path / "qa_val.jsonl", pairs)}
    text = CAUSAL_LM_KIND.read(TaskSpec(None, files=files), {"train": 3}, 0, {"label_column": "label"})
    assert isinstance(text, TextTask) and text.name == "qa" and len(text.splits["train"]) == 3  # named after its train file
    assert CAUSAL_LM_KIND.read(TaskSpec("answers", files=files), None, 0, {}).name == "answers"


def test_the_kind_of_an_extended_adapter_is_the_adapters_unless_asked() -> None:
    classifier = build_config(tiny_model("bert"), targets=["q", "v"], rank=2)
    decoder = build_config(tiny_decoder("llama", 300), targets=["q", "v"], rank=2)
    assert kind_for_adapter(classifier) is CLASSIFIER_KIND and kind_for_adapter(decoder) is CAUSAL_LM_KIND
    assert kind_for_adapter(classifier, CAUSAL_LM) is CAUSAL_LM_KIND
    assert CLASSIFIER_KIND.model is CLASSIFIER_MODEL and CAUSAL_LM_KIND.model is CAUSAL_LM_MODEL


def test_each_kind_summarises_a_single_task_run_in_one_line() -> None:
    result = {"task": "movie", "best": {"accuracy": 0.8125, "epoch": 2}, "test": {"accuracy": 0.75}}
    assert CLASSIFIER_KIND.summary(result) == "task 'movie': best validation accuracy 0.8125 (epoch 2); test accuracy 0.7500"
    result = {"task": "qa", "best": {"exact_match": 0.5, "epoch": 1}}
    assert CAUSAL_LM_KIND.summary(result) == "best validation exact match 0.5000 (epoch 1)"
    result["test"] = {"exact_match": 0.25, "perplexity": 3.14159}
    assert CAUSAL_LM_KIND.summary(result).endswith("; test exact match 0.2500, perplexity 3.142")
