"""metatt-deploy: MetaTT tensor-train adapters from training to ONNX Runtime.

The public API (docs/api.md) is the names below, imported from the package itself
(``from metatt_deploy import Runtime, train``); everything under the subpackages is internal and
may move. The names resolve lazily (PEP 562): ``import metatt_deploy`` imports nothing, a runtime
name imports only the torch-free floor it lives on (serving, inference, common), and only a
training-stack name imports torch. That keeps ``from metatt_deploy import Runtime`` working on the
runtime-only install (``pip install metatt-deploy``), which has no torch at all, and keeps the
CLI's runtime verbs, which import ``__version__`` from here, fast to start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it. Runtime names first (runtime install), then the training
# stack (the `[train]` extra). Pointing at the defining modules, not at re-exports, keeps the
# import of a runtime name to its own floor.
_RUNTIME = {
    "MetaTTError": "metatt_deploy.common.errors",
    "TextTokenizer": "metatt_deploy.inference.text",
    "SamplingParams": "metatt_deploy.inference.decode",
    "Runtime": "metatt_deploy.serving.runtime",
    "Generator": "metatt_deploy.serving.generate",
    "GenAIGenerator": "metatt_deploy.serving.genai",
    "create_app": "metatt_deploy.serving.app",
    "ServeSettings": "metatt_deploy.serving.http",
    "create_openai_app": "metatt_deploy.serving.openai_app",
    "LLMSettings": "metatt_deploy.serving.openai_app",
}
_TRAINING = {
    "DEFAULT_MODEL": "metatt_deploy.adapters.base_model",
    "DEFAULT_DECODER": "metatt_deploy.adapters.base_model",
    "BUILTIN_TASKS": "metatt_deploy.training.builtin_data",
    "prepare_builtins": "metatt_deploy.training.builtin_data",
    "TrainConfig": "metatt_deploy.training.config",
    "MultiTaskConfig": "metatt_deploy.training.config",
    "load_task": "metatt_deploy.training.data",
    "load_text_task": "metatt_deploy.training.lm_data",
    "train": "metatt_deploy.training.single",
    "train_causal": "metatt_deploy.training.causal",
    "train_multitask": "metatt_deploy.training.multitask",
    "merge_adapter": "metatt_deploy.export.merge",
    "merge_factored": "metatt_deploy.export.merge",
    "to_peft": "metatt_deploy.export.peft",
    "write_bundle": "metatt_deploy.export.factored",
    "export_onnx": "metatt_deploy.export.onnx",
    "ExportOptions": "metatt_deploy.export.options",
    "Calibration": "metatt_deploy.export.options",
    "validate": "metatt_deploy.export.kinds",
    "validate_decoder": "metatt_deploy.export.validate_lm",
}
_WHERE = {**_RUNTIME, **_TRAINING}

__all__ = ["__version__", *_WHERE]

if TYPE_CHECKING:  # what mypy and editors see (`X as X`: re-exported); at run time __getattr__ imports on first use
    from metatt_deploy.adapters.base_model import DEFAULT_DECODER as DEFAULT_DECODER
    from metatt_deploy.adapters.base_model import DEFAULT_MODEL as DEFAULT_MODEL
    from metatt_deploy.common.errors import MetaTTError as MetaTTError
    from metatt_deploy.export.factored import write_bundle as write_bundle
    from metatt_deploy.export.kinds import validate as validate
    from metatt_deploy.export.merge import merge_adapter as merge_adapter
    from metatt_deploy.export.merge import merge_factored as merge_factored
    from metatt_deploy.export.onnx import export_onnx as export_onnx
    from metatt_deploy.export.options import Calibration as Calibration
    from metatt_deploy.export.options import ExportOptions as ExportOptions
    from metatt_deploy.export.peft import to_peft as to_peft
    from metatt_deploy.export.validate_lm import validate_decoder as validate_decoder
    from metatt_deploy.inference.decode import SamplingParams as SamplingParams
    from metatt_deploy.inference.text import TextTokenizer as TextTokenizer
    from metatt_deploy.serving.app import create_app as create_app
    from metatt_deploy.serving.genai import GenAIGenerator as GenAIGenerator
    from metatt_deploy.serving.generate import Generator as Generator
    from metatt_deploy.serving.http import ServeSettings as ServeSettings
    from metatt_deploy.serving.openai_app import LLMSettings as LLMSettings
    from metatt_deploy.serving.openai_app import create_openai_app as create_openai_app
    from metatt_deploy.serving.runtime import Runtime as Runtime
    from metatt_deploy.training.builtin_data import BUILTIN_TASKS as BUILTIN_TASKS
    from metatt_deploy.training.builtin_data import prepare_builtins as prepare_builtins
    from metatt_deploy.training.causal import train_causal as train_causal
    from metatt_deploy.training.config import MultiTaskConfig as MultiTaskConfig
    from metatt_deploy.training.config import TrainConfig as TrainConfig
    from metatt_deploy.training.data import load_task as load_task
    from metatt_deploy.training.lm_data import load_text_task as load_text_task
    from metatt_deploy.training.multitask import train_multitask as train_multitask
    from metatt_deploy.training.single import train as train


if not TYPE_CHECKING:  # hidden from mypy, which would otherwise type every misspelt name as Any

    def __getattr__(name: str) -> Any:
        """Import a public name's module on first use and cache the name here (PEP 562)."""
        if name not in _WHERE:
            raise AttributeError(f"module 'metatt_deploy' has no attribute '{name}'")
        try:
            module = importlib.import_module(_WHERE[name])
        except ModuleNotFoundError as e:  # the runtime-only install has no torch: say which extra brings it
            if name not in _TRAINING or (e.name or "").split(".")[0] == "metatt_deploy":
                raise
            raise ModuleNotFoundError(
                f"metatt_deploy.{name} needs the training stack ({e.name} is not installed): pip install 'metatt-deploy[train]'",
                name=e.name,
            ) from e
        value = getattr(module, name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
