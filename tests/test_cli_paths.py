"""Every documented path for every kind of run, through the CLI, on a tiny model.

One walk per kind of run (single-task MetaTT, multi-task MetaTT, PEFT LoRA) and per data source
(a builtin data set, faked in METATT_DATA_DIR; data files): train -> merge -> export ->
validate -> predict, asserting each step's output. Plus the CLI-wide rules: complete --help in
a pipe, one event per log line, the single --task hint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import nli_rows, sentiment_rows
from typer.testing import CliRunner

from metatt_deploy.adapters.config import MetaTTConfig
from metatt_deploy.adapters.lora import LORA_RECORD
from metatt_deploy.cli import app
from metatt_deploy.export.merge import MERGE_RECORD
from metatt_deploy.export.reference import load_reference

FAST_TRAIN = ["--rank", "4", "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--max-steps", "4"]
FAST_VALIDATE = ["--seq-len", "32", "--batch-sizes", "1", "--repeats", "2", "--warmup", "0", "--threads", "1"]
TEXTS = ["this was good and great today", "this was bad and awful today"]


def cli(*args: str, input: str | None = None) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def cli_error(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith("error: "), result.output
    return lines[-1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def predictions(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def expected_labels(adapter: Path, texts: list, task: str | None = None) -> list[str]:
    """Labels the unmerged PyTorch adapter gives: what predict on any export must answer."""
    ref = load_reference(adapter, task)
    columns = [list(c) for c in zip(*[(t,) if isinstance(t, str) else t for t in texts])]
    with torch.no_grad():
        logits = ref.model(**ref.tokenizer(*columns, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    return [ref.labels[i] for i in logits.argmax(-1).tolist()]


def check_validate(adapter: Path, bundle: Path, data: str, examples: int, task: str, *extra: str) -> dict:
    """validate: parity enforced and passed, all the data used, reports beside the bundle."""
    out = cli("validate", adapter, bundle, "--data", data, *FAST_VALIDATE, *extra)
    assert "tolerance 1e-04" in out and "label agreement 1.0000" in out
    assert f"all {examples} examples" in out and "random" not in out
    report_json = bundle.parent / f"{bundle.name}.validation.json"
    assert report_json.is_file() and (bundle.parent / f"{bundle.name}.validation.md").is_file()
    assert not list(bundle.glob("validation.*"))  # the bundle holds what its manifest lists
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(
        p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    report = json.loads(report_json.read_text())
    assert report["task"] == task and report["parity"]["passed"] and report["parity"]["max_abs_logit_diff"] <= 1e-4
    assert report["data"]["examples"] == examples and report["data"]["subset"] is False
    assert report["adapter_matches_manifest"] is True
    return report


def check_predict(bundle: Path, adapter: Path, task: str, labels: list[str]) -> None:
    """predict on an export: --text (no --task needed for one task), stdin, a plain text file."""
    expected = expected_labels(adapter, TEXTS, task)
    rows = predictions(cli("predict", bundle, "--text", TEXTS[0], "--text", TEXTS[1], "--threads", "1"))
    assert [r["task"] for r in rows] == [task, task] and [r["label"] for r in rows] == expected
    assert all(set(r["scores"]) == set(labels) and abs(sum(r["scores"].values()) - 1) < 1e-6 for r in rows)
    assert predictions(cli("predict", bundle, input="\n".join(TEXTS) + "\n")) == rows
    texts = bundle.parent / f"{bundle.name}-texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert predictions(cli("predict", bundle, "-i", texts)) == rows


@pytest.fixture
def workdir(tmp_path, monkeypatch, fake_builtins):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METATT_DATA_DIR", str(fake_builtins))
    return tmp_path


def data_files(root: Path, stem: str, make) -> list[Path]:
    return [
        write_jsonl(root / f"{stem}.{split}.jsonl", make(n, offset))
        for split, n, offset in (("train", 40, 0), ("validation", 12, 100), ("test", 12, 200))
    ]


# ---------------------------------------------------------------- single-task MetaTT and LoRA


@pytest.mark.parametrize("method", ["metatt-4d", "lora"])
@pytest.mark.parametrize("source", ["builtin", "files"])
def test_single_task_walk(workdir: Path, tiny_base_128: Path, method: str, source: str) -> None:
    labels = ["negative", "positive"]
    if source == "builtin":
        data_args, task, held_out, n_test = ["--dataset", "movie-sentiment"], "movie-sentiment", "movie-sentiment", 12
    else:
        train, validation, test = data_files(workdir, "bbc", sentiment_rows)
        data_args, task, held_out, n_test = ["--train", train, "--validation", validation, "--test", test], "bbc", str(test), 12
    if method == "lora":  # an explicit --task-name, used everywhere
        data_args, task = [*data_args, "--task-name", "news"], "news"
    out = cli("train", *data_args, "--method", method, "--model", tiny_base_128, *FAST_TRAIN, "-o", "runs/run")
    assert f"task '{task}': best validation accuracy" in out and "test accuracy" in out
    best = workdir / "runs/run/best"
    if method == "lora":
        assert json.loads((best / LORA_RECORD).read_text())["task"] == task
    else:
        assert MetaTTConfig.load(best).tasks == [task]
    assert json.loads((workdir / "runs/run/metrics.json").read_text())["task"] == task

    out = cli("merge", best, "-o", "runs/merged")
    assert f"merged task '{task}'" in out
    record = json.loads((workdir / "runs/merged" / MERGE_RECORD).read_text())
    assert record["task"] == task and record["method"] == method

    out = cli("export", "runs/merged", "--name", "run")
    bundle = workdir / "exported/run"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "exported" in out and manifest["task"] == task and manifest["adapter"]["method"] == method
    assert list(manifest["labels"].values()) == labels

    check_validate(best, bundle, held_out, n_test, task)
    check_predict(bundle, best, task, labels)

    # straight from the adapter folder (merged on the fly): the same logits
    cli("export", best, "-o", "exported/direct")
    report = check_validate(best, workdir / "exported/direct", held_out, n_test, task)
    assert report["method"] == method


# ---------------------------------------------------------------- multi-task MetaTT


@pytest.mark.parametrize("source", ["builtin", "files"])
def test_multi_task_walk(workdir: Path, tiny_base_128: Path, source: str) -> None:
    if source == "builtin":
        specs = ["--task", "movie=movie-sentiment", "--task", "nli=snli"]
        held_out = {"movie": "movie-sentiment", "nli": "snli"}
    else:
        movie, nli = data_files(workdir, "movie", sentiment_rows), data_files(workdir, "nli", nli_rows)
        specs = ["--task", "movie=" + ",".join(map(str, movie)), "--task", "nli=" + ",".join(map(str, nli))]
        held_out = {"movie": str(movie[2]), "nli": str(nli[2])}
    labels = {"movie": ["negative", "positive"], "nli": ["entailment", "neutral", "contradiction"]}
    out = cli("train", *specs, "--model", tiny_base_128, *FAST_TRAIN, "-o", "runs/joint")
    assert "best mean validation accuracy" in out and "movie" in out and "nli" in out
    best = workdir / "runs/joint/best"

    # merge --task -> export -> validate (the task the export records, and --task given)
    assert "merged task 'movie'" in cli("merge", best, "--task", "movie", "-o", "runs/movie")
    cli("export", "runs/movie", "-o", "exported/movie")
    check_validate(best, workdir / "exported/movie", held_out["movie"], 12, "movie")
    check_validate(best, workdir / "exported/movie", held_out["movie"], 12, "movie", "--task", "movie", "--force")
    check_predict(workdir / "exported/movie", best, "movie", labels["movie"])

    # an export straight from the multi-task adapter with --task
    cli("export", best, "--task", "nli", "-o", "exported/nli")
    check_validate(best, workdir / "exported/nli", held_out["nli"], 12, "nli", "--task", "nli")
    pair = "the cat 3 sleeps ||| the cat is not asleep"
    row = predictions(cli("predict", "exported/nli", "--text", pair))[0]
    assert row["task"] == "nli" and row["label"] == expected_labels(best, [tuple(pair.split(" ||| "))], "nli")[0]

    # the factored bundle: a task per call or per row, the same answers as the single-task exports
    cli("merge", best, "--factored", "-o", "runs/bundle")
    assert "several tasks" in cli_error("predict", "runs/bundle", "--text", TEXTS[0])
    rows = predictions(cli("predict", "runs/bundle", "--task", "movie", "--text", TEXTS[0], "--text", TEXTS[1]))
    assert [r["label"] for r in rows] == expected_labels(best, TEXTS, "movie")
    mixed = write_jsonl(
        workdir / "mixed.jsonl", [{"id": 1, "text": TEXTS[0], "task": "movie"}, {"id": 2, "premise": "a", "hypothesis": "b", "task": "nli"}]
    )
    rows = predictions(cli("predict", "runs/bundle", "-i", mixed))
    assert [(r["id"], r["task"]) for r in rows] == [(1, "movie"), (2, "nli")] and rows[1]["label"] in labels["nli"]

    # an export that records no task: validate names the tasks to choose from
    cli("export", tiny_base_128, "-o", "exported/base")
    message = cli_error("validate", best, "exported/base", *FAST_VALIDATE)
    assert "serves several tasks (movie, nli)" in message and "--task" in message


# ---------------------------------------------------------------- CLI-wide rules


def _words(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("command", ["train", "merge", "export", "validate", "predict"])
def test_help_is_complete_in_a_pipe(command: str) -> None:
    """Every option's name, full help text and default appear (wrapping aside); nothing is cut."""
    import click
    import typer.main

    out = CliRunner().invoke(app, [command, "--help"]).output  # stdout is not a terminal here
    assert "…" not in out
    group = typer.main.get_command(app)
    params = group.get_command(click.Context(group), command).params  # type: ignore[attr-defined]
    for param in params:
        if isinstance(param, click.Option):
            assert all(opt in out for opt in param.opts)
            if param.help:
                assert _words(param.help) in _words(out), f"{param.opts[0]} help is cut"
    if command == "train":
        assert _words("NAME=train.jsonl[,validation.jsonl[,test.jsonl]]") in _words(out)
        assert _words("[default: sentence-transformers/all-MiniLM-L6-v2]") in _words(out)


def test_logs_are_one_event_per_line(workdir: Path, tiny_base_128: Path) -> None:
    train, validation, _ = data_files(workdir, "bbc", sentiment_rows)
    out = cli(
        "train",
        "--train",
        train,
        "--validation",
        validation,
        "--model",
        tiny_base_128,
        *FAST_TRAIN,
        "--epochs",
        "2",
        "--max-steps",
        "10",
        "-o",
        "r",
    )
    lines = out.splitlines()
    assert "\r" not in out
    epochs = [line for line in lines if "epoch " in line and "accuracy" in line and "task" not in line]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1", "epoch 2"]  # each at the start of its own line
    progress = [line for line in lines if line.startswith("train metatt-4d:")]
    assert progress and all("epoch 1: accuracy" not in line for line in progress)
    assert progress[0].startswith("train metatt-4d: 0/10 steps") and progress[-1].startswith("train metatt-4d: 10/10 steps (100%)")


def test_one_task_error_points_to_dataset_and_train(workdir: Path, tiny_base_128: Path) -> None:
    message = cli_error("train", "--task", "movie=movie-sentiment", "--model", tiny_base_128, "-o", "r")
    assert "--dataset" in message and "--train" in message


def test_data_errors_name_the_file_line(workdir: Path, tiny_base_128: Path) -> None:
    rows = [json.dumps(r) for r in sentiment_rows(30, 0)]
    rows[20] = json.dumps({"text": None, "label": "positive"})  # line 21; validation carved from train
    path = workdir / "bbc.train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    assert "line 21 of bbc.train.jsonl" in cli_error("train", "--train", path, "--model", tiny_base_128, "-o", "r")
