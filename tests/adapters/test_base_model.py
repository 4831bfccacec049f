"""metatt_deploy.adapters.base_model: what a base checkpoint lacks, label counts, local paths.

Issue 10's silent wrong answer: a bare encoder checkpoint (no pooler) loaded as a sequence
classifier gets a random pooler on every load, so two loads of one adapter disagreed. The pooler
now trains and ships with the head, and the fingerprint covers every base weight outside it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny_models import inputs, logits, random_cores
from transformers import BertConfig, BertForSequenceClassification, BertModel

from metatt_deploy.adapters.base_model import friendly_load, load_classifier, load_tokenizer, resolve_model
from metatt_deploy.adapters.model import attach, build_config, load_adapter, save_adapter
from metatt_deploy.adapters.model_kinds import head_modules
from metatt_deploy.adapters.targets import NEW_MODULES_ATTR
from metatt_deploy.common.errors import MetaTTError

CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """An encoder saved without its pooler, as sentence-embedding checkpoints are."""
    torch.manual_seed(0)
    BertModel(BertConfig(**CONFIG), add_pooling_layer=False).save_pretrained(tmp_path / "bare")
    return tmp_path / "bare"


def test_a_missing_pooler_trains_and_ships_with_the_head(bare: Path, tmp_path: Path) -> None:
    model = load_classifier(str(bare), ["neg", "pos"])
    assert getattr(model, NEW_MODULES_ATTR) == ["bert.pooler.dense"]
    assert head_modules(model) == ["bert.pooler.dense", "classifier"]
    config = build_config(model, rank=3, base_model=str(bare))
    assert config.head_modules == ["bert.pooler.dense", "classifier"]
    attach(model, config, random_cores(config.core_shapes()))
    assert model.bert.pooler.dense.weight.requires_grad  # trained with the head
    adapter = save_adapter(model, tmp_path / "adapter")
    batch = inputs()
    expected = logits(model.eval(), batch)
    first = load_adapter(adapter, tokenizer=False)[0]
    second = load_adapter(adapter, tokenizer=False)[0]
    # two loads agree with each other and with the trained model (before: 0% label agreement)
    assert torch.equal(logits(first, batch), expected) and torch.equal(logits(second, batch), expected)


def test_fingerprint_covers_every_base_weight_outside_the_head(bare: Path, tmp_path: Path) -> None:
    model = load_classifier(str(bare), ["neg", "pos"])
    config = build_config(model, rank=3, base_model=str(bare))
    attach(model, config)
    adapter = save_adapter(model, tmp_path / "adapter")
    changed = BertModel.from_pretrained(bare, add_pooling_layer=False)
    with torch.no_grad():
        changed.embeddings.LayerNorm.weight[0] += 1e-3  # not an adapted module
    changed.save_pretrained(tmp_path / "changed")
    with pytest.raises(MetaTTError, match="fingerprint"):
        load_adapter(adapter, base_model=str(tmp_path / "changed"), tokenizer=False)


def test_an_adapter_that_does_not_carry_a_missing_module_is_refused(bare: Path, tmp_path: Path) -> None:
    """A format-1 style adapter (head = classifier only) on a pooler-less checkpoint would be random."""
    full = tmp_path / "full"
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2))
    model.save_pretrained(full)
    config = build_config(model, rank=3, base_model=str(full))
    attach(model, config)
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(MetaTTError, match=r"lacks trained weights for bert\.pooler\.dense and the adapter does not carry them"):
        load_adapter(adapter, base_model=str(bare), tokenizer=False)


def test_missing_encoder_weights_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**CONFIG))
    state = {k: v for k, v in model.state_dict().items() if ".layer.1.attention.self.query." not in k}
    model.save_pretrained(tmp_path / "holey", state_dict=state)
    with pytest.raises(MetaTTError, match=r"lacks trained weights for bert\.encoder\.layer\.1\.attention\.self\.query"):
        load_classifier(str(tmp_path / "holey"), ["a", "b"])


def test_more_classes_than_the_checkpoints_head(tmp_path: Path) -> None:
    BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2)).save_pretrained(tmp_path / "two")
    model = load_classifier(str(tmp_path / "two"), ["a", "b", "c", "d", "e"])
    assert model.classifier.out_features == 5 and getattr(model, NEW_MODULES_ATTR) == []


def test_fewer_than_two_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MetaTTError, match="at least two labels, got 1 \\(pos\\)"):
        load_classifier(str(tmp_path), ["pos"])


@pytest.mark.parametrize("name", ["./no/such/model", "/abs/missing", "../up/missing", "a/b/c", "~/x", "missing/"])
def test_a_missing_local_looking_path_fails_at_once(name: str) -> None:
    start = time.perf_counter()
    with pytest.raises(MetaTTError, match=f"model folder not found: {name}"):
        resolve_model(name)
    assert time.perf_counter() - start < 1.0  # no hub retries


def test_hub_names_and_files(tmp_path: Path) -> None:
    assert resolve_model("org/model") == "org/model" and resolve_model("roberta-base") == "roberta-base"
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(MetaTTError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_a_classifier_base_with_another_label_count_gets_a_fresh_head(tiny_base) -> None:
    model = load_classifier(str(tiny_base), ["entailment", "neutral", "contradiction"])  # the base has 2 labels
    assert model.classifier.out_features == 3 and model.config.id2label[2] == "contradiction"


def absent() -> None:
    raise OSError("org/absent is not a local folder and the hub cannot be reached")


def test_a_corrupt_weights_or_tokenizer_file_is_one_line(tiny_base, tmp_path: Path) -> None:
    """safetensors raises SafetensorError and tokenizers a bare Exception: both become one MetaTTError line (issue 27 fuzz)."""
    weights = Path(shutil.copytree(tiny_base, tmp_path / "weights"))
    path = next(weights.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MetaTTError, match="cannot load model.*damaged or incomplete; save or copy the model again"):
        load_classifier(str(weights), ["a", "b"])
    tokenizer = Path(shutil.copytree(tiny_base, tmp_path / "tokenizer"))
    (tokenizer / "tokenizer.json").write_text("")
    with pytest.raises(MetaTTError, match="cannot load tokenizer.*damaged or incomplete"):
        load_tokenizer(str(tokenizer))
    with pytest.raises(MetaTTError, match="a hub name while online"):  # a name that is no folder: the hub hint
        friendly_load(absent, "org/absent", "tokenizer")
