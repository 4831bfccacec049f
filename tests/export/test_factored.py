"""Factored bundle and factored ONNX export of a tiny 3-task adapter.

Checks: each shared core and each base weight is ONE initializer of the graphs; for every task the
factored ONNX graph (both forms) == the merged model of that task == the PyTorch adapter model
(max |logit diff| <= 1e-4, fp32); a row of a mixed batch == that row alone; tasks added later
reach a deployed bundle without touching its graphs; and every mismatch is a clear error.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from multitask_fixtures import LABELS, build_tiny_multitask

from metatt_deploy.adapters import model as mt
from metatt_deploy.adapters.base_model import load_classifier
from metatt_deploy.adapters.heads import PAD_LOGIT, routers
from metatt_deploy.adapters.multitask import extend_tasks, save_multitask
from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.factored import folder_bytes, load_bundle, write_bundle
from metatt_deploy.export.merge import merge_adapter
from metatt_deploy.inference.formats import ADAPTER_GRAPH, BUNDLE_JSON, SHARED_FILE, TASK_GRAPH, TASKS_DIR, read_bundle, task_records

TOL = 1e-4
SENTENCES = ["A wonderful film.", "Dull and slow, badly acted.", "ok", "The best thing I have seen this year, truly."]
PAIRS = [("A man sleeps.", "A man is awake."), ("Two dogs run.", "Animals move.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("factored")
    base, adapter, mtm, tokenizer = build_tiny_multitask(root)
    bundle = root / "bundle"
    summary = write_bundle(adapter, bundle)
    assert summary["tasks"] == list(LABELS) and not summary["added"]
    return root, adapter, mtm, tokenizer, bundle


def session(path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(encoding) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.int64) for k, v in encoding.items()}


def encode(tokenizer, texts):
    if isinstance(texts[0], tuple):
        return tokenizer([a for a, _ in texts], [b for _, b in texts], padding=True, return_tensors="pt")
    return tokenizer(texts, padding=True, return_tensors="pt")


def test_bundle_layout_and_each_weight_once(tiny) -> None:
    root, adapter, mtm, _, bundle = tiny
    info = read_bundle(bundle)
    assert info["tasks"] == list(LABELS) and info["pad_logit"] == PAD_LOGIT
    files = sorted(p.name for p in (bundle / TASKS_DIR).iterdir())
    assert files == sorted(f"{t}{ext}" for t in LABELS for ext in (".json", ".safetensors", ".onnx_adapter"))
    # a task file is kilobytes: its r x r slice plus its head; the .onnx_adapter holds the same tensors
    assert all((bundle / TASKS_DIR / f"{t}.safetensors").stat().st_size < 4096 for t in LABELS)
    for t in LABELS:
        from safetensors.numpy import load_file

        stored = load_file(str(bundle / TASKS_DIR / f"{t}.safetensors"))
        adapter_file = ort.AdapterFormat.read_adapter(str(bundle / TASKS_DIR / f"{t}.onnx_adapter"))
        params = adapter_file.get_parameters()  # views into the file: keep them referenced while reading
        assert set(params) == set(stored) and all(np.array_equal(params[k].numpy(), stored[k]) for k in stored)
    base_params = {n: p for n, p in load_classifier(str(root / "base"), ["a", "b"]).named_parameters() if not n.startswith("classifier.")}
    n_cores = len(mtm.adapter_config.mode_names)
    for graph_file, cores_in_graph in ((TASK_GRAPH, n_cores), (ADAPTER_GRAPH, n_cores - 1)):
        graph = onnx.load(str(bundle / graph_file))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
        core_names = [n for n in inits if ".metatt.cores." in n]
        assert len(core_names) == cores_in_graph, core_names  # every core ONE initializer ...
        for name in core_names:  # ... read by the graph's nodes (every adapted layer slices the same one)
            assert any(name in node.input for node in graph.graph.node), name
        # the base weights: each once, no per-layer merged copy anywhere
        big = [v for v in inits.values() if v.size >= 32 * 32]
        assert sum(v.size for v in big) == sum(p.numel() for p in base_params.values() if p.numel() >= 32 * 32)
        total = sum(v.size for v in inits.values())
        adapter_size = sum(c.numel() for c in mtm.metatt.cores)
        heads = sum(p.numel() for r in routers(mtm.model) for p in r.parameters())
        assert total <= sum(p.numel() for p in base_params.values()) + adapter_size + heads
    # model_adapter.onnx reads the base from base/model.safetensors (model_tasks.onnx keeps a copy for the web app)
    weights = (bundle / "base" / "model.safetensors").stat().st_size
    assert info["onnx"]["adapter_graph"]["external_data"]["shared_bytes"] > 0.9 * weights
    assert (bundle / ADAPTER_GRAPH).stat().st_size < 0.2 * (bundle / TASK_GRAPH).stat().st_size
    assert "external_data" not in info["onnx"]["task_graph"]


def _references(mtm, tokenizer, texts, t):
    enc = encode(tokenizer, texts)
    n = len(LABELS[mtm.tasks[t]])
    with torch.no_grad():
        adapter = mtm(**enc, task_ids=t).logits[:, :n].numpy()
        merged = mt.merge_and_unload(copy.deepcopy(mtm.model), mtm.tasks[t])(**enc).logits.numpy()
    return enc, adapter, merged


@pytest.mark.parametrize("t", range(3))
def test_every_task_factored_onnx_equals_merged_equals_adapter(tiny, t) -> None:
    root, adapter, mtm, tokenizer, bundle = tiny
    texts = PAIRS if mtm.tasks[t] == "nli" else SENTENCES
    enc, ref, merged = _references(mtm, tokenizer, texts, t)
    n = ref.shape[1]
    assert np.abs(merged - ref).max() <= TOL
    # form (a): task ids as an input
    tasks = session(bundle / TASK_GRAPH)
    out = tasks.run(["logits"], {**feeds(enc), "task_ids": np.full(len(texts), t, dtype=np.int64)})[0]
    assert np.abs(out[:, :n] - ref).max() <= TOL and np.abs(out[:, :n] - merged).max() <= TOL
    assert np.all(out[:, n:] == PAD_LOGIT)
    # form (b): the task slice and head fed from the task's .onnx_adapter
    graph = session(bundle / ADAPTER_GRAPH)
    lora = ort.LoraAdapter()
    lora.Load(str(bundle / TASKS_DIR / f"{mtm.tasks[t]}.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    out_b = graph.run(["logits"], feeds(enc), options)[0]
    assert out_b.shape == ref.shape and np.abs(out_b - ref).max() <= TOL


def test_mixed_batch_rows_equal_rows_alone(tiny) -> None:
    _, _, mtm, tokenizer, bundle = tiny
    tasks = session(bundle / TASK_GRAPH)
    enc = encode(tokenizer, SENTENCES)
    ids = np.array([2, 0, 1, 2], dtype=np.int64)
    mixed = tasks.run(["logits"], {**feeds(enc), "task_ids": ids})[0]
    for i, t in enumerate(ids):
        alone = tasks.run(["logits"], {**feeds(encode(tokenizer, [SENTENCES[i]])), "task_ids": np.array([t])})[0]
        assert np.abs(mixed[i] - alone[0]).max() <= 1e-5
    with torch.no_grad():
        ref = mtm(**enc, task_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(mixed - ref).max() <= TOL


def test_onnx_rejects_bad_task_ids_and_missing_adapters(tiny) -> None:
    _, _, _, tokenizer, bundle = tiny
    tasks = session(bundle / TASK_GRAPH)
    enc = feeds(encode(tokenizer, SENTENCES[:2]))
    for bad in ([0, 3], [-1, 0], [0, -4]):  # out of range, and negative (Gather would wrap it around)
        with pytest.raises(Exception, match="out of data bounds|indices"):
            tasks.run(["logits"], {**enc, "task_ids": np.array(bad, dtype=np.int64)})
    with pytest.raises(Exception, match="dimension mismatch|MatMul"):
        session(bundle / ADAPTER_GRAPH).run(["logits"], enc)  # no active adapter: fails, no default task


def test_merged_onnx_of_a_task_matches_the_factored_graph(tiny, tmp_path) -> None:
    root, adapter, mtm, tokenizer, bundle = tiny
    from metatt_deploy.export.onnx import export_onnx

    merge_adapter(adapter, tmp_path / "merged-four", task="four")
    exported = export_onnx(tmp_path / "merged-four", tmp_path / "onnx-four")
    enc = feeds(encode(tokenizer, SENTENCES))
    merged = session(exported / "model.onnx").run(["logits"], enc)[0]
    factored = session(bundle / TASK_GRAPH).run(["logits"], {**enc, "task_ids": np.full(4, 2, dtype=np.int64)})[0]
    assert np.abs(merged - factored).max() <= TOL


def test_bundle_loads_back_into_pytorch(tiny) -> None:
    _, _, mtm, tokenizer, bundle = tiny
    back = load_bundle(bundle)
    enc = encode(tokenizer, SENTENCES)
    with torch.no_grad():
        assert torch.equal(back(**enc, task_ids=[0, 1, 2, 0]).logits, mtm(**enc, task_ids=[0, 1, 2, 0]).logits)


def test_a_task_trained_later_joins_the_deployed_bundle(tiny, tmp_path) -> None:
    root, adapter, mtm, tokenizer, bundle = tiny
    deployed = tmp_path / "deployed"
    shutil.copytree(bundle, deployed)
    graphs = {f: (deployed / f).read_bytes() for f in (TASK_GRAPH, ADAPTER_GRAPH)}
    grown = copy.deepcopy(mtm)
    extend_tasks(grown, "late", ["no", "yes", "maybe"], seed=3)
    with torch.no_grad():  # stand-in for train --add-task: move the new slice and head only
        grown.metatt.cores[3][:, 3] += 0.3
        for r in routers(grown.model):
            for p in r.heads[3].parameters():
                p.add_(0.2)
    grown_dir = save_multitask(grown, tmp_path / "grown", tokenizer)
    summary = write_bundle(grown_dir, deployed, tasks=["late"])
    expected = {"bundle": str(deployed), "bundle_id": read_bundle(deployed)["bundle_id"], "tasks": ["late"], "added": True}
    assert summary == {**expected, "bytes": folder_bytes(deployed)}
    assert all((deployed / f).read_bytes() == b for f, b in graphs.items())  # nothing re-exported
    assert [r["task"] for r in task_records(deployed)] == [*LABELS, "late"]
    enc = encode(tokenizer, SENTENCES)
    lora = ort.LoraAdapter()
    lora.Load(str(deployed / TASKS_DIR / "late.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    out = session(deployed / ADAPTER_GRAPH).run(["logits"], feeds(enc), options)[0]
    with torch.no_grad():
        ref = grown(**enc, task_ids="late").logits[:, :3].numpy()
    assert np.abs(out - ref).max() <= TOL
    with pytest.raises(MetaTTError, match="already has task"):
        write_bundle(grown_dir, deployed, tasks=["late"])
    assert write_bundle(grown_dir, deployed, tasks=["late"], force=True)["tasks"] == ["late"]  # added later: replaceable
    baked = "movie"  # its slice is also inside model_tasks.onnx: replacing the file alone would leave the graph stale
    with pytest.raises(MetaTTError, match=f"{baked} are baked into {TASK_GRAPH}.*new bundle"):
        write_bundle(grown_dir, deployed, tasks=[baked], force=True)
    assert all((deployed / f).read_bytes() == b for f, b in graphs.items())
    # an adapter whose shared cores differ (retrained) cannot add tasks to this bundle
    _, other, _, _ = build_tiny_multitask(root, core_seed=7)
    with pytest.raises(MetaTTError, match="other shared cores"):
        write_bundle(other, deployed, tasks=["nli"], force=True)


def test_foreign_or_inconsistent_task_files_are_refused(tiny, tmp_path) -> None:
    root, adapter, mtm, tokenizer, bundle = tiny
    other = tmp_path / "other"
    _, other_adapter, _, _ = build_tiny_multitask(root, core_seed=9)
    write_bundle(other_adapter, other, onnx=False)
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    for ext in (".json", ".safetensors"):
        shutil.copy(other / TASKS_DIR / f"movie{ext}", broken / TASKS_DIR / f"stray{ext}")
    record = json.loads((broken / TASKS_DIR / "stray.json").read_text())
    record["task"] = "stray"
    (broken / TASKS_DIR / "stray.json").write_text(json.dumps(record))
    with pytest.raises(MetaTTError, match="belongs to bundle"):
        task_records(broken)
    (broken / TASKS_DIR / "stray.json").unlink()
    record = json.loads((broken / TASKS_DIR / "nli.json").read_text())
    record["labels"] = ["a", "b"]
    record["num_labels"] = 2
    (broken / TASKS_DIR / "nli.json").write_text(json.dumps(record))
    with pytest.raises(MetaTTError, match="labels but its head has"):
        task_records(broken)
    with pytest.raises(MetaTTError, match="not a factored bundle"):
        read_bundle(tmp_path)
    with pytest.raises(MetaTTError, match="single-task|several --task"):
        from onnx_fixtures import build_tiny

        write_bundle(build_tiny(tmp_path / "single").adapter, tmp_path / "b2")


def test_cli_merge_factored(tiny, tmp_path) -> None:
    from typer.testing import CliRunner

    from metatt_deploy.cli import app

    _, adapter, _, _, _ = tiny
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(adapter), "--factored", "--no-onnx", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "wrote factored bundle with task(s) movie, nli, four" in res.output
    assert not (tmp_path / "b" / TASK_GRAPH).exists() and (tmp_path / "b" / "shared.safetensors").is_file()
    res = runner.invoke(app, ["merge", str(adapter), "--factored", "--to", "peft", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--factored" in res.output
    res = runner.invoke(app, ["merge", str(adapter), "--task", "nope", "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output
    res = runner.invoke(app, ["merge", str(adapter), "--task", "nli", "-o", str(tmp_path / "nli")])
    assert res.exit_code == 0 and (tmp_path / "nli" / "config.json").is_file()


def test_a_same_shape_task_file_from_another_bundle_is_refused_by_its_hash(tiny, tmp_path) -> None:
    """Issue 10: tasks/NAME.json records sha256 of the task files; it is now checked on every read."""
    root, adapter, mtm, tokenizer, bundle = tiny
    other = tmp_path / "other"
    _, other_adapter, _, _ = build_tiny_multitask(root, core_seed=13)
    write_bundle(other_adapter, other, onnx=False)
    swapped = Path(shutil.copytree(bundle, tmp_path / "swapped"))
    shutil.copy(other / TASKS_DIR / "nli.safetensors", swapped / TASKS_DIR / "nli.safetensors")  # same shapes, other values
    with pytest.raises(MetaTTError, match="nli.safetensors is not the one its record nli.json names"):
        load_bundle(swapped)
    shutil.copy(other / SHARED_FILE, swapped / SHARED_FILE)
    shutil.copy(bundle / TASKS_DIR / "nli.safetensors", swapped / TASKS_DIR / "nli.safetensors")
    with pytest.raises(MetaTTError, match="shared.safetensors belongs to another bundle"):
        load_bundle(swapped)
    for change, message in (
        (lambda r: r.update(task="movie"), "malformed or names another task"),
        (lambda r: r["files"]["safetensors"].update(file="../../bundle.json"), "malformed"),
        (lambda r: r.update(shapes="none"), "malformed"),
    ):
        broken = Path(shutil.copytree(bundle, tmp_path / f"broken{len(message)}{id(change)}"))
        record = json.loads((broken / TASKS_DIR / "nli.json").read_text())
        change(record)
        (broken / TASKS_DIR / "nli.json").write_text(json.dumps(record))
        with pytest.raises(MetaTTError, match=message):
            task_records(broken)
    info = json.loads((bundle / BUNDLE_JSON).read_text())
    for key, value in (("bundle_id", "zz"), ("base_dir", "../elsewhere"), ("tasks", "movie"), ("onnx", {"task_graph": 1})):
        broken = Path(shutil.copytree(bundle, tmp_path / f"info-{key}"))
        (broken / BUNDLE_JSON).write_text(json.dumps({**info, key: value}))
        with pytest.raises(MetaTTError, match=f"malformed '{key}'"):
            read_bundle(broken)
