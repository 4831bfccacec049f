"""metatt_deploy.training.causal: MetaTT-4D/5D and PEFT LoRA on tiny decoders through the one loop."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from tiny_decoders import ALL_DECODER_TARGETS, save_tiny_decoder
from typer.testing import CliRunner

from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.training.causal import train_causal
from metatt_deploy.training.config import TrainConfig
from metatt_deploy.training.lm_data import load_text_task

WORDS = {"positive": ["good", "great", "fine"], "negative": ["bad", "awful", "poor"]}


def write_task(root: Path) -> dict[str, Path]:
    paths = {}
    for split, n in (("train", 48), ("validation", 8), ("test", 8)):
        rows = []
        for i in range(n):
            label = "positive" if i % 2 else "negative"
            rows.append({"prompt": f"Review: this was {WORDS[label][i % 3]} today", "response": label})
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.mark.parametrize("arch,method", [("llama", "metatt-4d"), ("llama", "metatt-5d"), ("llama", "lora"), ("gpt2", "metatt-4d")])
def test_causal_runs_train_the_response_and_save_a_loadable_adapter(tmp_path: Path, arch: str, method: str) -> None:
    base = save_tiny_decoder(tmp_path, arch)
    paths = write_task(tmp_path)
    task = load_text_task(train=str(paths["train"]), validation=str(paths["validation"]), test=str(paths["test"]))
    cfg = TrainConfig(
        output=str(tmp_path / "run"),
        model=str(base),
        method=method,
        rank=4,
        targets=ALL_DECODER_TARGETS[arch].split(","),
        lr=1e-2,
        epochs=2,
        batch_size=8,
        eval_batch_size=8,
        max_length=64,
    )
    result = train_causal(cfg, task)
    first, last = result["history"]
    assert last["perplexity"] < first["perplexity"] < 400  # the responses become likelier
    assert result["test"]["examples"] == 8 and 0.0 <= result["test"]["exact_match"] <= 1.0
    assert result["trainable_parameters"]["head"] == 0 and result["trainable_parameters"]["adapter"] > 0
    best = tmp_path / "run" / "best"
    if method == "lora":
        assert json.loads((best / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    else:
        config = MetaTTConfig.load(best)
        assert config.extra["task_type"] == "causal-lm" and config.targets == ALL_DECODER_TARGETS[arch].split(",")
    assert (tmp_path / "run" / "metrics.md").is_file()


def test_cli_trains_a_decoder_from_its_architecture_and_refuses_mismatched_data(tmp_path: Path, tiny_task_dir: Path) -> None:
    base = save_tiny_decoder(tmp_path, "llama")
    paths = write_task(tmp_path)
    common = ["train", "--model", str(base), "--rank", "2", "--targets", "q,v", "--epochs", "1", "--batch-size", "16", "--max-length", "64"]
    data = ["--train", str(paths["train"]), "--validation", str(paths["validation"])]
    result = CliRunner().invoke(app, [*common, *data, "--task-name", "qa", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "best validation exact match" in result.output
    assert MetaTTConfig.load(tmp_path / "r" / "best").tasks == ["qa"]  # --task-name names a decoder's task too
    result = CliRunner().invoke(app, [*common, *data, "--labels", "yes,no", "-o", str(tmp_path / "labels")])
    assert result.exit_code == 2 and "--labels names one classification task's labels" in result.output
    assert not (tmp_path / "labels").exists()
    # a classification file handed to a causal-LM run, and text-to-text data handed to a classifier run
    result = CliRunner().invoke(app, [*common, "--train", str(tiny_task_dir / "train.jsonl"), "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "not prompt/response or messages" in result.output
    result = CliRunner().invoke(
        app, [*common, "--task-type", "classification", "--train", str(paths["train"]), "-o", str(tmp_path / "bad2")]
    )
    assert result.exit_code == 2 and "text-to-text data" in result.output
    result = CliRunner().invoke(app, [*common, "--task-type", "causal", "--train", str(paths["train"]), "-o", str(tmp_path / "bad3")])
    assert result.exit_code == 2 and "unknown --task-type" in result.output


def test_a_decoder_run_holds_its_output_and_bad_data_leave_nothing(tmp_path: Path) -> None:
    """Two runs into one -o: the second is refused; data found unusable while tokenizing leave no run folder."""
    base = save_tiny_decoder(tmp_path, "llama")
    paths = write_task(tmp_path)
    cfg = TrainConfig(output=str(tmp_path / "busy"), model=str(base), rank=2, targets=["q", "v"], epochs=1, max_length=64)
    (tmp_path / ".busy.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # held by a live process: this one
    with pytest.raises(MetaTTError, match="is in use by process"):
        train_causal(cfg, load_text_task(train=str(paths["train"]), validation=str(paths["validation"])))
    assert not (tmp_path / "busy").exists()
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200, "response": "b"}) + "\n")
    task = load_text_task(train=str(paths["train"]), validation=str(long))
    with pytest.raises(MetaTTError, match="more than --max-length 64"):
        train_causal(replace(cfg, output=str(tmp_path / "bad")), task)
    assert not (tmp_path / "bad").exists()
