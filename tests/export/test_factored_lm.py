"""metatt_deploy.export.factored_lm (+ factored.py for decoders, serving/generate.py's TaskSession):
a factored bundle of a multi-task causal LM, its two ONNX graphs with a KV cache, and greedy
generation per task identical to that task's merged export. Tiny random Llama only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tiny_decoders import save_tiny_multitask

from metatt_deploy.adapters.base_model import load_tokenizer
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.decoder_runs import greedy, load_ort_decoder
from metatt_deploy.export.factored import folder_bytes, load_bundle
from metatt_deploy.export.merge import merge_adapter, merge_factored
from metatt_deploy.export.onnx import export_onnx
from metatt_deploy.inference.decode import until_eos
from metatt_deploy.inference.formats import ADAPTER_GRAPH, TASK_GRAPH, TASK_IDS
from metatt_deploy.serving.generate import Generator
from metatt_deploy.serving.runtime import Runtime

TASKS = ["sent", "nli", "city"]
PROMPTS = ["Review: this was good today", "Premise: a man plays.", "What is the capital of France?", "fine lovely", "sad boring"]
NEW = 8


def _adapter(root: Path, seed: int) -> tuple[Path, Path]:
    return save_tiny_multitask(root, TASKS, seed)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("factored-lm")
    base, adapter = _adapter(root, 1)
    merge_factored(adapter, root / "bundle")
    return root, base, adapter, root / "bundle"


def test_decoder_bundle_holds_base_and_shared_cores_once_and_a_slice_per_task(bundle) -> None:
    _, _, _, out = bundle
    info = json.loads((out / "bundle.json").read_text())
    assert info["task_type"] == "causal-lm" and info["tasks"] == TASKS
    for t in TASKS:
        rec = json.loads((out / "tasks" / f"{t}.json").read_text())
        assert rec["shapes"] == {"task_slice": [4, 4]} and rec["labels"] == [] and (out / "tasks" / f"{t}.onnx_adapter").is_file()
    for graph_file, extra in ((ADAPTER_GRAPH, set()), (TASK_GRAPH, {"task_ids"})):
        graph = onnx.load(str(out / graph_file))
        inputs = {i.name for i in graph.graph.input}
        initializers = {i.name: i for i in graph.graph.initializer}
        assert {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.1.value"} | extra <= inputs
        assert {"logits", "present.0.key", "present.1.value"} <= {o.name for o in graph.graph.output}
        cores = sorted(n for n in initializers if n.startswith("metatt.cores."))
        assert cores == ["metatt.cores.0", "metatt.cores.1", "metatt.cores.2", "metatt.cores.4"]  # shared cores once, no task core
    adapter_graph = onnx.load(str(out / ADAPTER_GRAPH))
    default = next(i for i in adapter_graph.graph.initializer if i.name == "task_slice")
    assert list(default.dims) == [0, 4]  # an empty default: a run without an active adapter fails
    assert load_bundle(out).tasks == TASKS


def test_bundle_stores_the_base_once_and_reports_its_real_size(tmp_path) -> None:
    """Both graphs read the base from base/model.safetensors: the whole bundle (base + two graphs + tasks +
    tokenizer) is under 1.2x one merged export of the same model (it was 3.0x with a copy in each graph).
    A wider tiny Llama, so that weights outweigh the graphs' nodes as in a real model."""
    base, adapter = save_tiny_multitask(tmp_path, TASKS, 1, hidden=256)
    summary = merge_factored(adapter, tmp_path / "bundle")
    out = tmp_path / "bundle"
    merge_adapter(adapter, tmp_path / "merged", task="sent")
    merged = export_onnx(tmp_path / "merged", tmp_path / "onnx")
    merged_bytes = folder_bytes(Path(merged))
    weights = (out / "base" / "model.safetensors").stat().st_size
    assert weights > 0.8 * merged_bytes  # the check below is about weights, not the graphs' nodes
    assert summary["bytes"] == folder_bytes(out) < 1.2 * merged_bytes, (summary["bytes"], merged_bytes)
    info = json.loads((out / "bundle.json").read_text())
    assert info["bytes_without_bundle_json"] == summary["bytes"] - (out / "bundle.json").stat().st_size
    for key, graph_file in (("adapter_graph", ADAPTER_GRAPH), ("task_graph", TASK_GRAPH)):
        shared = info["onnx"][key]["external_data"]
        assert shared["files"] == ["base/model.safetensors"] and shared["shared_bytes"] > 0.95 * weights, shared
        # independent of the writer: every external initializer names that file, and the graph file is small
        graph = onnx.load(str(out / graph_file), load_external_data=False)
        external = [i for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        assert external and {e.value for i in external for e in i.external_data if e.key == "location"} == {"base/model.safetensors"}
        assert (out / graph_file).stat().st_size < 0.2 * weights
    # the factored graph, reading the shared file, gives the merged export's logits (the same task, greedy)
    tok = load_tokenizer(str(out / "base"))
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True)
    gen = Generator(out, form="tasks")
    gen.use("sent")
    assert gen.greedy(ids, NEW) == until_eos(
        greedy(load_ort_decoder(merged), ids, NEW, tok.eos_token_id, tok.pad_token_id), tok.eos_token_id
    )


def test_generation_per_task_is_token_identical_to_that_tasks_merged_export(bundle) -> None:
    root, _, adapter, out = bundle
    tok = load_tokenizer(str(out / "base"))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    factored = {form: Generator(out, form=form) for form in ("adapter", "tasks")}
    pytorch = load_bundle(out)
    for task in TASKS:
        merge_adapter(adapter, root / f"merged-{task}", task=task)
        merged = export_onnx(root / f"merged-{task}", root / f"onnx-{task}")
        reference = load_ort_decoder(merged)
        expected = [greedy(reference, ids, NEW, eos, pad) for ids in prompts]
        for form, gen in factored.items():
            gen.use(task)  # a switch: no reload
            assert [gen.greedy(ids, NEW) for ids in prompts] == [until_eos(e, eos) for e in expected], (task, form)
        x = torch.tensor([prompts[0]])
        assert (
            pytorch.generate(x, task_ids=task, max_new_tokens=NEW, do_sample=False)[0, x.shape[1] :].tolist()[: len(expected[0])]
            == expected[0]
        )
    # the tasks differ (else the check above proves nothing)
    gen = factored["adapter"]
    answers = []
    for task in TASKS:
        gen.use(task)
        answers.append(gen.greedy(prompts[0], NEW))
    assert len({tuple(a) for a in answers}) > 1


def test_tasks_graph_serves_a_batch_that_mixes_tasks(bundle) -> None:
    _, _, _, out = bundle
    gen = Generator(out, form="tasks")
    ids = np.array([[5, 6, 7, 8, 9]] * 3, dtype=np.int64)
    mask = np.ones_like(ids)
    alone = []
    for t in range(len(TASKS)):
        feeds = {TASK_IDS: np.array([t], dtype=np.int64)}
        alone.append(gen.graph.forward(ids[:1], mask[:1], gen.graph.empty_past(1), extra_feeds=feeds)[0])
    feeds = {TASK_IDS: np.arange(len(TASKS), dtype=np.int64)}  # one task per row, one call
    mixed = gen.graph.forward(ids, mask, gen.graph.empty_past(3), extra_feeds=feeds)[0]
    for row in range(3):
        np.testing.assert_allclose(mixed[row : row + 1], alone[row], atol=1e-5, rtol=0)
    assert not np.allclose(alone[0], alone[1], atol=1e-3)  # the tasks differ, so the routing is checked


def test_bad_tasks_and_files_are_one_line_errors(bundle) -> None:
    import onnxruntime as ort

    root, _, _, out = bundle
    gen = Generator(out)
    with pytest.raises(MetaTTError, match="choose one with --task"):
        gen.generate("hello", max_new_tokens=2)
    with pytest.raises(MetaTTError, match="unknown task"):
        gen.use("nope")
    with pytest.raises(MetaTTError, match="causal LM"):
        Runtime(out)
    # the raw adapter graph without an active adapter fails instead of answering for some task
    session = ort.InferenceSession(str(out / ADAPTER_GRAPH), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[5, 6]]), "attention_mask": np.ones((1, 2), np.int64), "position_ids": np.array([[0, 1]])}
    feeds.update({i.name: np.zeros((1, 1, 0, 8), np.float32) for i in session.get_inputs() if i.name.startswith("past_key_values")})
    with pytest.raises(Exception, match="MatMul|dimension|shape"):  # noqa: B017 (onnxruntime's own exception types)
        session.run(None, feeds)
    # another bundle's adapter file, and a record whose shapes were edited
    _, other_adapter = _adapter(root, 2)
    other = root / "other-bundle"
    merge_factored(other_adapter, other, onnx=True)
    copy = root / "copy"
    shutil.copytree(out, copy)
    shutil.copy(other / "tasks" / "sent.onnx_adapter", copy / "tasks" / "sent.onnx_adapter")
    with pytest.raises(MetaTTError, match="sha256 differs"):
        Generator(copy).use("sent")
    record = json.loads((copy / "tasks" / "sent.json").read_text())
    record["files"]["onnx_adapter"]["sha256"] = json.loads((other / "tasks" / "sent.json").read_text())["files"]["onnx_adapter"]["sha256"]
    (copy / "tasks" / "sent.json").write_text(json.dumps(record))
    with pytest.raises(MetaTTError, match="another bundle"):
        Generator(copy).use("sent")
    record = json.loads((copy / "tasks" / "nli.json").read_text())
    record["shapes"]["task_slice"] = [4, 3]
    (copy / "tasks" / "nli.json").write_text(json.dumps(record))
    with pytest.raises(MetaTTError, match="does not match its task record"):
        Generator(copy).use("nli")


def test_cli_generate_with_task_on_a_factored_bundle(bundle) -> None:
    from typer.testing import CliRunner

    from metatt_deploy.cli import app

    _, _, _, out = bundle
    runner = CliRunner()
    answers = {}
    for task in TASKS:
        res = runner.invoke(app, ["generate", str(out), "--task", task, "--max-new-tokens", "4", "What is the capital of France?"])
        assert res.exit_code == 0, res.output
        answers[task] = res.output
    res = runner.invoke(
        app, ["generate", str(out), "--task", "1", "--form", "tasks", "--max-new-tokens", "4", "What is the capital of France?"]
    )
    assert res.exit_code == 0 and res.output == answers["nli"]
    for args, message in (
        (["--task", "nope"], "unknown task"),
        ([], "choose one with --task"),
        (["--task", "sent", "--form", "x"], "unknown form"),
    ):
        res = runner.invoke(app, ["generate", str(out), *args, "hello"])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
