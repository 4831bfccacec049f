"""ONNX graphs that read their base weights straight out of a safetensors file, so a bundle stores them once.

A factored bundle holds the base model as ``base/model.safetensors`` (for PyTorch: ``load_bundle``,
merging, ``--add-task``) and one or two ONNX graphs that each used to embed a full copy of the same
weights: three copies, about 1.5 GB for SmolLM2-135M. safetensors stores every tensor's raw
little-endian bytes, contiguous and row-major, at offsets given by its JSON header, which is
exactly what an ONNX external-data entry ``{location, offset, length}`` describes. So an
initializer whose dtype, shape and bytes equal a stored tensor's becomes a pointer into that file.

The match is by content, not by name: the exporters rename parameters (``onnx::MatMul_123``) and a
tied embedding is one tensor under two names, but equal dtype, shape and bytes are the same tensor
whatever it is called. An initializer that matches nothing (the adapter's cores, an exporter's
transposed or folded copy, a dtype cast) stays inside the graph, and the result counts both, so a
regression shows up as ``inline_bytes`` instead of as a silently doubled bundle.

ONNX Runtime and ``onnx.load`` resolve ``location`` relative to the graph's folder, so the graph
must be loaded by path (every loader in this package does) and the safetensors file must sit
below the graph's folder.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from metatt_deploy.common.errors import MetaTTError

# safetensors dtype names of the ONNX TensorProto element types a base model's weights come in
_SAFETENSORS_DTYPES = {1: "F32", 10: "F16", 16: "BF16", 11: "F64", 7: "I64", 6: "I32", 3: "I8", 2: "U8", 9: "BOOL"}


def safetensors_index(path: Path) -> dict[tuple[str, tuple[int, ...], str], tuple[int, int]]:
    """(dtype, shape, sha256 of the bytes) -> (absolute byte offset in the file, length) of every tensor in ``path``."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise MetaTTError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise MetaTTError(f"{path} is not a safetensors file ({e})") from None
        start = 8 + n
        index = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            digest = hashlib.sha256(f.read(end - begin)).hexdigest()
            index[(entry["dtype"], tuple(entry["shape"]), digest)] = (start + begin, end - begin)
    return index


def point_into_safetensors(graph_path: Path, weights: list[Path]) -> dict:
    """Rewrite the graph at ``graph_path`` so every initializer equal to a tensor of ``weights`` reads it from there.

    ``weights`` (one file, or the shards of a large model) must be inside the graph's folder. Returns
    ``{"files", "shared_bytes", "inline_bytes"}``: the external files' paths relative to the graph,
    and the initializer bytes now read from them and still stored in the graph.
    """
    import onnx
    from onnx import TensorProto

    index = {}
    for path in weights:
        location = path.relative_to(graph_path.parent).as_posix()
        index.update({key: (location, *where) for key, where in safetensors_index(path).items()})
    model = onnx.load(str(graph_path))
    shared = inline = 0
    for tensor in model.graph.initializer:
        data = tensor.raw_data
        if tensor.data_location == TensorProto.EXTERNAL or not data:
            inline += len(data)
            continue
        key = (_SAFETENSORS_DTYPES.get(tensor.data_type, ""), tuple(tensor.dims), hashlib.sha256(data).hexdigest())
        if key not in index:
            inline += len(data)
            continue
        location, offset, length = index[key]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
        shared += length
    onnx.save(model, str(graph_path))
    files = sorted({index_location for index_location, _, _ in index.values()})
    return {"files": files, "shared_bytes": shared, "inline_bytes": inline}
