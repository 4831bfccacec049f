"""metatt_deploy.export.int4: the tied LM head becomes MatMulNBits and the embedding lookup reads its int4 weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.int4 import INT4_BLOCK_SIZE, quantize_int4

VOCAB = 40


def tied_graph(path: Path, hidden: int) -> np.ndarray:
    """Gather(embedding) and an LM head MatMul(h, Transpose(embedding)), as optimum exports tied weights."""
    weight = np.random.default_rng(0).normal(size=(VOCAB, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], name="/embed_tokens/Gather"),
            helper.make_node("Transpose", ["emb"], ["emb_t"], name="Transpose_1", perm=[1, 0]),
            helper.make_node("MatMul", ["h", "emb_t"], ["logits"], name="/lm_head/MatMul"),
        ],
        "tied",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, hidden]),
        ],
        [
            helper.make_tensor_value_info("e", TensorProto.FLOAT, [None, hidden]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, VOCAB]),
        ],
        [numpy_helper.from_array(weight, "emb")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return weight


def run(path: Path, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(every embedding row, the head applied to the identity = its de-quantized weight transposed)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embedding, head = session.run(None, {"ids": np.arange(VOCAB), "h": np.eye(hidden, dtype=np.float32)})
    return embedding, head.T


def float_tables(path: Path, hidden: int) -> list[tuple[int, ...]]:
    """Float32 initializers as large as the table (scales are a block's worth smaller)."""
    graph = onnx.load(str(path)).graph
    return [tuple(t.dims) for t in graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= VOCAB * hidden]


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_tied_head_is_int4_and_the_embedding_shares_its_weight(tmp_path: Path, accuracy_level: int) -> None:
    hidden = 2 * INT4_BLOCK_SIZE
    weight = tied_graph(tmp_path / "fp32.onnx", hidden)
    settings = quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", accuracy_level=accuracy_level)
    assert settings["tied_lm_head"] == {"untied": ["/lm_head/MatMul"], "embedding_shares_head_weight": 1}
    graph = onnx.load(str(tmp_path / "int4.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1 and "Transpose" not in ops and "MatMul" not in ops
    assert float_tables(tmp_path / "int4.onnx", hidden) == []  # no float32 copy of the table is left
    head = next(n for n in graph.node if n.op_type == "MatMulNBits")
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in head.attribute}.get("accuracy_level", 0) == accuracy_level
    # one int4 table: the lookup reads the head's packed weight and scales (through Reshapes)
    reshaped = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Reshape"}
    assert [reshaped[gather.input[0]], reshaped[gather.input[2]]] == [head.input[1], head.input[2]]
    embedding, head_weight = run(tmp_path / "int4.onnx", hidden)
    np.testing.assert_allclose(embedding, head_weight, atol=1e-6 if accuracy_level == 0 else 1e-3)
    # 4-bit symmetric blocks of 32, levels -8..7 of block max / 8: each weight within one step (clipped at +7)
    block_max = np.abs(weight.reshape(VOCAB, -1, INT4_BLOCK_SIZE)).max(axis=2, keepdims=True)
    error = np.abs(embedding - weight).reshape(VOCAB, -1, INT4_BLOCK_SIZE)
    assert (error <= block_max / 8 + 1e-5).all() and error.max() > 0


def test_a_hidden_size_off_the_block_gets_its_own_int4_table(tmp_path: Path) -> None:
    hidden = INT4_BLOCK_SIZE + 16  # the head's packed rows carry padding: no sharing
    weight = tied_graph(tmp_path / "fp32.onnx", hidden)
    settings = quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx")
    assert settings["tied_lm_head"]["embedding_shares_head_weight"] == 0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1 and "Reshape" not in ops
    assert float_tables(tmp_path / "int4.onnx", hidden) == []
    embedding, head_weight = run(tmp_path / "int4.onnx", hidden)
    assert np.abs(embedding - weight).max() < np.abs(weight).max() / 4 and np.abs(head_weight - weight).max() < np.abs(weight).max() / 4


def test_unknown_accuracy_level_is_refused(tmp_path: Path) -> None:
    tied_graph(tmp_path / "fp32.onnx", INT4_BLOCK_SIZE)
    with pytest.raises(MetaTTError, match="accuracy level 5"):
        quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", accuracy_level=5)
    assert not (tmp_path / "int4.onnx").exists()
