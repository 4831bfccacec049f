"""PEFT baseline folders: their record fingerprints the base, and a load onto another base is refused."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_bert

from metatt_deploy.adapters.base_model import load_classifier
from metatt_deploy.adapters.lora import LORA_RECORD, load_lora
from metatt_deploy.adapters.model import base_fingerprint, fingerprint
from metatt_deploy.adapters.model_kinds import head_modules
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training.config import TrainConfig
from metatt_deploy.training.single import train


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_a_peft_folder_loads_only_on_the_base_it_was_trained_on(tiny_base, tiny_task, tmp_path, method) -> None:
    cfg = TrainConfig(output=str(tmp_path / "run"), model=str(tiny_base), method=method, rank=2, epochs=1, max_steps=1, max_length=16)
    train(cfg, tiny_task)
    best = tmp_path / "run" / "best"
    record = json.loads((best / LORA_RECORD).read_text())
    fresh = load_classifier(str(tiny_base), tiny_task.label_names)
    # recorded from the PEFT-wrapped base during training: equal to the plain base's (PEFT's own parameters left out)
    assert record["base_fingerprint"] == base_fingerprint(fresh) == fingerprint(fresh, [], head_modules(fresh))
    load_lora(best, tokenizer=False)  # its own base

    other = tmp_path / "other"  # same architecture and shapes, other weights: PEFT itself would load it silently
    save_tiny_bert(other, seed=1)
    with pytest.raises(
        MetaTTError, match=f"trained on base model .*fingerprint {record['base_fingerprint'][:12]}.*pass the adapter's own base"
    ):
        load_lora(best, base_model=str(other), tokenizer=False)

    del record["base_fingerprint"]  # a folder written before the fingerprint was recorded still loads
    (best / LORA_RECORD).write_text(json.dumps(record))
    load_lora(best, base_model=str(other), tokenizer=False)
