"""training/kinds.py: a run's task kind is decided once, from the --task-type, the model or the tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_decoders import save_tiny_decoder

from metatt_deploy.adapters.base_model import DEFAULT_DECODER, DEFAULT_MODEL
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import CAUSAL_LM, CLASSIFICATION
from metatt_deploy.training.causal import TIE_BREAK
from metatt_deploy.training.config import DEFAULT_EVAL_BATCH_SIZE
from metatt_deploy.training.data import TaskData
from metatt_deploy.training.kinds import CAUSAL_LM_KIND, CLASSIFIER_KIND, kind_for_model, kind_named, kind_of_task
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
