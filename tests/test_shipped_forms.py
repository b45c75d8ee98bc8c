"""Suspects shipped quantized (torch.ao static and dynamic, onnxruntime's int8 ONNX forms) or as TorchScript
archives, read as data."""

from __future__ import annotations

import io
import math
import pickle
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import randomise_batchnorm, sparse_model, trained_ticket
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from ticketguard.artifacts import shipped_forms
from ticketguard.artifacts.onnx_quantized import QUANTIZED_ONNX_SOURCE
from ticketguard.artifacts.shipped_forms import QUANTIZED_SOURCE, TORCHSCRIPT_SOURCE
from ticketguard.artifacts.suspect import load_suspect
from ticketguard.attacks.disguises import export_onnx, fold_bn
from ticketguard.core.errors import InputError
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask, magnitude_prune
from ticketguard.data import ImageData
from ticketguard.data.augment import normalize
from ticketguard.models import build_model
from ticketguard.verification.align import Reference, align
from ticketguard.verification.verify import verify

# torch.ao.quantization and TorchScript are deprecated and say so; shipping with them is what a thief may do
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


@pytest.fixture(scope="module")
def sparse() -> tuple[nn.Module, Mask]:
    """ResNet-20 for 8x8 one-channel digits, non-trivial BatchNorm, 70 % of its conv weights pruned to 0."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    randomise_batchnorm(model)
    convs = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    weights = model.state_dict()
    mask = magnitude_prune(weights, Mask.ones_like(weights, convs), 0.7)
    mask.apply_(model)
    return model.eval(), mask


@pytest.fixture(scope="module")
def static_quantized(sparse, tmp_path_factory) -> Path:
    """The sparse model FX static-quantized for x86 (BatchNorm fused into the convs), its state_dict saved."""
    model, _ = sparse
    torch.manual_seed(1)
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (torch.randn(1, 1, 8, 8),))
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(8, 1, 8, 8))
    path = tmp_path_factory.mktemp("quantized") / "weights.pt"
    torch.save(convert_fx(prepared).state_dict(), path)
    return path


def assert_one_sentence(err: pytest.ExceptionInfo[InputError]) -> None:
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message


def steps(quantized: torch.Tensor) -> torch.Tensor:
    """Each weight's quantization step (its channel's or the tensor's scale), broadcast to its shape."""
    if quantized.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return torch.full(quantized.shape, quantized.q_scale())
    shape = [1] * quantized.dim()
    shape[quantized.q_per_channel_axis()] = -1
    return quantized.q_per_channel_scales().float().reshape(shape).expand(quantized.shape)


def test_static_quantized_state_dict_dequantizes_within_one_step_with_pruned_weights_exactly_zero(
    sparse, static_quantized
) -> None:
    model, mask = sparse
    suspect = load_suspect(static_quantized)
    raw = torch.load(static_quantized, weights_only=True)
    folded, _ = fold_bn(model.state_dict(), mask)
    assert suspect.source == QUANTIZED_SOURCE
    assert sorted(suspect.weights) == sorted(folded), "float names, bookkeeping dropped"
    for name in mask:
        weight = suspect.weights[name]
        assert weight.dtype == torch.float32 and raw[name].is_quantized
        assert bool(((weight - folded[name]).abs() <= steps(raw[name]) * 1.001).all()), name
        assert bool((weight[~mask[name]] == 0).all()), f"a pruned weight of {name} is not exactly zero"
        assert bool((suspect.mask[name] <= mask[name]).all())
    packed_weight, _ = raw["fc._packed_params._packed_params"]
    assert bool(
        ((suspect.weights["fc.weight"] - folded["fc.weight"]).abs() <= steps(packed_weight) * 1.001).all()
    )
    assert torch.allclose(suspect.weights["blocks.3.conv1.bias"], folded["blocks.3.conv1.bias"], atol=1e-5)


def test_dynamic_quantized_mlp_dequantizes_within_one_step_with_pruned_weights_exactly_zero(tmp_path) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    weights = mlp.state_dict()
    mask = magnitude_prune(weights, Mask.ones_like(weights, ["0.weight", "2.weight"]), 0.7)
    mask.apply_(mlp)
    torch.save(quantize_dynamic(mlp, {nn.Linear}, dtype=torch.qint8).state_dict(), tmp_path / "mlp.pt")
    suspect = load_suspect(tmp_path / "mlp.pt")
    raw = torch.load(tmp_path / "mlp.pt", weights_only=True)
    assert suspect.source == QUANTIZED_SOURCE
    assert sorted(suspect.weights) == sorted(mlp.state_dict())
    for name in mask:
        quantized, bias = raw[f"{name.removesuffix('.weight')}._packed_params._packed_params"]
        weight = suspect.weights[name]
        assert bool(((weight - mlp.state_dict()[name]).abs() <= steps(quantized) * 1.001).all())
        assert bool((weight[~mask[name]] == 0).all())
        assert torch.equal(suspect.weights[name.replace("weight", "bias")], bias.detach())


def test_a_nonzero_zero_point_still_dequantizes_a_pruned_weight_to_exact_zero(tmp_path) -> None:
    weight = torch.tensor([[0.0, 0.31, -0.2], [0.0, 0.0, 0.9]])
    quantized = torch.quantize_per_tensor(weight, 0.01, 37, torch.quint8)
    torch.save({"fc.weight": quantized, "fc.bias": torch.zeros(2)}, tmp_path / "affine.pt")
    suspect = load_suspect(tmp_path / "affine.pt")
    assert quantized.int_repr()[0, 0] == 37
    assert bool((suspect.weights["fc.weight"][weight == 0] == 0.0).all())
    assert torch.equal(suspect.mask["fc.weight"], weight != 0)


@pytest.mark.parametrize("export", ["script", "trace"])
def test_torchscript_archive_reads_to_the_exact_state_dict(sparse, tmp_path, export: str) -> None:
    model, _ = sparse
    shipped = (
        torch.jit.script(model) if export == "script" else torch.jit.trace(model, torch.randn(1, 1, 8, 8))
    )
    torch.jit.save(shipped, tmp_path / "weights.pt")
    suspect = load_suspect(tmp_path / "weights.pt")
    expected = model.state_dict()
    assert suspect.source == TORCHSCRIPT_SOURCE and suspect.architecture == ("resnet20", 1, 10)
    assert list(suspect.weights) == list(expected)
    for name, tensor in expected.items():
        assert suspect.weights[name].dtype == tensor.dtype and torch.equal(suspect.weights[name], tensor), (
            name
        )
    save_tensors(tmp_path / "plain.safetensors", expected)
    plain = load_suspect(tmp_path / "plain.safetensors")
    assert all(torch.equal(suspect.mask[name], plain.mask[name]) for name in plain.mask)


@pytest.mark.parametrize(
    "scale, zero_point, refusal",
    [
        (0.0, 0, "scale of 0.0"),
        (math.nan, 0, "scale of nan"),
        (-0.5, 0, "scale of -0.5"),
        (0.1, 300, "zero point"),
    ],
)
def test_a_quantized_file_with_a_bad_quantizer_is_refused(tmp_path, scale, zero_point, refusal) -> None:
    weight = torch._make_per_tensor_quantized_tensor(
        torch.tensor([[0, 3], [-2, 1]], dtype=torch.int8), scale, zero_point
    )
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=refusal) as err:
        load_suspect(tmp_path / "bad.pt")
    assert_one_sentence(err)


def test_a_per_channel_scale_of_zero_is_refused(tmp_path) -> None:
    scales = torch.tensor([0.1, 0.0], dtype=torch.float64)
    weight = torch._make_per_channel_quantized_tensor(
        torch.ones(2, 3, dtype=torch.int8), scales, torch.zeros(2, dtype=torch.long), 0
    )
    torch.save({"conv.weight": weight}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="scale of 0.0") as err:
        load_suspect(tmp_path / "bad.pt")
    assert_one_sentence(err)


def test_a_bad_activation_scale_is_refused(static_quantized, tmp_path) -> None:
    state = torch.load(static_quantized, weights_only=True)
    state["blocks_3_scale_1"] = torch.tensor(math.nan)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="'blocks_3_scale_1' has a quantization scale of nan") as err:
        load_suspect(tmp_path / "bad.pt")
    assert_one_sentence(err)


@pytest.fixture(scope="module")
def scripted(sparse, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripted") / "weights.pt"
    torch.jit.save(torch.jit.script(sparse[0]), path)
    return path


def rewrite_archive(source: Path, target: Path, replace: dict[str, bytes]) -> None:
    """A copy of a zip archive with the named entries' contents replaced (names relative to its prefix)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        prefix = old.namelist()[0].split("/")[0]
        for entry in old.infolist():
            relative = entry.filename.removeprefix(f"{prefix}/")
            new.writestr(entry.filename, replace.get(relative, old.read(entry)))


class Payload:
    """What a forged archive pickles instead of a module: a call, run by any plain unpickler."""

    def __reduce__(self):
        return eval, ("print('pwned')",)


@pytest.mark.parametrize(
    "data",
    [
        pickle.dumps(Payload(), protocol=2),
        pickle.dumps({"conv.weight": io.BytesIO}, protocol=2),
    ],
)
def test_an_archive_whose_data_pkl_names_a_non_tensor_global_is_refused(scripted, tmp_path, data) -> None:
    rewrite_archive(scripted, tmp_path / "forged.pt", {"data.pkl": data})
    with pytest.raises(InputError, match="holds code objects") as err:
        load_suspect(tmp_path / "forged.pt")
    assert_one_sentence(err)


def test_a_zip_bomb_is_refused_from_its_declared_sizes_before_anything_is_unpacked(
    scripted, tmp_path
) -> None:
    """Two entries whose central directory declares 3.75 GiB each: refused without inflating a byte."""
    archive = bytearray(scripted.read_bytes())
    with zipfile.ZipFile(scripted) as original:
        bombed = [e.filename for e in original.infolist() if e.filename.endswith(("/data/0", "/data/1"))]
    start = 0
    while (start := archive.find(b"PK\x01\x02", start)) >= 0:
        length = int.from_bytes(archive[start + 28 : start + 30], "little")
        if archive[start + 46 : start + 46 + length].decode() in bombed:
            archive[start + 24 : start + 28] = (0xF000_0000).to_bytes(4, "little")
        start += 46
    (tmp_path / "bomb.pt").write_bytes(bytes(archive))
    tracemalloc.start()
    began = time.perf_counter()
    with pytest.raises(InputError, match="over the limit") as err:
        load_suspect(tmp_path / "bomb.pt")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - began < 2 and peak < 16 * 1024**2
    assert_one_sentence(err)


def test_a_highly_compressible_archive_past_the_limit_is_refused_unread(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(shipped_forms, "MAX_ARCHIVE_BYTES", 1024**2)
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("bomb/code/__torch__.py", "")
        archive.writestr("bomb/data/0", bytes(16 * 1024**2))
    assert (tmp_path / "bomb.pt").stat().st_size < 1024**2
    tracemalloc.start()
    with pytest.raises(InputError, match="over the limit") as err:
        load_suspect(tmp_path / "bomb.pt")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 1024**2
    assert_one_sentence(err)


def test_a_truncated_archive_is_refused(scripted, tmp_path) -> None:
    content = scripted.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(content[: len(content) // 2])
    with pytest.raises(InputError) as err:
        load_suspect(tmp_path / "truncated.pt")
    assert_one_sentence(err)


def test_an_archive_with_a_damaged_tensor_record_is_refused(scripted, tmp_path) -> None:
    with zipfile.ZipFile(scripted) as archive:
        header = next(e for e in archive.infolist() if e.filename.endswith("/data/0")).header_offset
    content = bytearray(scripted.read_bytes())
    name_length, extra_length = (
        int.from_bytes(content[header + i : header + i + 2], "little") for i in (26, 28)
    )
    content[header + 30 + name_length + extra_length + 4] ^= 0xFF  # one byte of the first conv's weights
    (tmp_path / "damaged.pt").write_bytes(bytes(content))
    with pytest.raises(InputError, match="damaged") as err:
        load_suspect(tmp_path / "damaged.pt")
    assert_one_sentence(err)


def test_a_tensor_record_shorter_than_declared_is_refused(scripted, tmp_path) -> None:
    with zipfile.ZipFile(scripted) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        short = archive.read(f"{prefix}/data/0")[:-4]
    rewrite_archive(scripted, tmp_path / "short.pt", {"data/0": short})
    with pytest.raises(InputError, match="declares") as err:
        load_suspect(tmp_path / "short.pt")
    assert_one_sentence(err)


def test_a_quantized_torchscript_archive_is_refused_with_the_reason(tmp_path) -> None:
    mlp = quantize_dynamic(nn.Sequential(nn.Linear(8, 4)), {nn.Linear}, dtype=torch.qint8)
    torch.jit.save(torch.jit.script(mlp), tmp_path / "quantized.pt")
    with pytest.raises(InputError, match="state of its own making") as err:
        load_suspect(tmp_path / "quantized.pt")
    assert_one_sentence(err)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["int8 FX static", "TorchScript"])
def test_the_owners_copy_shipped_as_int8_or_torchscript_is_verified(
    protected_owner, form: str, tmp_path
) -> None:
    """The thief's deployment tool chain end to end: what verify reads from the shipped file still carries the
    owner's code (FX folds BatchNorm into the int8 convs; alignment rebuilds it)."""
    ticket, claim, _ = protected_owner
    model = build_model("resnet20", 1, 10)
    model.load_state_dict(ticket.weights)
    model.eval()
    path = tmp_path / "shipped.pt"
    if form == "TorchScript":
        torch.jit.save(torch.jit.script(model), path)
    else:
        example = torch.randn(16, 1, 8, 8)
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
        prepared(example)
        torch.save(convert_fx(prepared).state_dict(), path)
    verdict = verify(path, claim)
    assert verdict.owned
    qr = next(e for e in verdict.evidence if e.name == "qr-signature")
    assert qr.details["decodes_to_claim"] and verdict.details["suspect_source"] in (
        QUANTIZED_SOURCE,
        TORCHSCRIPT_SOURCE,
    )


ONNX_FORMS = [
    "dynamic int8",
    "dynamic uint8",
    "QDQ int8",
    "QDQ uint8 per-channel",
    "QOperator int8 per-channel",
]


class Calibration:
    """onnxruntime's calibration data reader: one image per batch, under the exported model's input name."""

    def __init__(self, images: torch.Tensor) -> None:
        self.batches = iter([{"input": image[None].numpy()} for image in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_onnx(source: Path, form: str, calibration: torch.Tensor) -> Path:
    """``source`` quantized by onnxruntime as a thief runs it: ``dynamic`` with quantize_dynamic, ``QDQ`` and
    ``QOperator`` with quantize_static calibrated on ``calibration``; uint8 weights are quantized
    asymmetrically."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    weight_type = quantization.QuantType.QUInt8 if "uint8" in form else quantization.QuantType.QInt8
    target = source.with_name(f"{form.replace(' ', '-')}.onnx")
    if form.startswith("dynamic"):
        quantization.quantize_dynamic(source, target, weight_type=weight_type)
    else:
        quantization.quantize_static(
            source,
            target,
            Calibration(calibration),
            quant_format=getattr(quantization.QuantFormat, form.split()[0]),
            activation_type=weight_type,  # onnxruntime pairs uint8 weights with uint8 activations only
            weight_type=weight_type,
            per_channel="per-channel" in form,
        )
    return target


@pytest.fixture(scope="module")
def sparse_onnx(sparse, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "float.onnx"
    export_onnx(sparse[0], path, (1, 8, 8), dynamo=False)
    return path


@pytest.mark.parametrize("form", ONNX_FORMS)
def test_int8_onnx_dequantizes_within_half_a_step_with_pruned_weights_exactly_zero(
    sparse_onnx, form: str
) -> None:
    """Each Conv and Gemm reads its weight back in float under the float graph's name (a dynamic Gemm's is its
    transposed copy), within half of the coarsest 8-bit step, |w|max / 127; a pruned weight is exactly 0.0."""
    shipped = quantize_onnx(sparse_onnx, form, torch.randn(4, 1, 8, 8))
    plain, suspect = load_suspect(sparse_onnx), load_suspect(shipped)
    assert suspect.source == QUANTIZED_ONNX_SOURCE and plain.source == "onnx"
    layers = [[node for node in s.graph or [] if node.op_type in ("Conv", "Gemm")] for s in (plain, suspect)]
    assert len(layers[0]) == len(layers[1]) == 20
    for float_node, node in zip(*layers):
        assert node.op_type == float_node.op_type
        kernel, reference = suspect.weights[node.weights[1]], plain.weights[float_node.weights[1]]
        if node.op_type == "Conv":
            assert node.weights[1:] == float_node.weights[1:], "the float graph's names"
        elif not node.attributes.get("transB", 0):
            kernel = kernel.T
        assert kernel.dtype == torch.float32 and kernel.shape == reference.shape
        assert bool(((kernel - reference).abs() <= reference.abs().max() / 254 * 1.01).all()), node.weights[1]
        assert bool((kernel[reference == 0] == 0).all()), (
            f"a pruned weight of {node.weights[1]} is not exactly zero"
        )
        bias, float_bias = suspect.weights[node.weights[2]], plain.weights[float_node.weights[2]]
        assert torch.allclose(bias, float_bias, atol=1e-3 * float(float_bias.abs().max()))
    assert float(sum((~m).sum() for m in suspect.mask.values())) >= 0.6 * sum(
        m.numel() for m in suspect.mask.values()
    )
    if "uint8" in form:
        zero_points = [t for t in onnx.load(shipped).graph.initializer if t.name.endswith("zero_point")]
        assert any(numpy_helper.to_array(t).any() for t in zero_points if t.data_type == TensorProto.UINT8)


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Mask, Path]:
    """A sparse ResNet-18 for 8x8 one-channel images (non-trivial BatchNorm, 30 % of its weights kept): its
    weights, its mask and its ONNX export."""
    model, weights, mask = sparse_model("resnet18", 1, seed=0)
    path = tmp_path_factory.mktemp("resnet18") / "float.onnx"
    export_onnx(model, path, (1, 8, 8), dynamo=False)
    return weights, mask, path


@pytest.mark.slow
def test_dynamic_int8_onnx_of_resnet18_aligns_every_conv_to_its_own_though_onnxruntime_reorders_them(
    resnet18_onnx,
) -> None:
    """onnxruntime lists a strided block's shortcut conv before the block's second conv; read in data-flow
    order, each conv still meets its own reference conv. Aligned weights are the owner's within half an int8
    step of the folded kernel (one scale per tensor) times the spread of the BatchNorm scales folded into its
    channels (at most 6 here), and the mask is the owner's less the weights that rounding took to 0."""
    weights, mask, exported = resnet18_onnx
    shipped = quantize_onnx(exported, "dynamic int8", torch.empty(0))
    written = [n.input[1] for n in onnx.load(exported).graph.node if n.op_type == "Conv"]
    listed = [n.input[1] for n in onnx.load(shipped).graph.node if n.op_type == "ConvInteger"]
    assert [name.removesuffix("_quantized") for name in listed] != written, "onnxruntime reorders the convs"
    alignment = align(load_suspect(shipped), Reference.of("resnet18", 1, 10, weights, mask))
    assert alignment.report["structure"] == "onnx graph"
    for key, tensor in weights.items():
        if key.endswith(".weight") and tensor.dim() > 1:
            error = float((alignment.weights[key] - tensor).abs().max())
            assert error <= 6 / 254 * 1.25 * float(tensor.abs().max()), key
    assert all(bool((alignment.mask[key] <= mask[key]).all()) for key in mask)
    assert alignment.report["mean_overlap"] > 0.95


def test_onnx_layers_are_read_in_data_flow_order_however_the_file_lists_them(resnet18_onnx, tmp_path) -> None:
    """Nodes listed backwards and every residual Add's operands swapped (the same function, a valid graph
    once sorted) give the layers in the order the exporter wrote them: each block's main path, then its
    shortcut."""
    _, _, exported = resnet18_onnx
    model = onnx.load(exported)
    nodes = list(model.graph.node)[::-1]
    for node in nodes:
        if node.op_type == "Add":
            operands = list(node.input)[::-1]
            del node.input[:]
            node.input.extend(operands)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    (tmp_path / "backwards.onnx").write_bytes(model.SerializeToString())
    backwards, written = load_suspect(tmp_path / "backwards.onnx"), load_suspect(exported)
    assert [n.weights for n in backwards.graph or []] == [n.weights for n in written.graph or []]


def write_graph(path: Path, nodes: list[onnx.NodeProto], initializers: list[TensorProto]) -> Path:
    """A one-input model of ``nodes``, written without onnx's checker (a forged file need not pass it)."""
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=initializers,
    )
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def qdq_linear(
    path: Path, weight: TensorProto, scale: TensorProto, zero_point: TensorProto, **attributes
) -> Path:
    """A Linear(3, 2) as onnxruntime's QDQ writes it: Gemm(x, DequantizeLinear(weight, scale, zero point))."""
    nodes = [
        helper.make_node("DequantizeLinear", [weight.name, scale.name, zero_point.name], ["w"], **attributes),
        helper.make_node("Gemm", ["x", "w", "fc.bias"], ["y"], transB=1),
    ]
    bias = numpy_helper.from_array(np.zeros(2, np.float32), "fc.bias")
    return write_graph(path, nodes, [weight, scale, zero_point, bias])


def named(value, name: str) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def stored_as_int32_data(value: int, name: str) -> TensorProto:
    """An int8 scalar written in int32_data, where the file, not numpy, decides its range."""
    tensor = TensorProto(name=name, data_type=TensorProto.INT8)
    tensor.int32_data.append(value)
    return tensor


QUANTIZED_WEIGHT = np.array([[0, 31, -20], [0, 0, 90]], dtype=np.int8)


def test_an_onnx_weight_with_a_nonzero_zero_point_dequantizes_its_pruned_entries_to_exact_zero(
    tmp_path,
) -> None:
    weight = np.array([[0.0, 0.31, -0.2], [0.0, 0.0, 0.9]], dtype=np.float32)
    stored = (np.round(weight / 0.01) + 37).astype(np.uint8)
    path = qdq_linear(
        tmp_path / "affine.onnx",
        named(stored, "fc.weight_quantized"),
        named(np.float32(0.01), "fc.weight_scale"),
        named(np.uint8(37), "fc.weight_zero_point"),
    )
    suspect = load_suspect(path)
    assert stored[0, 0] == 37 and sorted(suspect.weights) == ["fc.bias", "fc.weight"], "scales are no weights"
    assert torch.equal(suspect.weights["fc.weight"] == 0, torch.from_numpy(weight == 0))
    assert torch.allclose(suspect.weights["fc.weight"], torch.from_numpy(weight), atol=0.005)
    assert torch.equal(suspect.mask["fc.weight"], torch.from_numpy(weight != 0))


@pytest.mark.parametrize(
    "scale, zero_point, attributes, refusal",
    [
        (np.float32(0.0), np.int8(0), {}, "scale of 0.0"),
        (np.float32(-0.5), np.int8(0), {}, "scale of -0.5"),
        (np.float32(np.nan), np.int8(0), {}, "scale of nan"),
        (np.float32(np.inf), np.int8(0), {}, "scale of inf"),
        (np.float32([0.1, 0.1, 0.1]), np.int8([0, 0, 0]), {"axis": 0}, r"scale of .* has shape \[3\]"),
        (np.float32([0.1, 0.1]), np.int8([0, 0, 0]), {"axis": 0}, r"zero point of .* has shape \[3\]"),
        (np.float32([0.1, 0.1]), np.int8([0, 0]), {"axis": 2}, "one per index of axis 2"),
        (np.float32([[0.1, 0.1]]), np.int8([[0, 0]]), {"axis": 0}, "not a float scalar or vector"),
        (np.float32(0.1), np.int32(0), {}, "zero point of .* INT32 tensor, but its weight is INT8"),
        (np.float32(0.1), 300, {}, r"holds 300, outside INT8's range \[-128, 127\]"),
        (np.float32([0.1, 0.1]), np.int8([0, 0]), {"axis": 1, "block_size": 2}, "block-quantized"),
        (np.float32([0.1, 0.1]), np.int8([0, 0]), {"axis": "rows"}, "malformed axis"),
    ],
    ids=[
        "zero scale",
        "negative scale",
        "NaN scale",
        "infinite scale",
        "scale unlike the axis",
        "zero point unlike the axis",
        "axis out of range",
        "2-D scale",
        "int32 zero point of an int8 weight",
        "zero point outside int8",
        "blocked",
        "string axis",
    ],
)
def test_an_onnx_weight_with_a_bad_quantizer_is_refused(
    tmp_path, scale, zero_point, attributes, refusal
) -> None:
    stored = (
        stored_as_int32_data(zero_point, "fc.weight_zero_point")
        if isinstance(zero_point, int)
        else named(zero_point, "fc.weight_zero_point")
    )
    path = qdq_linear(
        tmp_path / "bad.onnx",
        named(QUANTIZED_WEIGHT, "fc.weight_quantized"),
        named(scale, "fc.weight_scale"),
        stored,
        **attributes,
    )
    with pytest.raises(InputError, match=refusal) as err:
        load_suspect(path)
    assert_one_sentence(err)


def test_a_qlinear_matmul_reads_back_as_a_matmul_with_one_scale_per_column(tmp_path) -> None:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node(
            "QLinearMatMul",
            ["xq", "xs", "xz", "fc.weight_quantized", "ws", "wz", "ys", "yz"],
            ["yq"],
        ),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    scalars = [named(np.float32(0.1), "xs"), named(np.int8(0), "xz"), named(np.float32(0.2), "ys")]
    quantizer = [named(np.float32([0.5, 0.25]), "ws"), named(np.int8([0, 4]), "wz"), named(np.int8(0), "yz")]
    weight = named(QUANTIZED_WEIGHT.T, "fc.weight_quantized")
    suspect = load_suspect(write_graph(tmp_path / "matmul.onnx", nodes, [weight, *scalars, *quantizer]))
    expected = (QUANTIZED_WEIGHT.T.astype(np.float32) - [0, 4]) * [0.5, 0.25]
    assert [(n.op_type, n.weights) for n in suspect.graph or []] == [("MatMul", (None, "fc.weight"))]
    assert list(suspect.weights) == ["fc.weight"], "scales and zero points are no weights"
    assert torch.equal(suspect.weights["fc.weight"], torch.from_numpy(expected.astype(np.float32)))


def test_an_unsupported_quantized_op_is_refused(tmp_path) -> None:
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["y"], domain="com.microsoft")]
    weights = [named(QUANTIZED_WEIGHT.T, "w"), named(np.float32(0.1), "s"), named(np.int8(0), "z")]
    with pytest.raises(InputError, match="DynamicQuantizeMatMul reads the quantized weight 'w'") as err:
        load_suspect(write_graph(tmp_path / "fused.onnx", nodes, weights))
    assert_one_sentence(err)


def test_an_integer_op_whose_weight_scale_cannot_be_traced_is_refused(tmp_path) -> None:
    """MatMulInteger's int32 output cast to float and never scaled: nothing says what the weight's units
    are."""
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "w", "xz", "z"], ["yi"]),
        helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT),
    ]
    weights = [named(QUANTIZED_WEIGHT.T, "w"), named(np.int8(0), "z")]
    with pytest.raises(InputError, match="cannot be traced") as err:
        load_suspect(write_graph(tmp_path / "unscaled.onnx", nodes, weights))
    assert_one_sentence(err)


@pytest.mark.parametrize(
    "loop",
    [
        [("Add", ["x", "b"], "a"), ("Relu", ["a"], "b")],  # on the way to the output
        [("Relu", ["c"], "d"), ("Relu", ["d"], "c"), ("Relu", ["x"], "b")],  # off every path to the output
    ],
)
def test_onnx_nodes_that_read_each_other_in_a_cycle_are_refused(tmp_path, loop) -> None:
    nodes = [helper.make_node(op, inputs, [output]) for op, inputs, output in loop]
    nodes.append(helper.make_node("Gemm", ["b", "fc.weight", "fc.bias"], ["y"], transB=1))
    weights = [named(np.ones((2, 3), np.float32), "fc.weight"), named(np.zeros(2, np.float32), "fc.bias")]
    with pytest.raises(InputError, match="cycle") as err:
        load_suspect(write_graph(tmp_path / "cycle.onnx", nodes, weights))
    assert_one_sentence(err)


def test_an_int4_onnx_weight_is_refused_with_the_reason(tmp_path) -> None:
    weight = helper.make_tensor("fc.weight_quantized", TensorProto.INT4, [2, 3], [0, 3, -2, 0, 0, 7])
    path = qdq_linear(tmp_path / "int4.onnx", weight, named(np.float32(0.1), "s"), named(np.int8(0), "z"))
    with pytest.raises(InputError, match="stored as INT4, which is not read") as err:
        load_suspect(path)
    assert_one_sentence(err)


def test_an_onnx_weight_declaring_a_huge_shape_is_refused_before_anything_is_allocated(tmp_path) -> None:
    weight = TensorProto(name="fc.weight_quantized", data_type=TensorProto.INT8, raw_data=bytes(6))
    weight.dims.extend([2**31, 2**31])
    path = qdq_linear(tmp_path / "huge.onnx", weight, named(np.float32(0.1), "s"), named(np.int8(0), "z"))
    tracemalloc.start()
    began = time.perf_counter()
    with pytest.raises(InputError, match="holds 6 values") as err:
        load_suspect(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - began < 2 and peak < 16 * 1024**2
    assert_one_sentence(err)


def shipped_onnx(model: nn.Module, data: ImageData, form: str, folder: Path) -> Path:
    """``model`` exported to ONNX as the project exports it, then quantized by onnxruntime in ``form``,
    calibrated on eight digits."""
    export_onnx(model.eval(), folder / "float.onnx", (1, 8, 8), dynamo=False)
    return quantize_onnx(
        folder / "float.onnx", form, normalize(data.train_images[:8], *data.normalization().tensors())
    )


@pytest.mark.slow
@pytest.mark.parametrize("form", ["dynamic int8", "QDQ int8", "QOperator int8"])
def test_the_owners_copy_shipped_as_int8_onnx_is_verified(protected_owner, form: str, tmp_path) -> None:
    ticket, claim, data = protected_owner
    verdict = verify(shipped_onnx(ticket.build_model(), data, form, tmp_path), claim)
    assert verdict.owned, verdict
    qr = next(e for e in verdict.evidence if e.name == "qr-signature")
    assert qr.details["decodes_to_claim"] and verdict.details["suspect_source"] == QUANTIZED_ONNX_SOURCE
    assert verdict.details["alignment"]["structure"] == "onnx graph"


@pytest.mark.slow
@pytest.mark.parametrize("form", ["dynamic int8", "QDQ int8", "QOperator int8"])
def test_an_independent_ticket_shipped_as_int8_onnx_is_not_shown(
    protected_owner, form: str, tmp_path
) -> None:
    """Read, aligned and judged like the owner's copy, and found to be someone else's."""
    _, claim, data = protected_owner
    verdict = verify(shipped_onnx(trained_ticket(data, seed=11).build_model(), data, form, tmp_path), claim)
    assert not verdict.owned, verdict
    assert verdict.details["suspect_source"] == QUANTIZED_ONNX_SOURCE and "alignment" in verdict.details
