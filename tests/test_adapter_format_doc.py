"""docs/adapter-format.md's reference loader, run as written: an independent loader from the doc
merges an adapter to the logits metatt_deploy gives (issue 10, class 8: the doc was found to have
gaps by writing such a loader)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tiny_models import inputs, logits, random_cores, tiny_model

from metatt_deploy.adapters.model import attach, build_config, load_adapter, save_adapter

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapter-format.md"


def reference_loader():
    text = DOC.read_text()
    code = re.search(r"## Reference loader.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["load_merged"]


def test_the_documented_loader_matches_the_package(tmp_path: Path) -> None:
    model = tiny_model("bert")
    base = tmp_path / "base"
    model.save_pretrained(base)
    config = build_config(model, rank=3, targets="q,k,v,o,up,down", base_model=str(base))
    attach(model, config, random_cores(config.core_shapes(), std=0.4))
    adapter = save_adapter(model, tmp_path / "adapter")
    batch = inputs()
    expected = logits(load_adapter(adapter, tokenizer=False)[0], batch)
    merged = reference_loader()(adapter, base)  # checks the format-2 fingerprint as documented
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)
