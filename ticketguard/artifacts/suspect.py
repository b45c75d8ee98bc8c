"""A suspect model as the verifier receives it: a ticket folder or an untrusted weight file, loaded safely.

Thieves ship state_dicts (safetensors, torch files, Lightning-style checkpoints) or ONNX files. An ONNX file
is only read, never run: its initializers become the weights and its weighted nodes, in data-flow order, are
kept so that alignment can match layers by operation and shape, since an exporter's tensor names are arbitrary
and a tool that rewrites the file (onnxruntime's quantizer) may list the nodes in another topological order. A
quantized ONNX file is first read back as its float graph (``onnx_quantized``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ticketguard.artifacts.onnx_quantized import QUANTIZED_ONNX_SOURCE, dequantize_graph
from ticketguard.artifacts.shipped_forms import read_shipped_form
from ticketguard.artifacts.ticket import Ticket, is_ticket_folder
from ticketguard.core.errors import InputError
from ticketguard.core.files import load_tensors
from ticketguard.core.masks import Mask, fold_pruning_reparametrisation, mask_from_zeros
from ticketguard.data import Normalization
from ticketguard.models import identify_architecture

ONNX_SUFFIX = ".onnx"
MAX_ONNX_BYTES = 2 * 1024**3  # protobuf's own limit for one message, and the most external data read
ONNX_WEIGHT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.BFLOAT16: np.float32,  # numpy has no bfloat16: widened exactly
}
ONNX_ATTRIBUTE_TYPES = {onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT}
LAYER_OPS = {"Conv", "Gemm", "MatMul"}  # the layers a branch's depth counts at a join


@dataclass(frozen=True)
class GraphNode:
    """One ONNX node that reads weights: per input, the weight it reads (through Identity nodes) or None for
    an activation, and its numeric attributes (strides, pads, group, transB...)."""

    op_type: str
    weights: tuple[str | None, ...]
    attributes: dict[str, int | float | tuple[int, ...]]


@dataclass
class Suspect:
    """Weights (pruned ones zero), the mask they imply, and the architecture when it is a registered one.

    ``mask`` covers every weight matrix and conv kernel (dim > 1): for a suspect, nothing says which layers
    its owner pruned, so the verifier looks at all of them. ``graph`` holds an ONNX suspect's weighted nodes
    in data-flow order (a main path before its shortcut, however the file lists them); None for state_dicts,
    whose names already say where each tensor goes.
    ``normalization`` is known only for a ticket folder, which records it.
    """

    weights: dict[str, torch.Tensor]
    mask: Mask
    architecture: tuple[str, int, int] | None
    source: str
    graph: list[GraphNode] | None = None
    normalization: Normalization | None = None

    @classmethod
    def from_weights(
        cls,
        weights: dict[str, torch.Tensor],
        source: str,
        graph: list[GraphNode] | None = None,
        normalization: Normalization | None = None,
    ) -> Suspect:
        """The suspect these weights make: every floating matrix masked by its non-zeros."""
        matrices = [name for name, tensor in weights.items() if tensor.dim() > 1 and tensor.is_floating_point()]
        return cls(
            weights, mask_from_zeros(weights, matrices), identify_architecture(weights), source, graph, normalization
        )


def load_suspect(path: str | Path) -> Suspect:
    """Read a ticket folder, an ONNX file, a safetensors file, a torch file (plain or quantized) or a
    TorchScript archive, never unpickling or running code."""
    path = Path(path)
    if is_ticket_folder(path):
        ticket = Ticket.load(path)
        return Suspect.from_weights(dict(ticket.weights), "ticket", normalization=ticket.normalization)
    if path.suffix == ONNX_SUFFIX:
        weights, graph, source = load_onnx(path)
        return Suspect.from_weights(weights, source, graph)
    shipped = read_shipped_form(path)
    if shipped is not None:
        weights, source = shipped
        return Suspect.from_weights(fold_pruning_reparametrisation(weights)[0], source)
    weights, prune_mask = fold_pruning_reparametrisation(load_tensors(path))
    return Suspect.from_weights(weights, "zeros" if prune_mask is None else "torch.nn.utils.prune")


def load_onnx(path: Path) -> tuple[dict[str, torch.Tensor], list[GraphNode], str]:
    """The floating-point initializers (and Constant tensors) of an ONNX model, its quantized weights
    dequantized and its quantization scales left out; its weighted nodes; and whether it was quantized."""
    model = _read_onnx(path)
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            tensors.update(
                (node.output[0], a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR
            )
    _inline_external_data(tensors, path)
    quantized = dequantize_graph(model.graph, tensors, path)
    weights = {
        name: _weight(name, tensor, path)
        for name, tensor in tensors.items()
        if tensor.data_type in ONNX_WEIGHT_TYPES and name not in quantized.parameters
    } | quantized.weights
    if not weights:
        raise InputError(f"{path} holds no floating-point weights; ship the ONNX file with its initializers")
    source = QUANTIZED_ONNX_SOURCE if quantized.weights else "onnx"
    return weights, _weighted_nodes(_data_flow_order(quantized.nodes, weights, path), weights), source


def _read_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    if path.stat().st_size > MAX_ONNX_BYTES:
        raise InputError(f"{path} is larger than 2 GiB, which no single ONNX file can be; refused")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except DecodeError as err:
        raise InputError(f"{path} is not a readable ONNX file ({err})") from None
    if not model.graph.node:
        raise InputError(f"{path} is not a readable ONNX file: it holds no graph")
    names = [tensor.name for tensor in model.graph.initializer]
    if len(set(names)) != len(names):
        raise InputError(f"{path} is not a valid ONNX file: two initializers share a name")
    return model


def _inline_external_data(tensors: dict[str, onnx.TensorProto], path: Path) -> None:
    """Read tensors stored beside the model into it, only from files inside the model's own folder."""
    folder = path.parent.resolve()
    total = 0
    for name, tensor in tensors.items():
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        source = (folder / info.get("location", "")).resolve()
        if not source.is_relative_to(folder) or not source.is_file():
            raise InputError(
                f"{path}: tensor {name!r} points to external data {info.get('location')!r}, which is no file "
                "in the model's folder; refused"
            )
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", source.stat().st_size - offset))
        except ValueError:
            raise InputError(
                f"{path}: tensor {name!r} has a malformed external data offset or length"
            ) from None
        total += length
        if offset < 0 or length < 0 or offset + length > source.stat().st_size or total > MAX_ONNX_BYTES:
            raise InputError(f"{path}: tensor {name!r} points outside its external data file or past 2 GiB")
        with open(source, "rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _weight(name: str, tensor: onnx.TensorProto, path: Path) -> torch.Tensor:
    """One initializer as a torch tensor; a size that disagrees with its shape is refused."""
    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: initializer {name!r} is malformed ({err})") from None
    return torch.tensor(np.asarray(array, dtype=ONNX_WEIGHT_TYPES[tensor.data_type]))


def _data_flow_order(
    nodes: list[onnx.NodeProto], weights: dict[str, torch.Tensor], path: Path
) -> list[onnx.NodeProto]:
    """The nodes in the order a model's forward pass states them, whatever order the file lists them in: each
    after every node whose activation it reads, and at a join (a residual addition) the branch through more
    layers first, so a main path comes before its shortcut whichever operand the join lists first. Walked
    back from the nodes whose outputs nothing reads; a cycle is refused. A weight is no activation, even
    under the name of the node that dequantized it."""
    producer = {
        output: index
        for index, node in enumerate(nodes)
        for output in node.output
        if output and output not in weights
    }
    reads = [[producer[name] for name in node.input if name in producer] for node in nodes]
    read_by_some = {index for indices in reads for index in indices}
    sinks = [index for index in range(len(nodes)) if index not in read_by_some]
    depth: dict[int, int] = {}
    for index in _post_order(sinks, reads, path):
        layers = int(nodes[index].op_type in LAYER_OPS)
        depth[index] = max((depth[read] for read in reads[index]), default=0) + layers
    deeper_first = [sorted(indices, key=lambda read: -depth[read]) for indices in reads]
    return [nodes[index] for index in _post_order(sinks, deeper_first, path)]


def _post_order(roots: list[int], reads: list[list[int]], path: Path) -> list[int]:
    """Depth-first post-order from ``roots`` along ``reads`` (each node's producers, in the order visited),
    without recursion, so that no graph is too deep; every node must be reached, and none may read its own
    output, directly or through others."""
    cycle = InputError(f"{path} is not a valid ONNX file: its nodes read each other in a cycle")
    order: list[int] = []
    finished: set[int] = set()
    for root in roots:
        on_path, stack = {root}, [(root, iter(reads[root]))]
        while stack:
            index, pending = stack[-1]
            read = next(pending, None)
            if read is None:
                stack.pop()
                on_path.remove(index)
                finished.add(index)
                order.append(index)
            elif read in on_path:
                raise cycle
            elif read not in finished:
                on_path.add(read)
                stack.append((read, iter(reads[read])))
    if len(order) != len(reads):
        raise cycle
    return order


def _weighted_nodes(graph_nodes: list[onnx.NodeProto], weights: dict[str, torch.Tensor]) -> list[GraphNode]:
    """Every node that reads a weight, in the order given; an Identity of a weight is that weight."""
    aliases = {name: name for name in weights}
    nodes = []
    for node in graph_nodes:
        read = tuple(aliases.get(name) for name in node.input)
        if node.op_type == "Identity" and read and read[0] is not None:
            aliases.update((output, read[0]) for output in node.output)
        elif any(name is not None for name in read):
            attributes = {
                a.name: _attribute(onnx.helper.get_attribute_value(a))
                for a in node.attribute
                if a.type in ONNX_ATTRIBUTE_TYPES
            }
            nodes.append(GraphNode(node.op_type, read, attributes))
    return nodes


def _attribute(value: float | list[int]) -> int | float | tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else value
