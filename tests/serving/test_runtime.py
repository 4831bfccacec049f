"""The ONNX Runtime API over a factored bundle and `metatt-deploy predict`: one load, any task,
mixed batches, tasks added later, and clear errors for unknown tasks and foreign files."""

from __future__ import annotations

import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from multitask_fixtures import LABELS, build_tiny_multitask
from onnx_fixtures import LABELS as EXPORT_LABELS
from onnx_fixtures import build_tiny
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from metatt_deploy.adapters.heads import routers
from metatt_deploy.adapters.multitask import extend_tasks, save_multitask
from metatt_deploy.cli import app
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import sha256_file
from metatt_deploy.export.factored import write_bundle
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.inference.formats import TASKS_DIR
from metatt_deploy.inference.tasks import text_inputs
from metatt_deploy.serving.runtime import Runtime, length_buckets, read_inputs

TOL = 1e-4
TEXTS = ["A wonderful film.", ("A man sleeps.", "A man is awake."), "ok", "Dull and slow."]
TASKS = ["movie", "nli", "four", "movie"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    base, adapter, mtm, tokenizer = build_tiny_multitask(root)
    bundle = root / "bundle"
    write_bundle(adapter, bundle)
    return root, adapter, mtm, tokenizer, bundle


def reference(mtm, tokenizer, text, task) -> np.ndarray:
    enc = tokenizer(*((text,) if isinstance(text, str) else text), return_tensors="pt")
    with torch.no_grad():
        return mtm(**enc, task_ids=task).logits[0, : len(LABELS[task])].numpy()


def test_predict_any_task_and_mixed_batches_without_reloading(served) -> None:
    _, _, mtm, tokenizer, bundle = served
    rt = Runtime(bundle, threads=1)
    assert rt.tasks == list(LABELS) and rt.labels("nli") == LABELS["nli"]
    mixed = rt.logits(TEXTS, tasks=TASKS)
    session = rt._task_session
    for text, task, row in zip(TEXTS, TASKS, mixed):
        ref = reference(mtm, tokenizer, text, task)
        assert row.shape == ref.shape and np.abs(row - ref).max() <= TOL
        alone = rt.logits([text], task=task)[0]
        assert np.abs(alone - row).max() <= 1e-5  # a row of a mixed batch gets what it gets alone
    assert rt._task_session is session and rt._adapter_session is None  # switching tasks reloads nothing
    results = rt.predict(TEXTS, tasks=[0, 1, 2, 0], batch_size=3)
    for r, task, row in zip(results, TASKS, mixed):
        assert r["task"] == task and r["label"] == LABELS[task][int(row.argmax())]
        assert set(r["scores"]) == set(LABELS[task]) and sum(r["scores"].values()) == pytest.approx(1.0)
        assert r["score"] == max(r["scores"].values())
    # the adapter form gives the same answers, one adapter per task, kept after first use
    ra = Runtime(bundle, form="adapter", threads=1)
    for text, task, row in zip(TEXTS, TASKS, mixed):
        assert np.abs(ra.logits([text], task=task)[0] - row).max() <= TOL
    assert set(ra._adapters) == {"movie", "nli", "four"}


def partitions(items: list[int]):
    """Every way to split ``items`` into non-empty groups (the brute-force reference for `length_buckets`)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for split in partitions(rest):
        yield [[first], *split]
        for k in range(len(split)):
            yield [*split[:k], [first, *split[k]], *split[k + 1 :]]


def cost(groups: list[list[int]], lengths: list[int], overhead: int) -> int:
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


@pytest.mark.parametrize("overhead", [0, 8, 64, 1000])
def test_length_buckets_cost_no_more_than_the_best_split_found_by_brute_force(overhead: int) -> None:
    rng = np.random.default_rng(overhead)
    for _ in range(30):
        lengths = rng.integers(3, 120, size=int(rng.integers(1, 8))).tolist()
        buckets = length_buckets(lengths, overhead)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))  # every row once
        assert cost(buckets, lengths, overhead) == min(cost(p, lengths, overhead) for p in partitions(list(range(len(lengths)))))
    assert length_buckets([9, 9, 9], 0) == [[0, 1, 2]]  # equal lengths: one call, however cheap a call is
    assert length_buckets([5, 100, 6], 1000) == [[0, 2, 1]]  # calls dearer than any padding: one call


def test_rows_of_different_lengths_run_in_calls_of_their_own_length_and_equal_each_row_alone(served, monkeypatch) -> None:
    _, _, mtm, tokenizer, bundle = served
    rt = Runtime(bundle, threads=1)
    long = "A wonderful film, " * 20 + "truly."
    texts = ["ok", long, ("A man sleeps.", "A man is awake."), "fine", long + " Yes.", "Dull."]
    tasks = ["four", "movie", "nli", "movie", "four", "four"]
    widths: list[int] = []
    run = rt._run
    monkeypatch.setattr(rt, "_run", lambda enc, names: widths.append(enc["input_ids"].shape[1]) or run(enc, names))
    mixed = rt.logits(texts, tasks=tasks)
    assert len(widths) >= 2 and min(widths) < 16 < max(widths)  # the short rows were not padded to the long ones
    for text, task, row in zip(texts, tasks, mixed):
        assert np.abs(row - reference(mtm, tokenizer, text, task)).max() <= TOL
        assert np.abs(row - rt.logits([text], task=task)[0]).max() <= 1e-5


def test_unknown_tasks_and_bad_inputs_are_errors(served) -> None:
    _, _, _, _, bundle = served
    rt = Runtime(bundle, threads=1)
    for kwargs, match in (
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"task": 3}, "unknown task id 3"),
        ({"task": -1}, "unknown task id -1"),
        ({"tasks": ["movie"]}, "one task per row"),
        ({}, "pass task=NAME"),
        ({"task": "movie", "tasks": ["movie", "movie"]}, "not both"),
    ):
        with pytest.raises(MetaTTError, match=match):
            rt.predict(["a", "b"], **kwargs)
    with pytest.raises(MetaTTError, match="a text or a pair"):
        rt.predict([("a", "b", "c")], task="nli")
    with pytest.raises(MetaTTError, match="unknown form"):
        Runtime(bundle, form="fast")
    with pytest.raises(MetaTTError, match="neither a factored bundle"):
        Runtime(bundle / TASKS_DIR)


def test_late_task_served_through_its_adapter_and_foreign_adapters_refused(served, tmp_path) -> None:
    root, _, mtm, tokenizer, bundle = served
    deployed = tmp_path / "deployed"
    shutil.copytree(bundle, deployed)
    grown = copy.deepcopy(mtm)
    extend_tasks(grown, "late", ["no", "yes"], seed=5)
    with torch.no_grad():
        grown.metatt.cores[3][:, 3] += 0.3
        for p in routers(grown.model)[0].heads[3].parameters():
            p.add_(0.5)
    write_bundle(save_multitask(grown, tmp_path / "grown", tokenizer), deployed, tasks=["late"])
    rt = Runtime(deployed, threads=1)
    assert rt.tasks == [*LABELS, "late"]
    rows = rt.logits(["great", "awful", "fine"], tasks=["late", "movie", "late"])
    enc = tokenizer(["great", "awful", "fine"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = grown(**enc, task_ids=[3, 0, 3]).logits.numpy()
    for row, r in zip(rows, ref):
        assert np.abs(row - r[: len(row)]).max() <= TOL
    with pytest.raises(MetaTTError, match="added after model_tasks.onnx"):
        Runtime(deployed, form="tasks").predict(["x"], task="late")
    # an .onnx_adapter from another bundle (same shapes, other shared cores) is refused
    other = tmp_path / "other"
    _, other_adapter, _, _ = build_tiny_multitask(root, core_seed=11)
    write_bundle(other_adapter, other)
    shutil.copy(other / TASKS_DIR / "movie.onnx_adapter", deployed / TASKS_DIR / "late.onnx_adapter")
    with pytest.raises(MetaTTError, match="sha256 differs"):  # the task record's hash catches it first
        Runtime(deployed, form="adapter").predict(["x"], task="late")
    record_path = deployed / TASKS_DIR / "late.json"
    record = json.loads(record_path.read_text())
    record["files"]["onnx_adapter"]["sha256"] = sha256_file(deployed / TASKS_DIR / "late.onnx_adapter")
    record_path.write_text(json.dumps(record))  # a record edited to match: the bundle version still refuses it
    with pytest.raises(MetaTTError, match="written for another bundle"):
        Runtime(deployed, form="adapter").predict(["x"], task="late")


def test_read_inputs(tmp_path) -> None:
    texts, tasks, ids = read_inputs(["a", "premise ||| hypothesis"], None, "nli")
    assert texts == ["a", ("premise", "hypothesis")] and tasks == ["nli", "nli"] and ids == [None, None]
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"text": "a", "task": "movie", "id": 7}\n\n{"premise": "p", "hypothesis": "h"}\n{"text": "x", "text_pair": "y", "task": "nli"}\n'
    )
    texts, tasks, ids = read_inputs(None, path, "nli")
    assert texts == ["a", ("p", "h"), ("x", "y")] and tasks == ["movie", "nli", "nli"] and ids == [7, None, None]
    with pytest.raises(MetaTTError, match="names no task"):
        read_inputs(None, path, None)
    for bad, match in (('{"foo": 1}\n', "no text field"), ("not json\n", "not valid JSON"), ("[1]\n", "not a JSON object")):
        path.write_text(bad)
        with pytest.raises(MetaTTError, match=match):
            read_inputs(None, path, "movie")
    with pytest.raises(MetaTTError, match="one of them"):
        read_inputs(None, None, "movie")
    with pytest.raises(MetaTTError, match="--task"):
        read_inputs(["a"], None, None)


def test_cli_predict(served, tmp_path) -> None:
    _, _, mtm, tokenizer, bundle = served
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(bundle), "--task", "nli", "--text", "A man sleeps. ||| A man is awake.", "--threads", "1"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    ref = reference(mtm, tokenizer, ("A man sleeps.", "A man is awake."), "nli")
    assert line["task"] == "nli" and line["label"] == LABELS["nli"][int(ref.argmax())]
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"id": i, "text": t, "task": k}) + "\n"
            for i, (t, k) in enumerate(zip(["good", "bad", "meh"], ["movie", "four", "movie"]))
        )
    )
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["predict", str(bundle), "-i", str(inp), "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["task"] for r in rows] == ["movie", "four", "movie"]
    assert rows[1]["label"] in LABELS["four"]
    res = runner.invoke(app, ["predict", str(bundle), "--task", "nope", "--text", "x"])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output
    res = runner.invoke(app, ["predict", str(bundle), "-i", str(inp), "-o", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output


def test_tasks_added_and_removed_after_open(served, tmp_path) -> None:
    """add_task publishes a task written after the Runtime opened (checked first); remove_task hides it."""
    root, _, mtm, tokenizer, bundle = served
    deployed = tmp_path / "deployed"
    shutil.copytree(bundle, deployed)
    rt = Runtime(deployed, threads=1)
    grown = copy.deepcopy(mtm)
    extend_tasks(grown, "late", ["no", "yes"], seed=5)
    write_bundle(save_multitask(grown, tmp_path / "grown", tokenizer), deployed, tasks=["late"])
    with pytest.raises(MetaTTError, match="unknown task 'late'"):
        rt.logits(["x"], task="late")  # not served until added
    assert rt.add_task("late")["task"] == "late" and rt.tasks == [*LABELS, "late"]
    assert rt._adapter_session is not None and "late" in rt._adapters  # loaded and checked at add, not at first use
    assert np.abs(rt.logits(["fine"], task="late")[0] - Runtime(deployed, threads=1).logits(["fine"], task="late")[0]).max() <= 1e-6
    with pytest.raises(MetaTTError, match="already served"):
        rt.add_task("late")
    rt.remove_task("movie")
    assert rt.tasks == ["nli", "four", "late"]
    with pytest.raises(MetaTTError, match="unknown task 'movie'"):
        rt.logits(["x"], task="movie")
    rt.add_task("movie")  # a baked task comes back on the task-id graph
    assert np.abs(rt.logits(["x"], task="movie")[0] - Runtime(bundle, threads=1).logits(["x"], task="movie")[0]).max() <= 1e-6
    for name, match in (("../base", "not a task name"), ("nope", "no task file tasks/nope.json")):
        with pytest.raises(MetaTTError, match=match):
            rt.add_task(name)
    record = json.loads((deployed / TASKS_DIR / "late.json").read_text())
    (deployed / TASKS_DIR / "gone.json").write_text(json.dumps({**record, "task": "gone", "files": {}}))
    with pytest.raises(MetaTTError, match="malformed"):
        rt.add_task("gone")
    (deployed / TASKS_DIR / "late.onnx_adapter").write_bytes(b"\0" * 16)
    rt.remove_task("late")
    with pytest.raises(MetaTTError, match="sha256 differs"):
        rt.add_task("late")


def test_a_single_task_export_opens_with_the_same_api(tmp_path) -> None:
    tiny = build_tiny(tmp_path)
    bundle = export_onnx(tiny.merged, tmp_path / "exported" / "mt")
    rt = Runtime(bundle, threads=1)
    task = json.loads((bundle / "manifest.json").read_text())["task"]
    assert rt.kind == "export" and rt.tasks == [task] and rt.labels() == rt.labels(task) == EXPORT_LABELS
    texts = ["A wonderful film.", "Dull and slow.", ("A man sleeps.", "A man is awake.")]
    merged = AutoModelForSequenceClassification.from_pretrained(tiny.merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny.merged)  # the reference: transformers' tokenizer and model
    for text, row in zip(texts, rt.logits(texts)):
        enc = tokenizer(*((text,) if isinstance(text, str) else text), return_tensors="pt")
        with torch.no_grad():
            ref = merged(**enc).logits[0].numpy()
        assert np.abs(row - ref).max() <= TOL
    single = texts[:2]  # a sentiment export answers single sentences; a pair is refused (see test_task_arity_*)
    results = rt.predict(single, batch_size=1)
    assert results == rt.predict(single, task=task) == rt.predict(single, tasks=[0, 0])
    assert [r["task"] for r in results] == [task] * 2 and all(r["label"] in EXPORT_LABELS for r in results)
    with pytest.raises(MetaTTError, match=f"input 3: task '{task}' takes one text, not a sentence pair"):
        rt.predict(texts)
    with pytest.raises(MetaTTError, match="unknown task 'nope'"):
        rt.predict(texts, task="nope")
    with pytest.raises(MetaTTError, match="applies to factored bundles"):
        Runtime(bundle, form="tasks")


def test_read_inputs_from_stdin_and_plain_text(tmp_path, monkeypatch) -> None:
    texts, tasks, ids = read_inputs(None, None, "movie", stdin=io.StringIO("good film\n\nA ||| B\n"))
    assert texts == ["good film", ("A", "B")] and tasks == ["movie", "movie"] and ids == [None, None]
    texts, tasks, _ = read_inputs(None, None, None, stdin=io.StringIO('{"text": "a", "task": "nli"}\n'))
    assert texts == ["a"] and tasks == ["nli"]
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert read_inputs(None, "-", "movie")[0] == ["x"]
    plain = tmp_path / "texts.txt"
    plain.write_text("one\ntwo\n")
    assert read_inputs(None, plain, "movie")[0] == ["one", "two"]
    with pytest.raises(MetaTTError, match="pass --task NAME"):
        read_inputs(None, plain, None)
    with pytest.raises(MetaTTError, match="has no inputs"):
        read_inputs(None, None, "movie", stdin=io.StringIO("\n"))
    with pytest.raises(MetaTTError, match="one of them"):
        read_inputs(["a"], plain, "movie")


def test_non_utf8_or_binary_inputs_are_one_line(served, tmp_path) -> None:
    """Issue 10: predict on a Latin-1 or binary file, or command-line bytes that are not UTF-8."""
    bundle = served[4]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "café", "task": "movie"}\n'.encode("latin-1"))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    runner = CliRunner()
    for path in (latin, binary):
        result = runner.invoke(app, ["predict", str(bundle), "--input", str(path)])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "is not UTF-8 text" in lines[0], result.output
    for args in ([], ["--input", "-"]):  # standard input: piped, or named with --input -
        result = runner.invoke(app, ["predict", str(bundle), "--task", "movie", *args], input=b'{"text": "caf\xe9"}\n')
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "standard input is not UTF-8 text (byte 13)" in lines[0], result.output
    with pytest.raises(MetaTTError, match="is not valid UTF-8 text"):
        read_inputs(["caf\udce9"], None, "movie")  # how Python passes the undecodable argv byte 0xe9
    out = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["predict", str(bundle), "--input", str(latin), "-o", str(latin), "--force"])
    assert result.exit_code == 2 and "is the input" in result.stderr and latin.read_bytes().startswith(b'{"text": "caf\xe9')
    assert not out.exists()


# ---------------------------------------------------------------- a task's inputs (issue 27, class 7)


def test_a_task_takes_the_inputs_its_record_or_labels_say() -> None:
    assert text_inputs({"labels": ["negative", "positive"]}) == 1
    assert text_inputs({"labels": ["entailment", "neutral", "contradiction"]}) == 2
    assert text_inputs({"labels": ["not_duplicate", "duplicate"]}) == 2
    assert text_inputs({"labels": ["Entailment", "not_entailment"]}) == 2
    assert text_inputs({"labels": ["a", "b"], "text_columns": ["question", "answer"]}) == 2  # the record wins over the labels
    assert text_inputs({"labels": ["entailment", "neutral"], "text_columns": ["text"]}) == 1
    assert text_inputs({"labels": ["a", "b"], "text_columns": ["x", "y", "z"]}) == 1  # a malformed record: the labels decide


def test_predict_refuses_pairs_for_sentence_tasks_and_sentences_for_pair_tasks(served, tmp_path) -> None:
    _, _, _, _, bundle = served
    runner = CliRunner()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine", "task": "movie"}\n{"premise": "p", "hypothesis": "h", "task": "movie"}\n')
    for args, match in (
        (["--task", "movie", "--text", "A man sleeps. ||| A man is awake."], "input 1: task 'movie' takes one text, not a sentence pair"),
        (["--task", "nli", "--text", "A man sleeps."], "input 1: task 'nli' takes a sentence pair [first, second] per row"),
        (["--input", str(rows)], "input 2: task 'movie' takes one text, not a sentence pair"),
        (["--task", "movie", "--text", "fine", "--threads", "0"], "--threads must be at least 1"),
    ):
        result = runner.invoke(app, ["predict", str(bundle), *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and match in lines[0], (args, result.output)
