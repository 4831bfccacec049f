"""metatt_deploy.adapters.config: every field checked against the others, the cores and the base model.

Edited configs used to be silently ignored (in_features, segment ends, ranks, a string alpha) or
crash with IndexError/AttributeError (layer, matrix index, module name): each is now one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import random_cores, tiny_model

from metatt_deploy.adapters.config import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, MetaTTConfig
from metatt_deploy.adapters.model import attach, build_config, load_adapter, save_adapter
from metatt_deploy.common.errors import MetaTTError


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_model("bert")
    base = tmp_path / "base"
    model.save_pretrained(base)
    config = build_config(model, rank=3, base_model=str(base))
    attach(model, config, random_cores(config.core_shapes()))
    return base, save_adapter(model, tmp_path / "adapter")


def edit(adapter: Path, change) -> None:
    path = adapter / CONFIG_NAME
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


EDITS = {
    "in_features": (lambda d: d["modules"][0].update(in_features=16), "is 32 -> 32, the adapter says 16 -> 32"),
    "segment end": (
        lambda d: d["modules"][0]["segments"][0].__setitem__(2, 31),
        "segment \\[0, 0, 31\\]; a segment is one of the 1 to 3 equal parts",
    ),
    "segment past the module": (lambda d: d["modules"][0]["segments"][0].__setitem__(2, 33), "segment \\[0, 0, 33\\]"),
    "ranks": (lambda d: d.update(ranks=[2, 3, 3]), "core 0 has shape \\(1, 32, 3\\) but the config .* says \\(1, 32, 2\\)"),
    "string alpha": (lambda d: d.update(alpha="4.0"), "field 'alpha' has the wrong type"),
    "NaN alpha": (lambda d: d.update(alpha=math.nan), "alpha is nan"),
    "layer index": (lambda d: d["modules"][0].update(layer=2), "layer index 2; it must be in 0..1"),
    "matrix index": (lambda d: d["modules"][0]["segments"][0].__setitem__(0, 4), "matrix index 4; it must be in 0..3"),
    "module name": (lambda d: d["modules"][0].update(name="bert.encoder.layer.0.attention.self.nope"), "no adaptable module .*self.nope"),
    "label count": (lambda d: d["label_names"].update(default=["only"]), "two or more distinct label names"),
    "labels of an unknown task": (lambda d: d.update(label_names={"other": ["a", "b"]}), "label_names name tasks"),
    "overlapping segments": (lambda d: d["modules"][0]["segments"].append([1, 0, 32]), "overlapping|given to two modules"),
    "unknown field": (lambda d: d.update(colour="blue"), "unknown or malformed fields"),
    "mode layout": (lambda d: d.update(mode_names=["in", "layer", "out", "matrix"]), "do not fit method"),
    "init": (lambda d: d.update(init="ze-id"), "init 'ze-id' must name 4 cores"),
    "model type": (lambda d: d.update(model_type="gpt2"), "for a gpt2 model, but the base model is a bert"),
    "fingerprint": (lambda d: d.update(base_fingerprint="xyz"), "32 lowercase hex"),
    "format": (lambda d: d.update(format_version=3), "format version 3 is not supported"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_edited_configs_are_refused_with_one_line(saved, name: str) -> None:
    base, adapter = saved
    change, message = EDITS[name]
    edit(adapter, change)
    with pytest.raises(MetaTTError, match=message) as info:
        load_adapter(adapter, base_model=str(base), tokenizer=False)
    assert "\n" not in str(info.value)


def test_validate_checks_without_changing_the_config(saved) -> None:
    _, adapter = saved
    config = MetaTTConfig.load(adapter)
    before = json.dumps(config.to_json())
    config.validate()
    config.check_cores(list(load_file(str(adapter / WEIGHTS_NAME)).values())[:4])
    assert json.dumps(config.to_json()) == before and config.format_version == FORMAT_VERSION == 2


def test_cores_and_heads_must_match_and_be_finite(saved) -> None:
    base, adapter = saved
    state = load_file(str(adapter / WEIGHTS_NAME))
    for key, value, message in (
        ("core.1", torch.full_like(state["core.1"], math.nan), "core.1 holds NaN or Inf"),
        ("head.classifier.bias", torch.full_like(state["head.classifier.bias"], math.inf), "head weight classifier.bias holds NaN or Inf"),
        ("core.2", state["core.2"][:, :, :2].contiguous(), "core 2 has shape \\(3, 4, 2\\)"),
        ("head.pooler.weight", torch.ones(2), "tensors the config does not describe"),
    ):
        save_file({**state, key: value}, str(adapter / WEIGHTS_NAME))
        with pytest.raises(MetaTTError, match=message):
            load_adapter(adapter, base_model=str(base), tokenizer=False)


def test_an_adapter_on_another_architecture_is_refused(saved, tmp_path: Path) -> None:
    _, adapter = saved
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    with pytest.raises(MetaTTError, match="this adapter is for a bert model, but the base model is a gpt2"):
        load_adapter(adapter, base_model=str(gpt2), tokenizer=False)


def test_format_1_adapters_still_load_with_their_own_fingerprint(saved) -> None:
    """Format 1 fingerprinted the adapted weights only; such adapters keep loading."""
    from metatt_deploy.adapters.model import fingerprint

    base, adapter = saved
    model = tiny_model("bert")
    config = MetaTTConfig.load(adapter)
    edit(adapter, lambda d: d.update(format_version=1, base_fingerprint=fingerprint(model, config.modules)))
    loaded, cfg, _ = load_adapter(adapter, base_model=str(base), tokenizer=False)
    assert cfg.format_version == 1
