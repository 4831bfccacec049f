"""metatt_deploy.adapters.model on tiny models of every architecture: attach, train, merge, save, load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, inputs, logits, random_cores, tiny_model
from torch import nn

from metatt_deploy.adapters.config import CONFIG_NAME, WEIGHTS_NAME, MetaTTConfig
from metatt_deploy.adapters.model import (
    attach,
    build_config,
    count_trainable,
    fingerprint,
    get_adapter,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.tt.cores import parameter_count

ALL = list(ARCHS)
ALL_TARGETS = {arch: "q,k,v,o,gate,up,down" if arch == "llama" else "q,k,v,o,up,down" for arch in ALL}


def randomise_head(model: nn.Module, config: MetaTTConfig, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in config.head_modules:
            for p in model.get_submodule(name).parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ALL)
def test_zero_init_leaves_logits_unchanged_and_grads_reach_only_adapter_and_head(arch: str) -> None:
    model = tiny_model(arch)
    batch = inputs()
    before = logits(model, batch)
    config = build_config(model, targets=ALL_TARGETS[arch], rank=4)
    assert config.init == "ze-id-id-id"
    adapter = attach(model, config)
    assert torch.equal(logits(model, batch), before)

    counts = count_trainable(model)
    assert counts["adapter"] == parameter_count(config.mode_sizes, config.ranks)

    model(**batch).logits.square().sum().backward()
    heads = tuple(f"{h}." for h in config.head_modules)
    seen_core = seen_head = 0
    for name, p in model.named_parameters():
        if name.startswith("metatt.cores."):
            assert p.requires_grad and p.grad is not None, name
            seen_core += 1
        elif name.startswith(heads):
            assert p.requires_grad and p.grad is not None, name
            seen_head += 1
        else:
            assert not p.requires_grad and p.grad is None, name
    assert seen_core == len(adapter.cores) and seen_head > 0
    # ze core: the zero first core gets gradient, so training can leave zero
    assert torch.count_nonzero(adapter.cores[0].grad) > 0


@pytest.mark.parametrize("method", ["metatt-4d", "metatt-5d"])
@pytest.mark.parametrize("arch", ALL)
def test_merge_parity_with_ffn_targets(arch: str, method: str) -> None:
    model = tiny_model(arch)
    batch = inputs()
    base = logits(model, batch)
    config = build_config(model, method=method, targets=ALL_TARGETS[arch], rank=4)
    adapter = attach(model, config)
    adapter.set_cores(random_cores(config.core_shapes(), std=0.5))
    adapted = logits(model, batch)
    assert (adapted - base).abs().max() > 1e-3  # the adapter does something
    merged = merge_and_unload(model)
    assert not hasattr(merged, "metatt")
    assert not any("base_layer" in n for n, _ in merged.named_modules())
    assert not any(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=1e-5)


def test_gpt2_partial_fused_targets_merge_parity() -> None:
    """Only q and v of GPT-2's fused c_attn, listed out of order: k's third stays untouched."""
    model = tiny_model("gpt2")
    batch = inputs()
    w0 = model.get_submodule("transformer.h.1.attn.c_attn").weight.detach().clone()
    config = build_config(model, targets="v,q", rank=3)
    assert config.mode_sizes[-1] == 32  # one third of c_attn, not all of it
    adapter = attach(model, config)
    adapter.set_cores(random_cores(config.core_shapes(), std=0.5))
    adapted = logits(model, batch)
    merged = merge_and_unload(model)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=1e-5)
    w1 = merged.get_submodule("transformer.h.1.attn.c_attn").weight
    assert torch.equal(w1[:, 32:64], w0[:, 32:64])
    assert not torch.equal(w1[:, :32], w0[:, :32]) and not torch.equal(w1[:, 64:], w0[:, 64:])


def test_multitask_merge_parity_per_task() -> None:
    batch = inputs()
    ref = None
    for t, task in enumerate(["a", "b", "c"]):
        model = tiny_model("bert")
        config = build_config(model, tasks=["a", "b", "c"], label_names={n: ["x", "y", "z"] for n in "abc"}, rank=3)
        assert config.mode_names == ["in", "layer", "matrix", "task", "out"]
        adapter = attach(model, config)
        adapter.set_cores(random_cores(config.core_shapes(), std=0.5))
        with pytest.raises(MetaTTError, match="several tasks"):
            logits(model, batch)
        with adapter.routed(t):
            adapted = logits(model, batch)
        if ref is not None:
            assert (adapted - ref).abs().max() > 1e-4  # tasks differ
        ref = adapted
        merged = merge_and_unload(model, task)
        torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=1e-5)


def test_rank_too_large_and_unknown_target() -> None:
    model = tiny_model("bert")
    with pytest.raises(MetaTTError, match=r"rank 64 of bond 1 \(between modes 'in' and 'layer'\)"):
        build_config(model, rank=64)
    with pytest.raises(MetaTTError, match=r"bond 4 \(between modes 'head' and 'head_dim'\)"):
        build_config(model, method="metatt-5d", rank=16)  # head_dim is 8
    with pytest.raises(MetaTTError, match="unknown target 'qkv'"):
        build_config(model, targets="qkv")
    with pytest.raises(MetaTTError, match="unknown method"):
        build_config(model, method="metatt-3d")


def test_attach_twice_is_refused() -> None:
    model = tiny_model("bert")
    attach(model, build_config(model, rank=2))
    with pytest.raises(MetaTTError, match="already carries"):
        attach(model, build_config(tiny_model("bert"), rank=2))


def _adapted(arch: str, tmp_path: Path, method: str = "metatt-4d"):
    """Save the untouched base, then attach a random adapter (and head) and save it."""
    model = tiny_model(arch)
    base_dir = tmp_path / f"base-{arch}"
    model.save_pretrained(base_dir)
    config = build_config(model, method=method, targets=ALL_TARGETS[arch], rank=3, base_model=str(base_dir))
    adapter = attach(model, config)
    adapter.set_cores(random_cores(config.core_shapes(), std=0.5))
    randomise_head(model, config)
    adapter_dir = tmp_path / f"adapter-{arch}"
    save_adapter(model, adapter_dir)
    return model, config, base_dir, adapter_dir


@pytest.mark.parametrize("arch,method", [("bert", "metatt-4d"), ("gpt2", "metatt-5d"), ("llama", "metatt-4d"), ("distilbert", "metatt-5d")])
def test_save_load_roundtrip(tmp_path: Path, arch: str, method: str) -> None:
    model, config, base_dir, adapter_dir = _adapted(arch, tmp_path, method)
    batch = inputs()
    expected = logits(model, batch)
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded, loaded_config, tok = load_adapter(adapter_dir, base_model=str(base_dir), tokenizer=False)
    assert tok is None
    assert loaded_config.to_json() == config.to_json()
    assert torch.equal(logits(loaded, batch), expected)
    for a, b in zip(get_adapter(loaded).cores, get_adapter(model).cores):
        assert torch.equal(a, b)
    # the base recorded in the config is used when none is passed
    again, _, _ = load_adapter(adapter_dir, tokenizer=False)
    assert torch.equal(logits(again, batch), expected)


def test_load_onto_a_different_base_names_the_fingerprint(tmp_path: Path) -> None:
    _, config, _, adapter_dir = _adapted("bert", tmp_path)
    other = tmp_path / "other"
    tiny_model("bert", seed=1).save_pretrained(other)
    with pytest.raises(MetaTTError, match=f"fingerprint {config.base_fingerprint[:12]}"):
        load_adapter(adapter_dir, base_model=str(other), tokenizer=False)


def test_fingerprint_depends_on_the_adapted_weights_only() -> None:
    a, b = tiny_model("bert"), tiny_model("bert")
    modules = build_config(a).modules
    assert fingerprint(a, modules) == fingerprint(b, modules)
    with torch.no_grad():
        b.get_submodule("classifier").weight.add_(1.0)  # not an adapted module
    assert fingerprint(a, modules) == fingerprint(b, modules)
    with torch.no_grad():
        b.get_submodule(modules[0].name).weight[0, 0] += 1e-3
    assert fingerprint(a, modules) != fingerprint(b, modules)
    assert len(fingerprint(a, modules)) == 32


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_are_a_metatt_error(tmp_path: Path, damage: str) -> None:
    _, _, base_dir, adapter_dir = _adapted("bert", tmp_path)
    path = adapter_dir / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64 + data[64:], "empty": b""}[damage])
    with pytest.raises(MetaTTError, match="corrupt"):
        load_adapter(adapter_dir, base_model=str(base_dir), tokenizer=False)


def test_missing_or_broken_config(tmp_path: Path) -> None:
    _, _, base_dir, adapter_dir = _adapted("bert", tmp_path)
    (adapter_dir / CONFIG_NAME).write_text("{not json")
    with pytest.raises(MetaTTError, match="not valid JSON"):
        load_adapter(adapter_dir, base_model=str(base_dir), tokenizer=False)
    with pytest.raises(MetaTTError, match="is not a MetaTT adapter"):
        load_adapter(tmp_path / "nowhere", base_model=str(base_dir), tokenizer=False)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_existing_output_without_force_and_failure_inside_atomic_dir(tmp_path: Path) -> None:
    model, _, _, adapter_dir = _adapted("bert", tmp_path)
    before = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}
    with pytest.raises(MetaTTError, match="already exists.*--force"):
        save_adapter(model, adapter_dir)
    assert {p.name: p.read_bytes() for p in adapter_dir.iterdir()} == before
    assert _leftovers(tmp_path) == []

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            (Path(directory) / "tokenizer_config.json").write_text("{}")
            raise RuntimeError("disk full")

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(model, fresh, tokenizer=BrokenTokenizer())
    assert not fresh.exists() and _leftovers(tmp_path) == []
    # a failed forced overwrite keeps the old adapter
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(model, adapter_dir, tokenizer=BrokenTokenizer(), force=True)
    assert {p.name: p.read_bytes() for p in adapter_dir.iterdir()} == before
    assert _leftovers(tmp_path) == []
    save_adapter(model, adapter_dir, force=True)
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted(before) and _leftovers(tmp_path) == []


@pytest.mark.slow
def test_real_embedded_model_zero_init_and_merge_parity() -> None:
    from metatt_deploy.adapters.base_model import load_classifier, load_tokenizer, resolve_model

    path = resolve_model(None)
    tok = load_tokenizer(path)
    batch = dict(tok(["a tensor train adapter", "merging keeps the logits"], padding=True, return_tensors="pt"))
    model = load_classifier(path, ["neg", "pos"]).eval()
    base = logits(model, batch)
    config = build_config(model, targets="q,k,v,o", rank=8, base_model=path)
    assert config.mode_sizes == [384, 6, 4, 384] and config.ranks == [8, 8, 8]
    adapter = attach(model, config)
    assert torch.equal(logits(model, batch), base)
    adapter.set_cores(random_cores(config.core_shapes(), std=0.3))
    adapted = logits(model, batch)
    assert (adapted - base).abs().max() > 1e-4
    merged = merge_and_unload(model)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=1e-5)
