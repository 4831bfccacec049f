"""Putting a MetaTT adapter on a Hugging Face model, saving it, loading it, merging it.

The model keeps its own classes: adapted modules are wrapped in place (MetaTTLayer), the
shared adapter is registered once as ``model.metatt``, the base is frozen and the
classification head stays trainable and ships with the adapter. Causal language models have no
head to train: their adapter records ``extra["task_type"] = "causal-lm"`` so loading rebuilds a
causal LM (``AutoModelForCausalLM``) rather than a classifier; what differs is the base's
`ModelKind` (adapters/model_kinds.py), read from the model when building and from the adapter when loading.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.adapters.config import DEFAULT_ALPHA, METATT_METHODS, WEIGHTS_NAME, MetaTTConfig, check_finite
from metatt_deploy.adapters.heads import add_task_heads, select_task_head
from metatt_deploy.adapters.layer import MetaTT, MetaTTLayer
from metatt_deploy.adapters.model_kinds import head_modules, model_kind
from metatt_deploy.adapters.targets import DEFAULT_TARGETS, NEW_MODULES_ATTR, TargetModule, find_targets
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import atomic_dir

ADAPTER_ATTR = "metatt"


def build_config(
    model: nn.Module,
    *,
    method: str = "metatt-4d",
    rank: int | list[int] = 8,
    alpha: float = DEFAULT_ALPHA,
    init: str | None = None,
    targets: str | list[str] = DEFAULT_TARGETS,
    tasks: list[str] | None = None,
    label_names: dict[str, list[str]] | None = None,
    base_model: str = "",
    extra: dict | None = None,
) -> MetaTTConfig:
    """Derive modes, ranks and placement of an adapter for ``model`` (before attaching)."""
    hf_config: Any = model.config
    names, layers, modules = find_targets(model, targets)
    d_in = max(m.in_features for m in modules)
    d_out = max(e - s for m in modules for _, s, e in m.segments)  # a fused module's widest owned part
    tasks = tasks or ["default"]
    multitask = len(tasks) > 1
    mode_names = ["in", "layer", "matrix"] + (["task"] if multitask else [])
    mode_sizes = [d_in, len(layers), len(names)] + ([len(tasks)] if multitask else [])
    if method == "metatt-4d":
        mode_names.append("out")
        mode_sizes.append(d_out)
    elif method == "metatt-5d":
        head_dim = _head_dim(model)
        bad = [m.name for m in modules for _, s, e in m.segments if (e - s) % head_dim]
        if bad or d_out % head_dim:
            raise MetaTTError(f"metatt-5d needs output widths divisible by the head dim {head_dim} ({', '.join(bad)}); use metatt-4d")
        mode_names += ["head", "head_dim"]
        mode_sizes += [d_out // head_dim, head_dim]
    else:
        raise MetaTTError(
            f"unknown method '{method}'; use {' or '.join(METATT_METHODS)} (lora trains through metatt-deploy train --method lora)"
        )
    n_bonds = len(mode_sizes) - 1
    heads = head_modules(model)
    ranks = [rank] * n_bonds if isinstance(rank, int) else list(rank)
    kind = model_kind(model)
    config = MetaTTConfig(
        method=method,
        mode_names=mode_names,
        mode_sizes=mode_sizes,
        ranks=ranks,
        alpha=float(alpha),
        init=init or "-".join(["ze"] + ["id"] * n_bonds),
        targets=names,
        layers=layers,
        modules=modules,
        tasks=tasks,
        label_names=label_names or kind.default_labels(hf_config, tasks),
        head_modules=heads,
        base_model=base_model,
        base_fingerprint=fingerprint(model, modules, heads),
        model_type=hf_config.model_type,
        extra={**(extra or {}), **kind.recorded},
    )
    config.validate()
    return config


def _head_dim(model: nn.Module) -> int:
    cfg: Any = model.config
    if getattr(cfg, "head_dim", None):
        return int(cfg.head_dim)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not heads or not hidden:
        raise MetaTTError("cannot tell this model's head dimension; use metatt-4d")
    return hidden // heads


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, (module.base_layer if isinstance(module, MetaTTLayer) else module).weight)


# parameters PEFT adds inside a wrapped base (LoRA pairs, VeRA's scaling vectors): not base weights
PEFT_PARAMETER = re.compile(r"\.(lora_|vera_)")


def fingerprint(model: nn.Module, modules: list[TargetModule], head_modules: list[str] | None = None) -> str:
    """sha256 of the base weights the adapter's answers depend on: tells its own base from any other.

    With ``head_modules`` (adapter format 2): every parameter of the base outside those modules
    (they ship with the adapter), names as in the unwrapped model, in name order; on a base that
    carries PEFT layers, PEFT's own parameters are left out, so a LoRA folder's base and a MetaTT
    adapter's base fingerprint alike. Without (format 1): the weights of the adapted modules only,
    which missed every other weight.
    """
    h = hashlib.sha256()
    if head_modules is None:
        for target in sorted(modules, key=lambda m: m.name):
            w = _weight(model.get_submodule(target.name)).detach().to("cpu", torch.float32).contiguous()
            h.update(target.name.encode())
            h.update(w.numpy().tobytes())
        return h.hexdigest()[:32]
    skip = tuple(f"{m}." for m in head_modules) + (f"{ADAPTER_ATTR}.",)
    params = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters(remove_duplicate=True)}
    for name in sorted(params):
        if name.startswith(skip) or PEFT_PARAMETER.search(name):
            continue
        h.update(name.encode())
        h.update(params[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def base_fingerprint(model: nn.Module) -> str:
    """The format-2 fingerprint of a base model (plain, or carrying PEFT layers), its head left out."""
    return fingerprint(model, [], head_modules(model))


def config_fingerprint(model: nn.Module, config: MetaTTConfig) -> str:
    """The fingerprint of ``model`` the way ``config``'s format version defines it."""
    return fingerprint(model, config.modules, None if config.format_version == 1 else config.head_modules)


def attach(model: nn.Module, config: MetaTTConfig, cores: list[torch.Tensor] | None = None, seed: int = 0) -> MetaTT:
    """Wrap the target modules, register the adapter, freeze the base, train adapter and head."""
    if hasattr(model, ADAPTER_ATTR):
        raise MetaTTError("this model already carries a MetaTT adapter; load a fresh base model")
    config.check_base(model)
    untrained = [m for m in getattr(model, NEW_MODULES_ATTR, []) if m not in config.head_modules]
    if untrained:
        raise MetaTTError(
            f"the base model lacks trained weights for {', '.join(untrained)} and the adapter does not carry them, so answers "
            "would be random on every load; pass the complete base checkpoint the adapter was trained on, or retrain"
        )
    actual = config_fingerprint(model, config)
    if config.base_fingerprint and actual != config.base_fingerprint:
        raise MetaTTError(
            f"adapter was trained on base model '{config.base_model}' (fingerprint {config.base_fingerprint[:12]}), "
            f"but this base has fingerprint {actual[:12]}; pass the adapter's own base model"
        )
    if cores is not None:
        config.check_cores(cores)
    adapter = MetaTT(config, cores, seed=seed).to(next(model.parameters()).device)
    for p in model.parameters():
        p.requires_grad_(False)
    for target in config.modules:
        parent_name, _, child = target.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, MetaTTLayer(getattr(parent, child), target.layer, target.segments, adapter))
    model.add_module(ADAPTER_ATTR, adapter)
    for name in config.head_modules:
        model.get_submodule(name).requires_grad_(True)
    return adapter


def get_adapter(model: nn.Module) -> MetaTT:
    adapter = getattr(model, ADAPTER_ATTR, None)
    if adapter is None:
        raise MetaTTError("this model carries no MetaTT adapter")
    return adapter


def head_state(model: nn.Module, config: MetaTTConfig) -> dict[str, torch.Tensor]:
    return {f"head.{m}.{k}": v for m in config.head_modules for k, v in model.get_submodule(m).state_dict().items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: the cores and the classification head."""
    adapter = get_adapter(model)
    state = {f"core.{k}": c.detach() for k, c in enumerate(adapter.cores)}
    state.update(head_state(model, adapter.config))
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, directory: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Write config JSON + safetensors (+ tokenizer) atomically into ``directory``."""
    adapter = get_adapter(model)
    with atomic_dir(directory, force=force) as tmp:
        adapter.config.save(tmp)
        save_file(adapter_state(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "metatt": "1"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise MetaTTError(f"adapter weights {path} are missing; pass a complete adapter directory")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MetaTTError(f"adapter weights {path} are corrupt ({e}); re-create or re-download them") from None


def split_state(state: dict[str, torch.Tensor], config: MetaTTConfig) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Cores and head tensors of an adapter file, checked against the config: shapes (ranks
    included), no tensor the config does not describe, finite values."""
    n = len(config.mode_names)
    try:
        cores = [state[f"core.{k}"] for k in range(n)]
    except KeyError as e:
        raise MetaTTError(f"adapter weights lack {e}; the file does not match its config, re-create it") from None
    if any(c.dim() != 3 for c in cores):
        raise MetaTTError(f"adapter cores have shapes {[tuple(c.shape) for c in cores]}, not 3-way; re-create the adapter")
    config.check_cores(cores)
    heads = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    unknown = sorted(k for k in state if not k.startswith("head.") and k not in {f"core.{i}" for i in range(n)})
    owners = tuple(f"{m}." for m in config.head_modules)
    unknown += sorted(f"head.{k}" for k in heads if not k.startswith(owners))
    if unknown:
        raise MetaTTError(f"adapter weights hold tensors the config does not describe ({', '.join(unknown[:3])}); re-create the adapter")
    check_finite(heads, "adapter head")
    return cores, heads


def load_head(model: nn.Module, heads: dict[str, torch.Tensor], config: MetaTTConfig) -> None:
    for name in config.head_modules:
        module = model.get_submodule(name)
        sub = {k[len(name) + 1 :]: v for k, v in heads.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(sub)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
            raise MetaTTError(f"the saved head '{name}' does not fit this model ({detail}); check the label count") from None


def load_adapter(directory: str | Path, base_model: str | None = None, tokenizer: bool = True):
    """Load the base model named in the adapter (or ``base_model``) and put the adapter on it.

    Returns (model, config, tokenizer or None). The fingerprint check in ``attach`` rejects a
    different base model with a clear message.
    """
    config = MetaTTConfig.load(directory)
    cores, heads = split_state(read_weights(directory), config)
    base = base_model or config.base_model
    model = config.kind.load_base(base, config.label_names[config.tasks[0]])
    attach(model, config, cores)
    if config.multitask:  # one head per task, routed per row (multitask.py)
        add_task_heads(model, config)
    load_head(model, heads, config)
    tok = None
    if tokenizer:
        tok = load_tokenizer(str(directory) if (Path(directory) / "tokenizer_config.json").is_file() else base)
    model.eval()
    return model, config, tok


def merge_and_unload(model: nn.Module, task: str | None = None) -> nn.Module:
    """Fold alpha * dW into the base weights (in float32) and remove every trace of the adapter."""
    adapter = get_adapter(model)
    config = adapter.config
    t = config.task_index(task) if config.multitask else None
    with torch.no_grad():
        for target in config.modules:
            parent_name, _, child = target.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapper = getattr(parent, child)
            base = wrapper.base_layer
            w = base.weight.data.float()
            for m, start, end in target.segments:
                d = adapter.dense_delta(target.layer, m, target.in_features, end - start, t)
                if target.transposed:
                    w[:, start:end] += d
                else:
                    w[start:end, :] += d.T
            base.weight.data.copy_(w.to(base.weight.dtype))
            setattr(parent, child, base)
    delattr(model, ADAPTER_ATTR)
    if t is not None:  # multi-task: that task's head becomes the classifier, its labels the model's
        select_task_head(model, config, t)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_head_parameter(name: str, heads: tuple[str, ...]) -> bool:
    """Whether parameter ``name`` (plain or PEFT-prefixed) belongs to one of the head modules ``heads`` ("name." each)."""
    return name.removeprefix("base_model.model.").startswith(heads)


def count_trainable(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of a MetaTT or PEFT LoRA model, split into adapter and head (heads are counted separately)."""
    heads = tuple(f"{h}." for h in head_modules(unwrap_peft(model)))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_head_parameter(n, heads))
    return {"adapter": total - head, "head": head, "total": total}
