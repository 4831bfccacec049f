"""metatt_deploy.export.shared_weights: an ONNX graph's initializers become pointers into safetensors files
when (and only when) dtype, shape and bytes match, and ONNX Runtime then computes exactly what it did before."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.shared_weights import point_into_safetensors, safetensors_index


def _graph(path, weights: dict[str, np.ndarray]) -> None:
    """y = ((x @ w1) @ w2 + b) @ w3: three initializers read by three nodes."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b"], ["h3"]),
        helper.make_node("MatMul", ["h3", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_matching_initializers_read_the_safetensors_bytes_and_the_graph_computes_the_same(tmp_path) -> None:
    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    b = rng.standard_normal(8).astype(np.float32)
    (tmp_path / "base").mkdir()
    # w1 in one shard, w2 in another; the stored w3 is transposed (a different layout), b is stored as float64
    save_file({"layer.w1": w1, "pad": rng.standard_normal(5).astype(np.float32)}, str(tmp_path / "base" / "a.safetensors"))
    save_file(
        {"layer.w2": w2, "layer.w3": np.ascontiguousarray(w3.T), "bias": b.astype(np.float64)}, str(tmp_path / "base" / "b.safetensors")
    )
    graph = tmp_path / "model.onnx"
    _graph(graph, {"w1": w1, "w2": w2, "b": b, "w3": w3})
    x = rng.standard_normal((3, 8)).astype(np.float32)
    before = _run(graph, x)
    shards = sorted((tmp_path / "base").glob("*.safetensors"))
    result = point_into_safetensors(graph, shards)
    assert result == {"files": ["base/a.safetensors", "base/b.safetensors"], "shared_bytes": 2 * 8 * 8 * 4, "inline_bytes": (64 + 8) * 4}
    model = onnx.load(str(graph), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer}
    assert where["w1"]["location"] == "base/a.safetensors" and where["w2"]["location"] == "base/b.safetensors"
    assert where["w3"] == {} and where["b"] == {}  # transposed and float64 copies are not the same tensor
    # the entry points at the raw bytes: read them independently of onnx
    raw = (tmp_path / "base" / "a.safetensors").read_bytes()
    offset, length = int(where["w1"]["offset"]), int(where["w1"]["length"])
    np.testing.assert_array_equal(np.frombuffer(raw[offset : offset + length], dtype="<f4").reshape(8, 8), w1)
    np.testing.assert_array_equal(_run(graph, x), before)
    assert all(
        np.array_equal(numpy_helper.to_array(t, str(tmp_path)), v) for t, v in zip(onnx.load(str(graph)).graph.initializer, (w1, w2, b, w3))
    )


def test_a_file_that_is_no_safetensors_is_one_line(tmp_path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"\x05")
    with pytest.raises(MetaTTError, match="not a safetensors file"):
        safetensors_index(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(MetaTTError, match="not a safetensors file"):
        safetensors_index(tmp_path / "y.safetensors")
