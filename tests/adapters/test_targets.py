"""metatt_deploy.adapters.targets: finding the adapted modules of every supported architecture."""

from __future__ import annotations

import pytest
from tiny_models import ARCHS, FFN, HIDDEN, LAYERS, expected_qkvo, tiny_model
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

from metatt_deploy.adapters.targets import DEFAULT_TARGETS, TargetModule, find_targets, module_dims, parse_targets
from metatt_deploy.common.errors import MetaTTError

ALL = list(ARCHS)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {arch: tiny_model(arch) for arch in ALL}


@pytest.mark.parametrize("arch", ALL)
def test_default_targets_qkvo(models, arch: str) -> None:
    names, layers, modules = find_targets(models[arch], ["q", "k", "v", "o"])
    assert names == ["q", "k", "v", "o"]
    assert layers == list(range(LAYERS))
    got = {t.name: (t.layer, [tuple(s) for s in t.segments]) for t in modules}
    assert got == expected_qkvo(arch)
    for t in modules:
        assert t.transposed == (arch == "gpt2")
        assert t.in_features == HIDDEN
        assert t.out_features == max(e for _, _, e in t.segments) or arch == "gpt2"
    if arch == "gpt2":
        assert {t.out_features for t in modules} == {3 * HIDDEN, HIDDEN}


@pytest.mark.parametrize("arch", ALL)
def test_ffn_up_down_non_square(models, arch: str) -> None:
    targets = ["gate", "up", "down"] if arch == "llama" else ["up", "down"]
    names, layers, modules = find_targets(models[arch], targets)
    assert names == targets and layers == list(range(LAYERS))
    assert len(modules) == len(targets) * LAYERS
    for t in modules:
        ((m, start, end),) = t.segments
        kind = targets[m]
        d_in, d_out = (FFN, HIDDEN) if kind == "down" else (HIDDEN, FFN)
        assert (t.in_features, t.out_features, start, end) == (d_in, d_out, 0, d_out), t.name


def test_string_targets_and_custom_suffix(models) -> None:
    names, _, modules = find_targets(models["bert"], "q, v")
    assert names == ["q", "v"] and len(modules) == 2 * LAYERS
    names, layers, modules = find_targets(models["bert"], ["x=attention.self.query"])
    assert names == ["x"] and layers == [0, 1]
    assert sorted(t.name for t in modules) == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(LAYERS)]


def test_target_matrix_index_follows_the_users_order(models) -> None:
    names, _, modules = find_targets(models["gpt2"], "v,q")
    assert names == ["v", "q"]
    c_attn = next(t for t in modules if t.name == "transformer.h.0.attn.c_attn")
    assert sorted(c_attn.segments, key=lambda s: s[1]) == [(1, 0, HIDDEN), (0, 2 * HIDDEN, 3 * HIDDEN)]


def test_unknown_and_unmatched_targets(models) -> None:
    with pytest.raises(MetaTTError, match=r"unknown target 'qq' \(known for bert: q, k, v, o, up, down\)"):
        find_targets(models["bert"], "q,qq")
    with pytest.raises(MetaTTError, match="given twice"):
        parse_targets("q,q", "bert")
    with pytest.raises(MetaTTError, match="no targets"):
        parse_targets(" , ", "bert")
    with pytest.raises(MetaTTError, match="no default targets"):
        parse_targets("q", "t5")
    with pytest.raises(MetaTTError, match="targets z match no module"):
        find_targets(models["bert"], "q,z=does.not.exist")
    with pytest.raises(MetaTTError, match="cannot be adapted"):
        find_targets(models["bert"], [r"ln=\.layer\.(\d+)\.output\.LayerNorm$"])


def test_module_dims_linear_and_conv1d(models) -> None:
    assert module_dims(nn.Linear(3, 5)) == (3, 5, False)
    c_attn = models["gpt2"].get_submodule("transformer.h.0.attn.c_attn")
    assert module_dims(c_attn) == (HIDDEN, 3 * HIDDEN, True)
    with pytest.raises(MetaTTError, match="cannot be adapted"):
        module_dims(nn.Conv2d(1, 1, 1))


def test_target_module_json_roundtrip() -> None:
    t = TargetModule("a.b", 1, 4, 12, [(0, 0, 4), (2, 8, 12)], True)
    assert TargetModule.from_json(t.to_json()) == t


# ------------------------------------------------------------------ issue 10: targets that match twice


def test_a_suffix_matching_two_modules_of_a_layer_names_them(models) -> None:
    """`down=output.dense` also matches attention.output.dense: one line naming both, no RuntimeError."""
    with pytest.raises(
        MetaTTError, match=r"down is ambiguous: it matches 2 modules of layer 0 \(.*attention\.output\.dense, .*layer\.0\.output\.dense\)"
    ):
        find_targets(models["bert"], ["q", "down=output.dense"])
    names, _, modules = find_targets(models["bert"], ["q", r"down=\.layer\.(\d+)\.output\.dense$"])  # the regex form is exact
    assert sorted(m.name for m in modules if m.segments[0][0] == 1) == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    with pytest.raises(MetaTTError, match="targets o, x all match module bert.encoder.layer.0.attention.output.dense"):
        find_targets(models["bert"], ["o", "x=attention.output.dense"])


def test_suffixes_match_whole_path_components(models) -> None:
    _, _, modules = find_targets(models["bert"], ["q=query", "v=self.value"])
    assert sorted(m.name for m in modules)[:2] == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
    with pytest.raises(MetaTTError, match="targets q match no module"):
        find_targets(models["bert"], ["q=uery"])  # a part of a component is not a suffix


def test_no_default_targets_suggests_this_models_suffixes(models) -> None:
    model = models["bert"]
    model.config.model_type = "my-arch"
    try:
        with pytest.raises(
            MetaTTError,
            match=r"no default targets; .*e\.g\. q=attention\.self\.query; this model's layers hold: attention\.self\.query, attention\.self\.key",
        ):
            find_targets(model, ["q"])
    finally:
        model.config.model_type = "bert"
    with pytest.raises(MetaTTError, match="not a valid regular expression"):
        find_targets(model, ["q=(unclosed"])


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3"])
def test_llama_style_decoder_families_have_default_targets(family: str) -> None:
    """Gemma-3 and Qwen3 blocks name their projections as LLaMA does: no --targets needed (issue 27)."""
    config_cls, model_cls = (Gemma3TextConfig, Gemma3ForCausalLM) if family == "gemma3_text" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    )
    model = model_cls(config)
    assert model.config.model_type == family
    names, layers, modules = find_targets(model, DEFAULT_TARGETS)
    assert names == ["q", "k", "v", "o"] and layers == [0, 1] and len(modules) == 8
    names, _, modules = find_targets(model, "q,k,v,o,gate,up,down")
    assert {m.name.rsplit(".", 1)[-1] for m in modules} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
