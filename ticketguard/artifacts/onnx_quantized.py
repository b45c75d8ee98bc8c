"""ONNX models quantized by ``onnxruntime.quantization``, read as data: each quantized weight dequantized to
float32 and each quantized op read as the float op it stands for, so the ONNX reader sees the float graph.

onnxruntime writes three forms; none is run here:

* **QDQ** (``quantize_static``, its default format): an int8/uint8 initializer feeds ``DequantizeLinear``
  with its ``x_scale`` and ``x_zero_point`` (one for the tensor, or one per index of ``axis``), whose output
  feeds Conv, Gemm or MatMul; a bias is an int32 initializer dequantized the same way, with its own scale.
* **QOperator** (``quant_format=QuantFormat.QOperator``): ``QLinearConv``, ``QLinearMatMul`` and
  com.microsoft ``QGemm`` take the weight, its scale and zero point as inputs; their int32 bias has zero
  point 0 and scale input scale × weight scale (× ``alpha`` for QGemm).
* **dynamic** (``quantize_dynamic``): ``ConvInteger`` and ``MatMulInteger`` take the weight and its zero
  point; the weight's scale comes after, as ``Mul(Cast(y), Mul(input scale, weight scale))``, then the float
  bias (``Add``, through a ``Reshape`` for convs). A Gemm becomes MatMulInteger on its transposed weight and
  is read back as a Gemm with ``transB`` 0.

A weight is w = (q - zero_point) · scale, named as in the float graph: its quantized initializer's name less
onnxruntime's ``_quantized`` suffix, unless another tensor of the graph bears that name.

A pruned weight stays exactly 0.0. onnxruntime widens every quantization range to hold 0, so 0 quantizes to
the zero point exactly and dequantizes to (zero_point - zero_point) · scale = 0.0: zero point 0 for symmetric
(int8) weights, any zero point for asymmetric (uint8) ones. Rounding can also take a small surviving weight to
0.0, so a quantized suspect may show a few more zeros than its source.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, numpy_helper

from ticketguard.core.errors import InputError, shorten

QUANTIZED_ONNX_SOURCE = "quantized onnx, dequantized"
QUANTIZED_SUFFIX = "_quantized"  # onnxruntime's name for a quantized copy of a float initializer
INTEGER_TYPES = {
    TensorProto.INT8: np.dtype("<i1"),
    TensorProto.UINT8: np.dtype("<u1"),
    TensorProto.INT16: np.dtype("<i2"),
    TensorProto.UINT16: np.dtype("<u2"),
    TensorProto.INT32: np.dtype("<i4"),
}
SCALE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# what a quantized weight is stored as; an op not read here that reads one (rank >= 2) is refused
QUANTIZED_WEIGHT_TYPES = {
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
    TensorProto.INT4,
    TensorProto.UINT4,
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
}
# ops whose float inputs are quantization parameters, with every QLinear* op
QUANTIZATION_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
}


@dataclass(frozen=True)
class DequantizedGraph:
    """``weights``: every quantized weight in float32 under its float name; ``nodes``: the graph's nodes,
    each quantized op that reads one replaced by its float op; ``parameters``: the float initializers that
    only quantize (scales), which are no weights."""

    weights: dict[str, torch.Tensor]
    nodes: list[onnx.NodeProto]
    parameters: set[str]


def dequantize_graph(graph: onnx.GraphProto, tensors: dict[str, TensorProto], path: Path) -> DequantizedGraph:
    """The float graph behind a quantized one; ``tensors`` are its initializers and Constant tensors."""
    reader = _Dequantizer(graph, tensors, path)
    nodes = [reader.float_node(node) for node in graph.node]
    return DequantizedGraph(reader.weights, nodes, reader.parameters())


def _input(node: onnx.NodeProto, index: int) -> str:
    """The node's ``index``-th input name, or "" where it has none (an omitted optional input)."""
    return node.input[index] if index < len(node.input) else ""


def _named(name: str) -> str:
    return repr(shorten(name, 80))


def _node(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {_named(node.name)}" if node.name else node.op_type


def _type_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:  # a number no ONNX type has
        return f"type {data_type}"


def _float_op(op_type: str, inputs: list[str], node: onnx.NodeProto) -> onnx.NodeProto:
    """The float op reading ``inputs`` in place of the quantized ``node``, with its outputs and attributes."""
    rewritten = onnx.helper.make_node(op_type, inputs, list(node.output), name=node.name)
    rewritten.attribute.extend(node.attribute)
    return rewritten


class _Dequantizer:
    """Reads one graph's quantized weights, tracing where each takes its scale, zero point and bias."""

    def __init__(self, graph: onnx.GraphProto, tensors: dict[str, TensorProto], path: Path) -> None:
        self.tensors, self.path = tensors, path
        self.producer = {output: node for node in graph.node for output in node.output if output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in set(node.input):
                self.consumers[name].append(node)
        self.names_in_use = set(tensors) | set(self.producer) | {value.name for value in graph.input}
        self.weights: dict[str, torch.Tensor] = {}
        self.read_as: dict[tuple[str | float, ...], str] = {}  # (what was read, and how) -> float name
        self.traced_scales: set[str] = set()

    def float_node(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """``node`` as the float graph has it; a quantized weight read by an op not understood is refused."""
        reader = READERS.get(node.op_type)
        rewritten = reader(self, node) if reader is not None else None
        if rewritten is not None:
            return rewritten
        for name in node.input:
            tensor = self.tensors.get(name)
            if tensor is not None and tensor.data_type in QUANTIZED_WEIGHT_TYPES and len(tensor.dims) >= 2:
                raise InputError(
                    f"{self.path}: {_node(node)} reads the quantized weight "
                    f"{_named(name)}, and that quantized op is not read; ship the float model or a QDQ, "
                    "QOperator or dynamic int8 one"
                )
        return node

    def parameters(self) -> set[str]:
        """Float initializers read only by quantization ops, and the weight scales traced through a Mul."""
        return self.traced_scales | {
            name
            for name, readers in self.consumers.items()
            if name in self.tensors
            and all(n.op_type in QUANTIZATION_OPS or n.op_type.startswith("QLinear") for n in readers)
        }

    def attribute(
        self, node: onnx.NodeProto, name: str, default: float, kind: int = AttributeProto.INT
    ) -> float:
        """A numeric attribute of ``node``, of the kind (INT or FLOAT) its op defines, else ``default``."""
        for attribute in node.attribute:
            if attribute.name == name:
                if attribute.type != kind:
                    raise InputError(f"{self.path}: {_node(node)} has a malformed {name}")
                return attribute.i if kind == AttributeProto.INT else attribute.f
        return default

    def dequantize_linear(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """QDQ: a DequantizeLinear of a stored tensor becomes an Identity of that tensor in float."""
        if not self.stored(_input(node, 0)) or not node.output:
            return None
        if self.attribute(node, "block_size", 0):
            raise InputError(
                f"{self.path}: {_named(_input(node, 0))} is block-quantized (block_size), which is not read; "
                "ship it quantized per tensor or per channel"
            )
        axis = int(self.attribute(node, "axis", 1))
        name = self.dequantized(_input(node, 0), _input(node, 1), _input(node, 2), axis, node.output[0])
        return onnx.helper.make_node("Identity", [name], [node.output[0]], name=node.name)

    def qlinear_conv(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B) as Conv(x, w, B)."""
        weight, weight_scale = _input(node, 3), _input(node, 4)
        if not self.stored(weight):
            return None
        inputs = [_input(node, 0), self.dequantized(weight, weight_scale, _input(node, 5), 0)]
        if _input(node, 8):
            inputs.append(self.bias(_input(node, 8), _input(node, 1), weight_scale, weight))
        return _float_op("Conv", inputs, node)

    def qlinear_matmul(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp) as MatMul(a, b); b's scale is per
        column."""
        weight = _input(node, 3)
        if not self.stored(weight):
            return None
        matrix = self.dequantized(weight, _input(node, 4), _input(node, 5), -1)
        return onnx.helper.make_node("MatMul", [_input(node, 0), matrix], list(node.output), name=node.name)

    def qgemm(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """com.microsoft QGemm(a, a_scale, a_zp, b, b_scale, b_zp, C, ...) as Gemm(a, b, C); b's scale is per
        column of op(b), and C's scale is alpha · a_scale · b_scale."""
        weight, weight_scale = _input(node, 3), _input(node, 4)
        if not self.stored(weight):
            return None
        alpha = self.attribute(node, "alpha", 1.0, AttributeProto.FLOAT)
        if not math.isfinite(alpha) or alpha == 0:
            raise InputError(f"{self.path}: {_node(node)} has alpha {alpha}; it must be finite, not 0")
        columns = 0 if self.attribute(node, "transB", 0) else 1
        inputs = [_input(node, 0), self.dequantized(weight, weight_scale, _input(node, 5), columns)]
        if _input(node, 6):
            inputs.append(self.bias(_input(node, 6), _input(node, 1), weight_scale, weight, alpha))
        return _float_op("Gemm", inputs, node)

    def integer_op(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """Dynamic: ConvInteger(x, w, x_zp, w_zp) as Conv(x, w, bias), MatMulInteger likewise as Gemm(x, w,
        bias), or MatMul(x, w) without a bias; the weight's scale and the bias are traced downstream. A
        ConvInteger's scale is one value, as onnxruntime writes it; a MatMulInteger's may be one per
        column."""
        weight = _input(node, 1)
        if not self.stored(weight) or not node.output:
            return None
        conv = node.op_type == "ConvInteger"
        scale, scaled = self.traced_scale(node)
        if conv and self.scale(scale, weight).size != 1:
            raise InputError(
                f"{self.path}: the scale multiplied after {_node(node)} is not one value, "
                "so it cannot be told apart from a per-pixel one; refused"
            )
        matrix = self.dequantized(weight, scale, _input(node, 3), 0 if conv else -1)
        bias = self.added_bias(scaled)
        if conv:
            return _float_op("Conv", [_input(node, 0), matrix, *([bias] if bias else [])], node)
        if bias and self.weights[matrix].dim() == 2:
            return onnx.helper.make_node(
                "Gemm", [_input(node, 0), matrix, bias], list(node.output), name=node.name
            )
        return onnx.helper.make_node("MatMul", [_input(node, 0), matrix], list(node.output), name=node.name)

    def traced_scale(self, node: onnx.NodeProto) -> tuple[str, str]:
        """The weight scale an integer op's output is multiplied by, as onnxruntime writes it:
        ``Mul(Cast(y), Mul(input scale, weight scale))``; and the name of that product."""
        output = node.output[0]
        consumer = self.sole_consumer(output)
        if consumer is not None and consumer.op_type == "Cast" and consumer.output:
            output, consumer = consumer.output[0], self.sole_consumer(consumer.output[0])
        weight_scale, scaled = "", ""
        if consumer is not None and consumer.op_type == "Mul" and consumer.output:
            product = self.producer.get(next((n for n in consumer.input if n != output), ""))
            input_scale = self.input_scale(_input(node, 0))
            if (
                product is not None
                and product.op_type == "Mul"
                and input_scale
                and input_scale in product.input
            ):
                weight_scale = next((n for n in product.input if n != input_scale), "")
            scaled = consumer.output[0]
        if not self.stored(weight_scale):
            raise InputError(
                f"{self.path}: the scale of {_node(node)}'s weight cannot be traced: "
                "onnxruntime multiplies its output by Mul(input scale, weight scale), which this graph does "
                "not"
            )
        self.traced_scales.add(weight_scale)
        return weight_scale, scaled

    def input_scale(self, activation: str) -> str:
        """The scale an integer op's input was quantized with: DynamicQuantizeLinear's second output, or
        QuantizeLinear's scale; "" for any other source."""
        source = self.producer.get(activation)
        if source is not None and source.op_type == "DynamicQuantizeLinear" and len(source.output) > 1:
            return source.output[1]
        if source is not None and source.op_type == "QuantizeLinear":
            return _input(source, 1)
        return ""

    def added_bias(self, scaled: str) -> str:
        """The 1-D float initializer added to an integer op's scaled output (directly or reshaped); "" for
        none."""
        consumer = self.sole_consumer(scaled)
        if consumer is None or consumer.op_type != "Add":
            return ""
        addend = next((n for n in consumer.input if n != scaled), "")
        for op_type in ("Reshape", "Identity"):  # torch's exporter shares equal biases through an Identity
            source = self.producer.get(addend)
            if source is not None and source.op_type == op_type:
                addend = _input(source, 0)
        tensor = self.tensors.get(addend) if self.stored(addend) else None
        return (
            addend if tensor is not None and tensor.data_type in SCALE_TYPES and len(tensor.dims) == 1 else ""
        )

    def stored(self, name: str) -> bool:
        """True for an initializer or Constant tensor (an omitted input, "", never is)."""
        return bool(name) and name in self.tensors

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    def dequantized(self, quantized: str, scale: str, zero_point: str, axis: int, output: str = "") -> str:
        """The float name of (q - zero_point) · scale, per tensor or along ``axis``, computed once in float32
        (exact for 8- and 16-bit values, and exactly 0.0 where q equals the zero point)."""
        key = (quantized, scale, zero_point, axis)
        if key not in self.read_as:
            values = self.integers(quantized, f"quantized weight {_named(quantized)}")
            steps = self.along_axis(self.scale(scale, quantized), values.shape, axis, "scale", quantized)
            offsets = np.zeros(())
            if zero_point:
                offsets = self.along_axis(
                    self.zero_point(zero_point, quantized), values.shape, axis, "zero point", quantized
                )
            dequantized = (values.astype(np.float32) - offsets.astype(np.float32)) * steps.astype(np.float32)
            self.read_as[key] = self.store(quantized, dequantized, output)
        return self.read_as[key]

    def bias(
        self, quantized: str, input_scale: str, weight_scale: str, weight: str, alpha: float = 1.0
    ) -> str:
        """The float name of an int32 bias of zero point 0 and scale input scale · weight scale (· alpha)."""
        key = (quantized, input_scale, weight_scale, alpha)
        if key not in self.read_as:
            values = self.integers(quantized, f"bias {_named(quantized)}")
            scale = self.scale(input_scale, weight)
            if self.tensors[quantized].data_type != TensorProto.INT32 or values.ndim != 1 or scale.size != 1:
                raise InputError(
                    f"{self.path}: bias {_named(quantized)} must be 1-D int32, after an input scale of one "
                    "value"
                )
            steps = self.along_axis(self.scale(weight_scale, weight), values.shape, 0, "scale", weight)
            self.read_as[key] = self.store(quantized, values * (alpha * scale.reshape(()) * steps), "")
        return self.read_as[key]

    def store(self, quantized: str, values: np.ndarray, output: str) -> str:
        """Keep a dequantized tensor under the float graph's name for it (see the module's docstring)."""
        name = quantized.removesuffix(QUANTIZED_SUFFIX)
        if name == quantized or (name in self.names_in_use and name != output) or name in self.weights:
            name = quantized
        if name in self.weights:
            raise InputError(
                f"{self.path}: {_named(quantized)} is dequantized with two different scales or zero points; "
                "refused"
            )
        self.weights[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        return name

    def along_axis(
        self, values: np.ndarray, shape: tuple[int, ...], axis: int, what: str, weight: str
    ) -> np.ndarray:
        """A scale or zero point shaped to broadcast over the weight: one value, or one per index of
        ``axis``."""
        if values.size == 1 and values.ndim <= 1:
            return values.reshape(())
        rank = len(shape)
        if values.ndim != 1 or not -rank <= axis < rank or values.size != shape[axis]:
            raise InputError(
                f"{self.path}: the {what} of {_named(weight)} has shape {list(values.shape)}, but a weight "
                f"of shape {list(shape)} takes one value or one per index of axis {axis}; the file is "
                "damaged or forged"
            )
        broadcast = [1] * rank
        broadcast[axis] = -1
        return values.reshape(broadcast)

    def constant(self, name: str, what: str, weight: str) -> TensorProto:
        if not self.stored(name):
            found = "computed in the graph" if name else "missing"
            raise InputError(
                f"{self.path}: the {what} of {_named(weight)} is {found}; only stored quantization "
                "parameters are read"
            )
        return self.tensors[name]

    def scale(self, name: str, weight: str) -> np.ndarray:
        """A stored scale as float64, every value positive and finite."""
        tensor = self.constant(name, "scale", weight)
        if tensor.data_type not in SCALE_TYPES or len(tensor.dims) > 1:
            raise InputError(
                f"{self.path}: the scale of {_named(weight)} is a {len(tensor.dims)}-D "
                f"{_type_name(tensor.data_type)} tensor, not a float scalar or vector"
            )
        try:
            values = np.asarray(numpy_helper.to_array(tensor), dtype=np.float64).reshape(-1)
        except (ValueError, TypeError) as err:
            raise InputError(
                f"{self.path}: the scale of {_named(weight)} is malformed ({shorten(str(err))})"
            ) from None
        bad = values[~(np.isfinite(values) & (values > 0))]
        if bad.size:
            raise InputError(
                f"{self.path}: {_named(weight)} has a quantization scale of {bad[0]}, but every scale must "
                "be positive and finite, so the file is damaged or forged"
            )
        return values

    def zero_point(self, name: str, weight: str) -> np.ndarray:
        """A stored zero point as int64, of its weight's own type and inside that type's range."""
        tensor, stored = self.constant(name, "zero point", weight), self.tensors[weight].data_type
        if tensor.data_type != stored or len(tensor.dims) > 1:
            raise InputError(
                f"{self.path}: the zero point of {_named(weight)} is a {len(tensor.dims)}-D "
                f"{_type_name(tensor.data_type)} tensor, but its weight is {_type_name(stored)}; the file is "
                "damaged or forged"
            )
        return self.integers(name, f"zero point of {_named(weight)}").astype(np.int64).reshape(-1)

    def integers(self, name: str, described: str) -> np.ndarray:
        """A stored integer tensor, its size checked against its shape before anything is allocated and its
        values against its type's range (numpy would wrap them)."""
        tensor = self.tensors[name]
        dtype = INTEGER_TYPES.get(tensor.data_type)
        if dtype is None:
            raise InputError(
                f"{self.path}: the {described} is stored as {_type_name(tensor.data_type)}, which is not "
                "read; ship int8 or uint8 weights"
            )
        shape = tuple(tensor.dims)
        count = math.prod(shape)
        stored = len(tensor.raw_data) // dtype.itemsize if tensor.raw_data else len(tensor.int32_data)
        if min(shape, default=0) < 0 or stored != count or len(tensor.raw_data) % dtype.itemsize:
            raise InputError(
                f"{self.path}: the {described} holds {stored} values where its shape {list(shape)} "
                "needs its product; the file is damaged or forged"
            )
        if tensor.raw_data:
            return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
        values = np.asarray(tensor.int32_data, dtype=np.int64)
        info = np.iinfo(dtype)
        outside = values[(values < info.min) | (values > info.max)]
        if outside.size:
            raise InputError(
                f"{self.path}: the {described} holds {outside[0]}, outside "
                f"{_type_name(tensor.data_type)}'s range [{info.min}, {info.max}]; "
                "the file is damaged or forged"
            )
        return values.astype(dtype).reshape(shape)


READERS: dict[str, Callable[[_Dequantizer, onnx.NodeProto], onnx.NodeProto | None]] = {
    "DequantizeLinear": _Dequantizer.dequantize_linear,
    "QLinearConv": _Dequantizer.qlinear_conv,
    "QLinearMatMul": _Dequantizer.qlinear_matmul,
    "QGemm": _Dequantizer.qgemm,
    "ConvInteger": _Dequantizer.integer_op,
    "MatMulInteger": _Dequantizer.integer_op,
}
