"""Which modules of a Hugging Face model a MetaTT adapter adapts, and where they sit in the TT.

Each architecture maps matrix-type names (q, k, v, o, up, down, gate) to a regular expression
over module names whose first group is the layer number. The layer index of the TT is the rank
of that number among the matched layers; the matrix index is the position of the type in the
user's ``--targets`` list. GPT-2 fuses q, k and v into one Conv1D (``c_attn``): the three types
then name thirds of its output, so one wrapped module feeds three matrix indices.

Non-square targets and grouped-query attention use the *leading-block* scheme: the TT's input
mode has the largest input width among the targets and its output mode the largest output
width; a target of width ``d_in x d_out`` uses the first ``d_in`` rows of the input factor and
the first ``d_out`` columns of the output factor. It costs no parameters beyond the largest
target and keeps every matrix an exact slice of one tensor (so merging and LoRA export stay
exact).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn

from metatt_deploy.common.errors import MetaTTError

# matrix type -> (module-name regex with the layer number as group 1, part, parts)
_ATTN_BERT = {
    "q": (r"\.layer\.(\d+)\.attention\.self\.query$", 0, 1),
    "k": (r"\.layer\.(\d+)\.attention\.self\.key$", 0, 1),
    "v": (r"\.layer\.(\d+)\.attention\.self\.value$", 0, 1),
    "o": (r"\.layer\.(\d+)\.attention\.output\.dense$", 0, 1),
    "up": (r"\.layer\.(\d+)\.intermediate\.dense$", 0, 1),
    "down": (r"\.layer\.(\d+)\.output\.dense$", 0, 1),
}
ARCHITECTURES: dict[str, dict] = {
    "bert": {"targets": _ATTN_BERT, "head": ["classifier"]},
    "roberta": {"targets": _ATTN_BERT, "head": ["classifier"]},
    "xlm-roberta": {"targets": _ATTN_BERT, "head": ["classifier"]},
    "mpnet": {
        "targets": {
            "q": (r"\.layer\.(\d+)\.attention\.attn\.q$", 0, 1),
            "k": (r"\.layer\.(\d+)\.attention\.attn\.k$", 0, 1),
            "v": (r"\.layer\.(\d+)\.attention\.attn\.v$", 0, 1),
            "o": (r"\.layer\.(\d+)\.attention\.attn\.o$", 0, 1),
            "up": (r"\.layer\.(\d+)\.intermediate\.dense$", 0, 1),
            "down": (r"\.layer\.(\d+)\.output\.dense$", 0, 1),
        },
        "head": ["classifier"],
    },
    "distilbert": {
        "targets": {
            "q": (r"\.layer\.(\d+)\.attention\.q_lin$", 0, 1),
            "k": (r"\.layer\.(\d+)\.attention\.k_lin$", 0, 1),
            "v": (r"\.layer\.(\d+)\.attention\.v_lin$", 0, 1),
            "o": (r"\.layer\.(\d+)\.attention\.out_lin$", 0, 1),
            "up": (r"\.layer\.(\d+)\.ffn\.lin1$", 0, 1),
            "down": (r"\.layer\.(\d+)\.ffn\.lin2$", 0, 1),
        },
        "head": ["pre_classifier", "classifier"],
    },
    "llama": {
        "targets": {
            "q": (r"\.layers\.(\d+)\.self_attn\.q_proj$", 0, 1),
            "k": (r"\.layers\.(\d+)\.self_attn\.k_proj$", 0, 1),
            "v": (r"\.layers\.(\d+)\.self_attn\.v_proj$", 0, 1),
            "o": (r"\.layers\.(\d+)\.self_attn\.o_proj$", 0, 1),
            "gate": (r"\.layers\.(\d+)\.mlp\.gate_proj$", 0, 1),
            "up": (r"\.layers\.(\d+)\.mlp\.up_proj$", 0, 1),
            "down": (r"\.layers\.(\d+)\.mlp\.down_proj$", 0, 1),
        },
        "head": ["score"],
    },
    "gpt2": {
        "targets": {
            "q": (r"\.h\.(\d+)\.attn\.c_attn$", 0, 3),
            "k": (r"\.h\.(\d+)\.attn\.c_attn$", 1, 3),
            "v": (r"\.h\.(\d+)\.attn\.c_attn$", 2, 3),
            "o": (r"\.h\.(\d+)\.attn\.c_proj$", 0, 1),
            "up": (r"\.h\.(\d+)\.mlp\.c_fc$", 0, 1),
            "down": (r"\.h\.(\d+)\.mlp\.c_proj$", 0, 1),
        },
        "head": ["score"],
    },
}
# decoder families with LLaMA's module names (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)
for _name in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
    ARCHITECTURES[_name] = ARCHITECTURES["llama"]
DEFAULT_TARGETS = ["q", "k", "v", "o"]
# Set by base_model.load_classifier: head-adjacent modules (a pooler) the checkpoint lacked, so
# they were newly initialised; they train and ship with the head (see head_modules).
NEW_MODULES_ATTR = "metatt_new_modules"


@dataclass
class TargetModule:
    """One wrapped module: its TT coordinates and the part of its output each matrix type owns."""

    name: str
    layer: int
    in_features: int
    out_features: int
    segments: list[tuple[int, int, int]]  # (matrix index, first output unit, end output unit)
    transposed: bool  # GPT-2 Conv1D stores its weight as (in, out)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TargetModule:
        return cls(**{**d, "segments": [tuple(s) for s in d["segments"]]})


def module_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, transposed) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = cast(torch.Tensor, module.weight)
        return int(weight.shape[0]), int(weight.shape[1]), True
    raise MetaTTError(f"module of type {type(module).__name__} cannot be adapted; target nn.Linear or Conv1D layers")


def suffix_pattern(suffix: str) -> str:
    """A plain module-name suffix as a pattern on whole path components, layer number as group 1."""
    return r"\.(\d+)\.(?:.+\.)?" + re.escape(suffix.strip(".")) + "$"


def layer_suffixes(model: nn.Module, limit: int = 8) -> list[str]:
    """The adaptable modules' name suffixes after a layer number, as found in ``model`` (for hints)."""
    found: dict[str, None] = {}
    for name, module in model.named_modules():
        match = re.search(r"\.\d+\.(.+)$", "." + name)
        if match and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            found.setdefault(match.group(1))
    return list(found)[:limit]


def parse_targets(targets: str | list[str], model_type: str, suggestions: list[str] | None = None) -> dict[str, tuple[str, int, int]]:
    """Resolve ``q,k,v,o`` (or ``name=regex`` pairs for other architectures) to patterns.

    A plain ``name=suffix`` matches whole path components after a layer number (``down=output.dense``
    matches ``layer.0.output.dense`` and ``layer.0.attention.output.dense``, not ``xoutput.dense``);
    ``suggestions`` (suffixes found in the model) make the hint for unknown targets concrete.
    """
    items = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    items = [t for t in items if t]
    if not items:
        raise MetaTTError("no targets given; pass --targets q,k,v,o or name=regex pairs")
    known = ARCHITECTURES.get(model_type, {}).get("targets", {})
    out: dict[str, tuple[str, int, int]] = {}
    for item in items:
        name, _, pattern = item.partition("=")
        if name in out:
            raise MetaTTError(f"target '{name}' given twice; list each matrix type once")
        if pattern:
            if "(" not in pattern:  # a plain suffix: the layer number is the first .N. before it
                pattern = suffix_pattern(pattern)
            else:
                try:
                    groups = re.compile(pattern).groups
                except re.error as e:
                    raise MetaTTError(f"target '{item}' is not a valid regular expression ({e}); fix --targets") from None
                if groups < 1:
                    raise MetaTTError(
                        f"target '{item}' needs the layer number as its first group, e.g. {name}=\\.layer\\.(\\d+)\\.attn\\.q$"
                    )
            out[name] = (pattern, 0, 1)
        elif name in known:
            out[name] = known[name]
        else:
            found = f"; this model's layers hold: {', '.join(suggestions)}" if suggestions else ""
            example = f"{name}={suggestions[0]}" if suggestions else "q=attn.q_proj"
            hint = (
                f"known for {model_type}: {', '.join(known)}"
                if known
                else f"architecture '{model_type}' has no default targets; pass name=module_suffix pairs, e.g. {example}{found}"
            )
            raise MetaTTError(f"unknown target '{name}' ({hint})")
    return out


def find_targets(model: nn.Module, targets: str | list[str]) -> tuple[list[str], list[int], list[TargetModule]]:
    """Match target patterns against ``model``'s modules.

    Returns the matrix-type names (TT matrix-mode order), the original layer numbers (TT
    layer-mode order) and one TargetModule per wrapped module.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    patterns = parse_targets(targets, model_type, layer_suffixes(model))
    names = list(patterns)
    hits: dict[str, dict] = {}
    for module_name, module in model.named_modules():
        full = "." + module_name
        for m, (pattern, part, parts) in enumerate(patterns.values()):
            match = re.search(pattern, full)
            if not match:
                continue
            if not match.groups() or not (match.group(1) or "").isdigit():
                raise MetaTTError(f"target {names[m]} matched {module_name} without a layer number in its first group; fix --targets")
            d_in, d_out, transposed = module_dims(module)
            if d_out % parts:
                raise MetaTTError(f"{module_name} has {d_out} outputs, not divisible into {parts} fused parts")
            step = d_out // parts
            entry = hits.setdefault(
                module_name,
                {
                    "layer": int(match.group(1)),
                    "d_in": d_in,
                    "d_out": d_out,
                    "transposed": transposed,
                    "segs": [],
                },
            )
            entry["segs"].append((m, part * step, (part + 1) * step))
    found = {m for e in hits.values() for m, _, _ in e["segs"]}
    missing = [n for i, n in enumerate(names) if i not in found]
    if missing:
        raise MetaTTError(
            f"targets {', '.join(missing)} match no module of this {model_type or 'model'}; "
            "check --targets against the model's module names"
        )
    _check_unambiguous(names, hits)
    layers = sorted({e["layer"] for e in hits.values()})
    modules = [
        TargetModule(n, layers.index(e["layer"]), e["d_in"], e["d_out"], sorted(e["segs"]), e["transposed"]) for n, e in hits.items()
    ]
    return names, layers, modules


def _check_unambiguous(names: list[str], hits: dict[str, dict]) -> None:
    """One module per (layer, matrix type) and one matrix type per output unit, else name the clash."""
    seen: dict[tuple[int, int], list[str]] = {}
    for module_name, e in hits.items():
        for m, _, _ in e["segs"]:
            seen.setdefault((e["layer"], m), []).append(module_name)
        units = sorted((s, t) for _, s, t in e["segs"])
        if any(b[0] < a[1] for a, b in zip(units, units[1:])):
            both = ", ".join(names[m] for m, _, _ in e["segs"])
            raise MetaTTError(f"targets {both} all match module {module_name}; give each matrix type its own module in --targets")
    for (layer, m), found in seen.items():
        if len(found) > 1:
            raise MetaTTError(
                f"target {names[m]} is ambiguous: it matches {len(found)} modules of layer {layer} ({', '.join(found)}); "
                "give a longer suffix or a regex with the layer number as its group"
            )


# architecture class names of decoders saved as language models (adapters/model_kinds.py dispatches on them)
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def architecture_heads(model: nn.Module) -> list[str]:
    """The classification head's top modules for the model's architecture."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in ARCHITECTURES:
        return list(ARCHITECTURES[model_type]["head"])
    found = [n for n in ("classifier", "score", "pre_classifier") if hasattr(model, n)]
    if not found:
        raise MetaTTError(f"cannot find the classification head of a {model_type} model; it needs a 'classifier' or 'score' module")
    return found
