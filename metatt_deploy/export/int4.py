"""Weight-only 4-bit quantization of an exported decoder: every projection, the LM head included.

ONNX Runtime's ``MatMulNBitsQuantizer`` turns a MatMul whose second input is a constant into
``MatMulNBits`` (4-bit weights in blocks of ``INT4_BLOCK_SIZE`` input rows, one float scale per
block, symmetric: no zero points) and a Gather of a constant table into ``GatherBlockQuantized``.
Two things in an optimum export keep it from reaching the whole model:

- **A tied LM head** (Llama, Qwen2, GPT-2: the head is the token embedding) is exported as
  ``MatMul(hidden, Transpose(embedding))``. The quantizer only sees constant weights, so the head
  stayed float32 and the float32 embedding stayed in the file beside its int4 copy for the
  Gather: on SmolLM2-135M the int4 file was 37% of the float32 one, and the head (49,152 x 576,
  a fifth of the weights) was read in float32 at every decoded token. `untie_transposed_weights`
  folds each such Transpose into a constant first, so the head becomes MatMulNBits.
- **One table for both**: the int4 head's packed weight (N rows = vocabulary, blocks of 32 along
  the hidden size) is laid out exactly as GatherBlockQuantized reads a uint8 table quantized
  along its last axis, and both operators default to the zero point 2^(bits-1) for symmetric
  weights. `share_tied_embedding` therefore points the embedding lookup at the head's weight
  and scales (through Reshape nodes that ONNX Runtime folds at load) instead of storing a second
  copy. Where the hidden size is not a multiple of the block (the packed rows would carry
  padding), the embedding gets its own int4 copy instead.

``accuracy_level`` is MatMulNBits' compute type for the activations: 0 leaves them float32
(the weights are de-quantized to float32 block by block); 4 quantizes each activation row to
int8 per block at run time and uses integer dot products, which is what makes 4-bit weights
pay off on a CPU. ``INT4_ACCURACY_LEVEL`` is 4: measured on SmolLM2-135M (docs/decoders.md).
Block 32 is the finest block the operators offer: 4.5 bits per weight with the float32 scales.

**Mixed precision** (`Int4Options`): the LM head (and, through the shared table, the embedding)
at 4 or 8 bits, or left float32 (``head_bits`` 32: one float32 table read by the Gather and, through
a Transpose that ONNX Runtime folds at load, by the head); the projections of the first and last
``edge_layers`` decoder layers at 8 bits; block size and accuracy level. An 8-bit weight is
MatMulNBits / GatherBlockQuantized with ``bits=8`` (uint8, zero point 128, the same blocks). The
defaults are measured (docs/reports/int4.md): what broke Gemma-3 270M at 4 bits was not its tied
262,144-token table (an 8-bit or float32 head left it as broken) but its first and last layers:
with those at 8 bits it keeps its exact match; see ``INT4_HEAD_BITS`` and ``INT4_EDGE_LAYERS``.

A float32 export of a tied model can also carry the table twice: optimum writes Gemma-3's LM head
as its own constant, the embedding transposed (1.66 GB for 270M parameters). `tie_duplicate_head`
finds a MatMul constant that is exactly the transpose of a Gather table and reads the table through
a Transpose instead, so the file holds one copy (ONNX Runtime folds the Transpose at load).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.onnx_files import has_external_data, replace_model
from metatt_deploy.export.quantize import root_log_level
from metatt_deploy.inference.formats import ONNX_NAME

INT4_BLOCK_SIZE = 32
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits and GatherBlockQuantized take powers of two from 16
INT4_ACCURACY_LEVEL = 4
INT4_BITS = 4
EIGHT_BITS = 8
HEAD_BITS = (4, 8, 32)  # 32: the head and the embedding stay float32
# Measured (docs/reports/int4.md, 50 test prompts each): all-4-bit Gemma-3 270M lost 14 points of exact
# match and 82% of its greedy answers; an 8-bit or float32 head did not help (-48, -50), 8-bit first and
# last 2 layers did (-2 points, 96% identical, gate agreement 99%). On SmolLM2-135M the 8-bit head took
# the 4-bit model from -18 to -10 points and above the gate (89% -> 92% agreement) for 13.5 MiB.
INT4_HEAD_BITS = 8
INT4_EDGE_LAYERS = 2
LAYER_NUMBER = re.compile(r"/(?:layers|h)\.(\d+)/")  # optimum keeps the module path in node names
ACTIVATIONS = {0: "float32", 1: "float32", 2: "float16", 3: "bfloat16", 4: "int8 per block, quantized at run time"}
TRANSPOSED_SUFFIX = "_untied_transposed"


@dataclass(frozen=True)
class Int4Options:
    """How ``--quantize int4`` quantizes: block size, accuracy level, LM head bits, 8-bit edge layers."""

    block_size: int = INT4_BLOCK_SIZE
    accuracy_level: int = INT4_ACCURACY_LEVEL
    head_bits: int = INT4_HEAD_BITS
    edge_layers: int = INT4_EDGE_LAYERS

    def check(self) -> None:
        """One-line errors for values the operators do not take."""
        if self.accuracy_level not in ACTIVATIONS:
            raise MetaTTError(f"int4 accuracy level {self.accuracy_level} is not one of {', '.join(map(str, ACTIVATIONS))}")
        if self.block_size not in BLOCK_SIZES:
            raise MetaTTError(f"int4 block size {self.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.head_bits not in HEAD_BITS:
            raise MetaTTError(f"int4 head bits {self.head_bits} is not one of {', '.join(map(str, HEAD_BITS))} (32: float32)")
        if self.edge_layers < 0:
            raise MetaTTError(f"--int4-edge-layers is {self.edge_layers}; give 0 or more")

    def label(self) -> str:
        """A short name for reports: ``head8-edge0-b32-acc4``."""
        return f"head{self.head_bits}-edge{self.edge_layers}-b{self.block_size}-acc{self.accuracy_level}"


def untie_transposed_weights(graph: Any) -> dict[str, tuple[str, str]]:
    """Replace ``MatMul(x, Transpose(W))`` with ``W`` an initializer by a MatMul on a transposed copy of W.

    Returns {MatMul node name: (W's name, the copy's name)}. The Transpose node goes when nothing
    else reads it; W stays (a Gather may still read it).
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    transposes = {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 and _perm(n) in (None, [1, 0])
    }
    untied: dict[str, tuple[str, str]] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in transposes:
            continue
        source = transposes[node.input[1]].input[0]
        copy_name = source + TRANSPOSED_SUFFIX
        if copy_name not in inits:
            inits[copy_name] = numpy_helper.from_array(numpy_helper.to_array(inits[source]).T.copy(), copy_name)
            graph.initializer.append(inits[copy_name])
        node.input[1] = copy_name
        untied[node.name] = (source, copy_name)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.output[0] in transposes and n.output[0] not in read]
    for n in dead:
        graph.node.remove(n)
    return untied


def _perm(node: Any) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def tie_duplicate_head(graph: Any) -> dict[str, str]:
    """Make a MatMul whose constant weight is exactly a Gather table's transpose read that table through a Transpose.

    Returns {MatMul node name: table name}; the duplicate constant is dropped, so a tied model's
    file holds one copy of its table (Gemma-3 270M: 1.66 GB -> 1.0 GB).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    tables = {n.input[0]: inits[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits}
    by_shape = {tuple(t.dims): name for name, t in tables.items() if len(t.dims) == 2}
    tied: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1] in tables:
            continue
        weight = inits[node.input[1]]
        table = by_shape.get(tuple(reversed(weight.dims)))
        if table is None or not np.array_equal(numpy_helper.to_array(weight), numpy_helper.to_array(tables[table]).T):
            continue
        transposed = f"{table}_transposed_for_{node.name}".replace("/", "_")
        graph.node.insert(list(graph.node).index(node), helper.make_node("Transpose", [table], [transposed], name=transposed, perm=[1, 0]))
        duplicate = node.input[1]
        node.input[1] = transposed
        if not any(duplicate in n.input for n in graph.node):
            graph.initializer.remove(inits.pop(duplicate))
        tied[node.name] = table
    return tied


def store_tied_table_once(folder: Path) -> dict[str, str]:
    """`tie_duplicate_head` on the bundle's graph, rewritten only when it finds a duplicate; returns what it tied."""
    import onnx

    model = onnx.load(str(folder / ONNX_NAME))
    tied = tie_duplicate_head(model.graph)
    if tied:
        external = has_external_data(folder)
        replace_model(folder, lambda path: onnx.save(model, str(path), save_as_external_data=external, location=path.name + "_data"))
    return tied


def tied_gathers(graph: Any, untied: dict[str, tuple[str, str]], block_size: int) -> dict[str, str]:
    """{Gather node name: LM-head MatMul name} for embedding lookups that can share the head's quantized weight."""
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    head_of = {source: head for head, (source, _) in untied.items()}
    return {
        n.name: head_of[n.input[0]]
        for n in graph.node
        if n.op_type == "Gather"
        and n.input[0] in head_of
        and inits[n.input[0]][1] % block_size == 0
        and not any(a.name == "axis" and a.i != 0 for a in n.attribute)
    }


def share_tied_embedding(graph: Any, gathers: dict[str, str], block_size: int, bits: int = INT4_BITS) -> int:
    """Point each Gather of ``gathers`` at its head's MatMulNBits weight and scales (``bits`` wide); returns how many."""
    import numpy as np
    from onnx import helper, numpy_helper

    heads = {n.name: n for n in graph.node if n.op_type == "MatMulNBits"}
    replaced = 0
    for node in list(graph.node):
        if node.name not in gathers:
            continue
        head = heads.get(gathers[node.name] + f"_Q{bits}")
        if head is None or len(head.input) > 3 and head.input[3]:  # no head, or asymmetric (zero points)
            continue
        attrs = {a.name: a.i for a in head.attribute}
        n_rows, k = attrs["N"], attrs["K"]
        weight, scales = head.input[1], head.input[2]
        shapes = {
            f"{node.name}_data_shape": np.array([n_rows, k * bits // 8], dtype=np.int64),
            f"{node.name}_scales_shape": np.array([n_rows, k // block_size], dtype=np.int64),
        }
        for name, value in shapes.items():
            graph.initializer.append(numpy_helper.from_array(value, name))
        data, scale = f"{node.name}_shared_data", f"{node.name}_shared_scales"
        new = [
            helper.make_node("Reshape", [weight, f"{node.name}_data_shape"], [data], name=f"{node.name}_shared_data_reshape"),
            helper.make_node("Reshape", [scales, f"{node.name}_scales_shape"], [scale], name=f"{node.name}_shared_scales_reshape"),
            helper.make_node(
                "GatherBlockQuantized",
                [data, node.input[1], scale],
                [node.output[0]],
                name=f"{node.name}_Q{bits}_shared",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=block_size,
                bits=bits,
            ),
        ]
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, n in enumerate(new):
            graph.node.insert(position + offset, n)
        replaced += 1
    return replaced


def head_matmuls(graph: Any) -> list[str]:
    """The LM head's MatMul nodes: those reading a transposed table, or named after lm_head."""
    transposed = {n.output[0] for n in graph.node if n.op_type == "Transpose"}
    return [n.name for n in graph.node if n.op_type == "MatMul" and ("lm_head" in n.name or n.input[1] in transposed)]


def edge_matmuls(graph: Any, edge_layers: int) -> list[str]:
    """MatMul nodes with a constant weight in the first and last ``edge_layers`` decoder layers."""
    if edge_layers < 1:
        return []
    inits = {t.name for t in graph.initializer}
    layer_of = {
        n.name: int(m.group(1)) for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits and (m := LAYER_NUMBER.search(n.name))
    }
    if not layer_of:
        return []
    last = max(layer_of.values())
    if edge_layers > last + 1:  # a typo, not a choice: every layer is already 8-bit at (last + 1) // 2
        raise MetaTTError(f"--int4-edge-layers is {edge_layers} but the model has {last + 1} decoder layers; give at most {last + 1}")
    return [name for name, layer in layer_of.items() if layer < edge_layers or layer > last - edge_layers]


def _weight_only(model: Any, bits: int, options: Int4Options, op_types: tuple[str, ...], exclude: list[str]) -> Any:
    """One pass of ONNX Runtime's MatMulNBitsQuantizer (symmetric blocks); returns the rewritten ModelProto."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with root_log_level(logging.ERROR):
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=options.block_size,
            is_symmetric=True,
            accuracy_level=options.accuracy_level or None,
            nodes_to_exclude=exclude,
            op_types_to_quantize=op_types,
            quant_axes=tuple((op, 0 if op == "MatMul" else 1) for op in op_types),
        )
        quantizer.process()
    return quantizer.model.model


def quantize_int4(source: Path, target: Path, options: Int4Options | None = None, *, external: bool = False) -> dict:
    """Weight-only quantization of ``source`` into ``target`` as ``options`` say; returns the settings for the manifest.

    Two passes of the quantizer: 8 bits for the head (``head_bits`` 8) and the edge layers, then
    4 bits for every other constant MatMul and Gather; the embedding then shares the head's table.
    """
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    options = options or Int4Options()
    options.check()
    model = onnx.load(str(source))
    graph = model.graph
    heads = head_matmuls(graph)
    float_head = options.head_bits == 32
    untied = {} if float_head else untie_transposed_weights(graph)
    shared = tied_gathers(graph, untied, options.block_size)
    # a float32 head keeps reading the table through its Transpose: the lookup keeps the same float32 table
    head_inputs = {i for n in graph.node if n.name in heads for i in n.input}
    tables = {n.input[0] for n in graph.node if n.op_type == "Transpose" and n.output[0] in head_inputs}
    float_gathers = [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in tables] if float_head else []
    eight = (heads if options.head_bits == EIGHT_BITS else []) + edge_matmuls(graph, options.edge_layers)
    if eight:
        others = [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in eight]
        model = _weight_only(model, EIGHT_BITS, options, ("MatMul",), others)
    model = _weight_only(model, INT4_BITS, options, ("MatMul", "Gather"), [*shared, *float_gathers, *(heads if float_head else [])])
    n_shared = share_tied_embedding(model.graph, shared, options.block_size, bits=min(options.head_bits, EIGHT_BITS))
    wrapped = ONNXModel(model)
    wrapped.clean_initializers()
    wrapped.save_model_to_file(str(target), use_external_data_format=external)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"]
    return {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "op_types": ["MatMul", "Gather"],
        "bits": INT4_BITS,
        "block_size": options.block_size,
        "symmetric": True,
        "accuracy_level": options.accuracy_level,
        "activations": ACTIVATIONS[options.accuracy_level],
        "head_bits": options.head_bits,
        "edge_layers": options.edge_layers,
        "matmuls_by_bits": {str(b): bits.count(b) for b in sorted(set(bits))},
        "float32_head": options.head_bits == 32,
        "tied_lm_head": {"untied": sorted(untied), "embedding_shares_head_weight": n_shared},
    }
