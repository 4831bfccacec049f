"""metatt_deploy.adapters.model_kinds: the base model's kind is decided once, and each kind brings what differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_decoders import save_tiny_decoder, tiny_decoder
from tiny_models import ARCHS, inputs, tiny_model

from metatt_deploy.adapters.model import build_config
from metatt_deploy.adapters.model_kinds import (
    CAUSAL_LM_MODEL,
    CLASSIFIER_MODEL,
    adapter_kind,
    head_modules,
    model_kind,
    model_kind_named,
    peft_kind,
    saved_kind,
)
from metatt_deploy.common.errors import MetaTTError


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {arch: tiny_model(arch) for arch in ARCHS}


def test_head_modules(models) -> None:
    expected = {
        "bert": ["classifier"],
        "roberta": ["classifier"],
        "mpnet": ["classifier"],
        "distilbert": ["pre_classifier", "classifier"],
        "llama": ["score"],
        "gpt2": ["score"],
    }
    for arch, heads in expected.items():
        assert model_kind(models[arch]) is CLASSIFIER_MODEL
        assert head_modules(models[arch]) == heads
        for h in heads:
            models[arch].get_submodule(h)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_a_decoder_is_a_causal_lm_loaded_or_saved(tmp_path: Path, arch: str, tiny_base: Path) -> None:
    decoder = tiny_decoder(arch, 300)
    assert model_kind(decoder) is CAUSAL_LM_MODEL and head_modules(decoder) == []  # its LM head stays frozen, unshipped
    assert saved_kind(str(save_tiny_decoder(tmp_path, arch))) is CAUSAL_LM_MODEL
    assert saved_kind(str(tiny_base)) is CLASSIFIER_MODEL


def test_what_an_adapter_records_of_its_kind_is_unchanged(models) -> None:
    """A classifier's adapter records no task_type (as before the kinds), a decoder's records causal-lm; both read back."""
    classifier = build_config(models["bert"], targets=["q", "v"], rank=2)
    decoder = build_config(tiny_decoder("llama", 300), targets=["q", "v"], rank=2)
    assert "task_type" not in classifier.extra and classifier.kind is CLASSIFIER_MODEL and not classifier.kind.generates
    assert decoder.extra["task_type"] == "causal-lm" and decoder.kind is CAUSAL_LM_MODEL and decoder.kind.generates
    assert decoder.label_names == {"default": []} and decoder.head_modules == []
    assert adapter_kind({}) is CLASSIFIER_MODEL and adapter_kind({"task_type": "causal-lm"}) is CAUSAL_LM_MODEL
    with pytest.raises(MetaTTError, match="unknown task type 'seq2seq'; use causal-lm, classification"):
        model_kind_named("seq2seq")


def test_a_peft_folder_is_a_decoders_only_when_peft_says_causal_lm() -> None:
    assert peft_kind("CAUSAL_LM") is CAUSAL_LM_MODEL
    assert peft_kind(None) is peft_kind("SEQ_CLS") is CLASSIFIER_MODEL
    assert CAUSAL_LM_MODEL.peft_task_type == "CAUSAL_LM" and CLASSIFIER_MODEL.peft_task_type is None


def test_each_kind_computes_its_own_loss(models) -> None:
    """The classifier's loss is cross-entropy on its logits; the decoder's is the LM's own shifted loss."""
    x, labels = inputs(), torch.tensor([0, 1, 0])
    out = CLASSIFIER_MODEL.output(models["bert"].eval(), x, labels)
    reference = torch.nn.CrossEntropyLoss()(models["bert"](**x).logits, labels)
    assert torch.allclose(out.loss, reference)
    decoder = tiny_decoder("llama", 300).eval()
    ids = x["input_ids"] % 300
    lm = CAUSAL_LM_MODEL.output(decoder, {"input_ids": ids}, ids)
    logits = decoder(input_ids=ids).logits
    shifted = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert torch.allclose(lm.loss, shifted, atol=1e-5)
