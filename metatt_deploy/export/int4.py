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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.export.quantize import root_log_level

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4
INT4_BITS = 4
ACTIVATIONS = {0: "float32", 1: "float32", 2: "float16", 3: "bfloat16", 4: "int8 per block, quantized at run time"}
TRANSPOSED_SUFFIX = "_untied_transposed"


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


def tied_gathers(graph: Any, untied: dict[str, tuple[str, str]], block_size: int) -> dict[str, str]:
    """{Gather node name: LM-head MatMul name} for embedding lookups that can share the head's int4 weight."""
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


def share_tied_embedding(graph: Any, gathers: dict[str, str], block_size: int) -> int:
    """Point each Gather of ``gathers`` at its head's MatMulNBits weight and scales; returns how many."""
    import numpy as np
    from onnx import helper, numpy_helper

    heads = {n.name: n for n in graph.node if n.op_type == "MatMulNBits"}
    replaced = 0
    for node in list(graph.node):
        if node.name not in gathers:
            continue
        head = heads.get(gathers[node.name] + f"_Q{INT4_BITS}")
        if head is None or len(head.input) > 3 and head.input[3]:  # no head, or asymmetric (zero points)
            continue
        attrs = {a.name: a.i for a in head.attribute}
        n_rows, k = attrs["N"], attrs["K"]
        weight, scales = head.input[1], head.input[2]
        shapes = {
            f"{node.name}_data_shape": np.array([n_rows, k * INT4_BITS // 8], dtype=np.int64),
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
                name=f"{node.name}_Q{INT4_BITS}_shared",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=block_size,
                bits=INT4_BITS,
            ),
        ]
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, n in enumerate(new):
            graph.node.insert(position + offset, n)
        replaced += 1
    return replaced


def quantize_int4(
    source: Path,
    target: Path,
    *,
    block_size: int = INT4_BLOCK_SIZE,
    accuracy_level: int = INT4_ACCURACY_LEVEL,
    external: bool = False,
) -> dict:
    """Weight-only 4-bit of ``source`` into ``target`` (every projection and the LM head); returns the settings."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if accuracy_level not in ACTIVATIONS:
        raise MetaTTError(f"int4 accuracy level {accuracy_level} is not one of {', '.join(map(str, ACTIVATIONS))}")
    model = onnx.load(str(source))
    untied = untie_transposed_weights(model.graph)
    shared = tied_gathers(model.graph, untied, block_size)
    with root_log_level(logging.ERROR):
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=INT4_BITS,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=accuracy_level or None,
            nodes_to_exclude=list(shared),
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer.process()
    n_shared = share_tied_embedding(quantizer.model.graph(), shared, block_size)
    quantizer.model.clean_initializers()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    return {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "op_types": ["MatMul", "Gather"],
        "bits": INT4_BITS,
        "block_size": block_size,
        "symmetric": True,
        "accuracy_level": accuracy_level,
        "activations": ACTIVATIONS[accuracy_level],
        "tied_lm_head": {"untied": sorted(untied), "embedding_shares_head_weight": n_shared},
    }
