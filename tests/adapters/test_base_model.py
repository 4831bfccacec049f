"""Base models: a classifier checkpoint with another label count still serves as a base."""

from __future__ import annotations

from metatt_deploy.adapters.base_model import load_classifier


def test_a_classifier_base_with_another_label_count_gets_a_fresh_head(tiny_base) -> None:
    model = load_classifier(str(tiny_base), ["entailment", "neutral", "contradiction"])  # the base has 2 labels
    assert model.classifier.out_features == 3 and model.config.id2label[2] == "contradiction"
