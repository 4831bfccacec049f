"""Tiny random-config models of every architecture metatt-deploy knows, for fast tests.

Shared by test_targets.py, test_model.py and test_peft_export.py (pytest puts this folder on
sys.path). Every model is a few thousand parameters, built from a fixed seed, in eval mode.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

HIDDEN, LAYERS, HEADS, FFN, VOCAB, LABELS = 32, 2, 4, 48, 64, 3
HEAD_DIM = HIDDEN // HEADS
KV_HEADS = 2  # LLaMA: grouped-query attention, k/v are HIDDEN * KV_HEADS / HEADS wide

_COMMON = dict(vocab_size=VOCAB, num_labels=LABELS, max_position_embeddings=64)
_BERTLIKE = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN, **_COMMON)

ARCHS = {
    "bert": (BertConfig, BertForSequenceClassification, dict(_BERTLIKE)),
    "roberta": (RobertaConfig, RobertaForSequenceClassification, dict(_BERTLIKE, pad_token_id=1)),
    "mpnet": (MPNetConfig, MPNetForSequenceClassification, dict(_BERTLIKE)),
    "distilbert": (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, **_COMMON),
    ),
    "llama": (
        LlamaConfig,
        LlamaForSequenceClassification,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            pad_token_id=0,
            **_COMMON,
        ),
    ),
    "gpt2": (
        GPT2Config,
        GPT2ForSequenceClassification,
        dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=64, pad_token_id=0, vocab_size=VOCAB, num_labels=LABELS),
    ),
}

# Expected module names (TT layer order) of the default targets q,k,v,o, per architecture:
# name -> (layer number, [(matrix index, start, end), ...])
_KV = HIDDEN * KV_HEADS // HEADS


def expected_qkvo(arch: str) -> dict[str, tuple[int, list[tuple[int, int, int]]]]:
    out = {}
    for layer in range(LAYERS):
        if arch in ("bert", "roberta"):
            p = f"{arch}.encoder.layer.{layer}.attention."
            names = [p + "self.query", p + "self.key", p + "self.value", p + "output.dense"]
        elif arch == "mpnet":
            p = f"mpnet.encoder.layer.{layer}.attention.attn."
            names = [p + "q", p + "k", p + "v", p + "o"]
        elif arch == "distilbert":
            p = f"distilbert.transformer.layer.{layer}.attention."
            names = [p + "q_lin", p + "k_lin", p + "v_lin", p + "out_lin"]
        elif arch == "llama":
            p = f"model.layers.{layer}.self_attn."
            names = [p + "q_proj", p + "k_proj", p + "v_proj", p + "o_proj"]
        elif arch == "gpt2":
            p = f"transformer.h.{layer}.attn."
            out[p + "c_attn"] = (layer, [(0, 0, HIDDEN), (1, HIDDEN, 2 * HIDDEN), (2, 2 * HIDDEN, 3 * HIDDEN)])
            out[p + "c_proj"] = (layer, [(3, 0, HIDDEN)])
            continue
        else:
            raise KeyError(arch)
        widths = [HIDDEN, _KV, _KV, HIDDEN] if arch == "llama" else [HIDDEN] * 4
        for m, (name, w) in enumerate(zip(names, widths)):
            out[name] = (layer, [(m, 0, w)])
    return out


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kwargs, **overrides}))
    return model.eval()


def inputs(batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids that avoid the pad ids (0, 1) so decoder models pool the last token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def random_cores(shapes, seed: int = 0, std: float = 0.3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * std for s in shapes]


def save_tiny_bert(folder, seed: int = 0, **overrides) -> BertForSequenceClassification:
    """A 2-layer BERT of width 32 with the embedded tokenizer, saved to ``folder`` (a base model
    for tests that go through files and the CLI); returns the model."""
    from metatt_deploy.adapters.base_model import load_tokenizer

    tokenizer = load_tokenizer(None)
    settings = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=2,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**{**settings, **overrides})).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
