"""metatt_deploy.export.int4: the tied LM head becomes MatMulNBits (4 or 8 bits, or stays float32) and the embedding
lookup reads its weight; 8-bit edge layers; a duplicated tied table is stored once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.int4 import INT4_BLOCK_SIZE, Int4Options, quantize_int4, store_tied_table_once, tie_duplicate_head

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
    settings = quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", Int4Options(head_bits=4, accuracy_level=accuracy_level))
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
    settings = quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", Int4Options(head_bits=4))
    assert settings["tied_lm_head"]["embedding_shares_head_weight"] == 0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1 and "Reshape" not in ops
    assert float_tables(tmp_path / "int4.onnx", hidden) == []
    embedding, head_weight = run(tmp_path / "int4.onnx", hidden)
    assert np.abs(embedding - weight).max() < np.abs(weight).max() / 4 and np.abs(head_weight - weight).max() < np.abs(weight).max() / 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Int4Options(accuracy_level=5), "accuracy level 5"),
        (Int4Options(block_size=48), "block size 48"),
        (Int4Options(head_bits=16), "head bits 16"),
        (Int4Options(edge_layers=-1), "give 0 or more"),
    ],
)
def test_unknown_options_are_refused(tmp_path: Path, options: Int4Options, message: str) -> None:
    tied_graph(tmp_path / "fp32.onnx", INT4_BLOCK_SIZE)
    with pytest.raises(MetaTTError, match=message):
        quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", options)
    assert not (tmp_path / "int4.onnx").exists()


def test_an_8_bit_head_is_shared_with_the_embedding_within_one_8_bit_step(tmp_path: Path) -> None:
    hidden = 2 * INT4_BLOCK_SIZE
    weight = tied_graph(tmp_path / "fp32.onnx", hidden)
    settings = quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", Int4Options(head_bits=8))
    assert settings["matmuls_by_bits"] == {"8": 1} and settings["tied_lm_head"]["embedding_shares_head_weight"] == 1
    graph = onnx.load(str(tmp_path / "int4.onnx")).graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in gather.attribute}["bits"] == 8 and float_tables(tmp_path / "int4.onnx", hidden) == []
    embedding, head_weight = run(tmp_path / "int4.onnx", hidden)
    np.testing.assert_allclose(embedding, head_weight, atol=1e-3)
    # symmetric 8-bit blocks: levels of block max / 128, so every weight lies within one level (16x finer than 4 bits)
    block_max = np.abs(weight.reshape(VOCAB, -1, INT4_BLOCK_SIZE)).max(axis=2, keepdims=True)
    error = np.abs(embedding - weight).reshape(VOCAB, -1, INT4_BLOCK_SIZE)
    assert (error <= block_max / 128 + 1e-6).all() and error.max() > 0


def test_a_float32_head_keeps_one_exact_float32_table(tmp_path: Path) -> None:
    hidden = INT4_BLOCK_SIZE
    weight = tied_graph(tmp_path / "fp32.onnx", hidden)
    settings = quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", Int4Options(head_bits=32))
    assert settings["float32_head"] and settings["matmuls_by_bits"] == {} and settings["tied_lm_head"]["untied"] == []
    assert sorted(n.op_type for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node) == ["Gather", "MatMul", "Transpose"]
    assert float_tables(tmp_path / "int4.onnx", hidden) == [(VOCAB, hidden)]
    embedding, head_weight = run(tmp_path / "int4.onnx", hidden)
    np.testing.assert_array_equal(embedding, weight)
    np.testing.assert_allclose(head_weight, weight, atol=1e-6)


def layered_graph(path: Path, layers: int, width: int) -> None:
    """A chain of MatMuls named as optimum names a decoder's projections, one per layer."""
    rng = np.random.default_rng(1)
    nodes, inits = [], []
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"x{i + 1}"], name=f"/model/layers.{i}/mlp/up_proj/MatMul"))
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info(f"x{layers}", TensorProto.FLOAT, [None, width])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_edge_layers_are_8_bit_and_the_middle_4_bit(tmp_path: Path) -> None:
    layered_graph(tmp_path / "fp32.onnx", 5, INT4_BLOCK_SIZE)
    settings = quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", Int4Options(edge_layers=2))
    assert settings["matmuls_by_bits"] == {"4": 1, "8": 4}
    bits = {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node}
    assert [bits[f"/model/layers.{i}/mlp/up_proj/MatMul_Q{b}"] for i, b in enumerate([8, 8, 4, 8, 8])] == [8, 8, 4, 8, 8]
    with pytest.raises(MetaTTError, match="--int4-edge-layers is 6 but the model has 5 decoder layers"):  # a typo, refused
        quantize_int4(tmp_path / "fp32.onnx", tmp_path / "typo.onnx", Int4Options(edge_layers=6))
    assert not (tmp_path / "typo.onnx").exists()


def duplicated_head_graph(path: Path, hidden: int, same: bool = True) -> np.ndarray:
    """Gather(embedding) and a head MatMul on its own constant: the table transposed (as optimum writes Gemma-3's), or not."""
    weight = np.random.default_rng(2).normal(size=(VOCAB, hidden)).astype(np.float32)
    head = weight.T.copy() if same else weight.T + 1e-3
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], name="/model/embed_tokens/Gather"),
            helper.make_node("MatMul", ["h", "head"], ["logits"], name="/lm_head/MatMul"),
        ],
        "duplicated",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, hidden]),
        ],
        [
            helper.make_tensor_value_info("e", TensorProto.FLOAT, [None, hidden]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, VOCAB]),
        ],
        [numpy_helper.from_array(weight, "emb"), numpy_helper.from_array(head, "head")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return weight


def test_a_head_that_duplicates_the_table_reads_the_table_and_the_file_holds_one_copy(tmp_path: Path) -> None:
    hidden = INT4_BLOCK_SIZE
    weight = duplicated_head_graph(tmp_path / "bundle" / "model.onnx", hidden)
    before = (tmp_path / "bundle" / "model.onnx").stat().st_size
    assert store_tied_table_once(tmp_path / "bundle") == {"/lm_head/MatMul": "emb"}
    assert float_tables(tmp_path / "bundle" / "model.onnx", hidden) == [(VOCAB, hidden)]
    assert (tmp_path / "bundle" / "model.onnx").stat().st_size < 0.55 * before
    embedding, head_weight = run(tmp_path / "bundle" / "model.onnx", hidden)
    np.testing.assert_array_equal(embedding, weight)
    np.testing.assert_array_equal(head_weight, weight)  # the same numbers as the dropped copy: exact
    # and int4 then treats it as any tied head: one shared table
    assert quantize_int4(tmp_path / "bundle" / "model.onnx", tmp_path / "int4.onnx")["tied_lm_head"]["embedding_shares_head_weight"] == 1


def test_a_head_constant_that_differs_from_the_table_is_left_alone(tmp_path: Path) -> None:
    duplicated_head_graph(tmp_path / "fp32.onnx", INT4_BLOCK_SIZE, same=False)
    graph = onnx.load(str(tmp_path / "fp32.onnx")).graph
    assert tie_duplicate_head(graph) == {} and len(graph.initializer) == 2
