"""ONNX Runtime GenAI as a second decode loop for factored decoder bundles (an optional extra).

``export BUNDLE --genai`` makes a bundle a GenAI model folder; the runtime side (serving's
``generate --runtime genai``) and the export's own parity check both run it through here, so
the search options and the stop rule are decided once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import GENAI_CONFIG

INSTALL_HINT = "pip install 'metatt-deploy[genai]' (onnxruntime-genai)"


def import_genai() -> Any:
    """onnxruntime_genai, or a one-line error saying how to install it (it is an optional extra)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise MetaTTError(f"ONNX Runtime GenAI is not installed; {INSTALL_HINT}") from None
    return og


def genai_tokens(
    og: Any,
    model: Any,
    adapters: Any,
    task: str,
    ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
) -> Iterator[int]:
    """The new tokens of one prompt, from a fresh GenAI generator with ``task``'s adapter active (stops at EOS)."""
    params = og.GeneratorParams(model)
    options: dict[str, Any] = {"max_length": len(ids) + max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=temperature, random_seed=seed, top_k=50, top_p=1.0)  # transformers' sampling defaults
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, task)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
        yield int(generator.get_next_tokens()[0])


def genai_eos_ids(folder: Path) -> set[int]:
    """The EOS ids GenAI stops at (its genai_config.json)."""
    eos = json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])
