"""metatt_deploy.export.peft: a MetaTT adapter becomes an exact PEFT LoRA adapter."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import inputs, logits, random_cores, tiny_model

from metatt_deploy.adapters.lora import LORA_RECORD, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, load_lora
from metatt_deploy.adapters.model import attach, build_config, merge_and_unload, save_adapter
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.peft import to_peft

ALL_TARGETS = {"bert": "q,k,v,o,up,down", "gpt2": "q,k,v,o,up,down", "llama": "q,k,v,o,gate,up,down"}


def adapted(arch: str, tmp_path: Path, method: str, rank, targets: str | None = None, tasks=None):
    model = tiny_model(arch)
    config = build_config(model, method=method, rank=rank, targets=targets or ALL_TARGETS[arch], tasks=tasks)
    adapter = attach(model, config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # a trained head (small, like a real one: logits stay O(1))
        for name in config.head_modules:
            for p in model.get_submodule(name).parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    with adapter.routed(0 if tasks else None):
        head_only = logits(model, inputs())
    adapter.set_cores(random_cores(config.core_shapes(), std=0.3))
    adapter_dir = tmp_path / "adapter"
    save_adapter(model, adapter_dir)
    model.head_only_logits = head_only
    return model, config, adapter, adapter_dir


def load_peft(arch: str, directory: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "missing adapter keys" warning
        return PeftModel.from_pretrained(tiny_model(arch), str(directory)).eval()


CASES = [
    ("bert", "metatt-4d", 4, None),
    ("bert", "metatt-5d", [3, 4, 2, 5], None),  # r_in > r_out: C folds into lora_A
    ("gpt2", "metatt-4d", 4, None),  # fused c_attn, shared input side: rank r
    ("gpt2", "metatt-5d", [8, 4, 2, 3], "v,q,o,up,down"),  # fused q,v stacked: rank 2 * r_out, k rows zero
    ("llama", "metatt-4d", 4, None),  # grouped-query k/v
    ("llama", "metatt-5d", [2, 4, 4, 4], None),
]


@pytest.mark.parametrize("arch,method,rank,targets", CASES)
def test_peft_logits_and_merged_weights_match(tmp_path: Path, arch, method, rank, targets) -> None:
    model, config, adapter, adapter_dir = adapted(arch, tmp_path, method, rank, targets)
    batch = inputs()
    expected = logits(model, batch)
    out = to_peft(adapter_dir, tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == sorted([PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, LORA_RECORD])

    peft_model = load_peft(arch, out)
    assert (expected - model.head_only_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(logits(peft_model, batch), expected, rtol=0, atol=1e-5)

    ours = merge_and_unload(model)
    theirs = peft_model.merge_and_unload()
    for target in config.modules:
        torch.testing.assert_close(theirs.get_submodule(target.name).weight, ours.get_submodule(target.name).weight, rtol=0, atol=1e-5)
    for name in config.head_modules:
        for key, value in ours.get_submodule(name).state_dict().items():
            assert torch.equal(theirs.get_submodule(name).state_dict()[key], value), f"{name}.{key}"


def test_peft_files_follow_peft_conventions(tmp_path: Path) -> None:
    _, config, _, adapter_dir = adapted("gpt2", tmp_path, "metatt-4d", [8, 4, 2], "v,q,o")
    out = to_peft(adapter_dir, tmp_path / "peft")
    cfg = json.loads((out / PEFT_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS"
    assert cfg["fan_in_fan_out"] is True and cfg["use_rslora"] is False and cfg["lora_dropout"] == 0.0
    assert sorted(cfg["target_modules"]) == sorted(m.name for m in config.modules)
    assert cfg["modules_to_save"] == ["score"]
    # c_attn: q and v, r_in = 8 > 2 * r_out = 4, so the two pairs stack to rank 4; c_proj rank 2
    assert cfg["r"] == cfg["lora_alpha"]
    ranks = {name: cfg["rank_pattern"].get(name.replace(".", "\\."), cfg["r"]) for name in cfg["target_modules"]}
    assert ranks == {f"transformer.h.{i}.attn.{m}": 4 if m == "c_attn" else 2 for i in (0, 1) for m in ("c_attn", "c_proj")}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    tensors = load_file(str(out / PEFT_WEIGHTS_NAME))
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    lora_b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert lora_b.shape == (96, 4)
    assert torch.count_nonzero(lora_b[32:64]) == 0  # k is not adapted
    assert torch.count_nonzero(lora_b[:32, 2:]) == 0 and torch.count_nonzero(lora_b[64:, :2]) == 0  # block-diagonal
    assert "base_model.model.score.weight" in tensors
    assert not any("modules_to_save" in k or ".default." in k for k in tensors)


def test_multitask_export_picks_one_task_and_its_head(tmp_path: Path) -> None:
    from metatt_deploy.adapters.multitask import build_multitask, save_multitask

    labels = {"a": ["n", "p"], "b": ["x", "y", "z"]}
    mtm = build_multitask(tiny_model("bert"), ["a", "b"], labels, rank=3, targets="q,v,up")
    adapter = mtm.metatt
    adapter.set_cores(random_cores(adapter.config.core_shapes(), std=0.3))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in mtm.model.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter_dir = tmp_path / "adapter"
    save_multitask(mtm, adapter_dir)
    batch = inputs()
    with pytest.raises(MetaTTError, match="several tasks"):
        to_peft(adapter_dir, tmp_path / "peft")
    with pytest.raises(MetaTTError, match="unknown task 'c'"):
        to_peft(adapter_dir, tmp_path / "peft", task="c")
    assert not (tmp_path / "peft").exists()
    for task in ["a", "b"]:
        with torch.no_grad():
            expected = mtm(**batch, task_ids=task).logits[:, : len(labels[task])]
        out = to_peft(adapter_dir, tmp_path / f"peft-{task}", task=task)
        base = tiny_model("bert", num_labels=len(labels[task]))  # the task's label count
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            peft_model = PeftModel.from_pretrained(base, str(out)).eval()
        torch.testing.assert_close(logits(peft_model, batch), expected, rtol=0, atol=1e-5)


def test_tokenizer_files_travel_along(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from metatt_deploy.adapters.base_model import load_tokenizer, resolve_model

    model, _, _, adapter_dir = adapted("bert", tmp_path, "metatt-4d", 2, "q")
    tok = load_tokenizer(resolve_model(None))
    save_adapter(model, adapter_dir, tokenizer=tok, force=True)
    out = to_peft(adapter_dir, tmp_path / "peft")
    assert (out / "tokenizer_config.json").is_file()
    assert not (out / "metatt_config.json").exists() and not (out / "metatt_adapter.safetensors").exists()
    assert AutoTokenizer.from_pretrained(str(out))("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_existing_output_needs_force(tmp_path: Path) -> None:
    _, _, _, adapter_dir = adapted("bert", tmp_path, "metatt-4d", 2, "q")
    out = tmp_path / "peft"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(MetaTTError, match="already exists"):
        to_peft(adapter_dir, out)
    with pytest.raises(MetaTTError, match="did not write"):  # --force replaces only a previous PEFT export
        to_peft(adapter_dir, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep"]
    (out / "keep").unlink()
    to_peft(adapter_dir, out, force=True)  # an empty folder may be replaced
    to_peft(adapter_dir, out, force=True)  # and so may a previous export
    assert sorted(p.name for p in out.iterdir()) == sorted([PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, LORA_RECORD])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    with pytest.raises(MetaTTError, match="adapter folder not found"):
        to_peft(tmp_path / "nowhere", tmp_path / "peft2")


def test_cli_merge_to_peft(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from metatt_deploy.cli import app

    _, _, _, adapter_dir = adapted("bert", tmp_path, "metatt-4d", 2, "q")
    runner = CliRunner()
    ok = runner.invoke(app, ["merge", str(adapter_dir), "-o", str(tmp_path / "p"), "--to", "peft"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "p" / PEFT_WEIGHTS_NAME).is_file()
    again = runner.invoke(app, ["merge", str(adapter_dir), "-o", str(tmp_path / "p"), "--to", "peft"])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["merge", str(adapter_dir), "-o", str(tmp_path / "q"), "--to", "onnx"])
    assert bad.exit_code == 2 and "unknown --to" in bad.output


@pytest.mark.parametrize("arch,method,rank", [("llama", "metatt-4d", 4), ("llama", "metatt-5d", [2, 4, 4, 4]), ("gpt2", "metatt-4d", 4)])
def test_decoder_adapters_become_exact_causal_lm_peft_adapters(tmp_path: Path, arch, method, rank) -> None:
    from tiny_decoders import save_tiny_adapter

    from metatt_deploy.adapters.base_model import load_causal_lm
    from metatt_deploy.adapters.model import load_adapter

    base, adapter_dir = save_tiny_adapter(tmp_path, arch, method, rank)
    model, _, tok = load_adapter(adapter_dir)
    out = to_peft(adapter_dir, tmp_path / "peft")
    assert json.loads((out / PEFT_CONFIG_NAME).read_text())["task_type"] == "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft_model = PeftModel.from_pretrained(load_causal_lm(str(base)), str(out)).eval()
    ids = torch.tensor([tok("Premise: a man plays. Hypothesis: a person plays.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    loaded, record, _ = load_lora(out)  # the project's loader rebuilds the causal LM (no head, no labels)
    assert record["task_type"] == "causal-lm" and record["label_names"] == []
    saved = json.loads((adapter_dir / "metatt_config.json").read_text())
    assert record["base_fingerprint"] == saved["base_fingerprint"]  # checked on that load
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
