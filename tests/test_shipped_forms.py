"""Suspects shipped quantized (torch.ao static and dynamic) or as TorchScript archives, read as data."""

from __future__ import annotations

import io
import math
import pickle
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import randomise_batchnorm
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from ticketguard.artifacts import shipped_forms
from ticketguard.artifacts.shipped_forms import QUANTIZED_SOURCE, TORCHSCRIPT_SOURCE
from ticketguard.artifacts.suspect import load_suspect
from ticketguard.attacks.disguises import fold_bn
from ticketguard.core.errors import InputError
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask, magnitude_prune
from ticketguard.models import build_model
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
def test_the_owners_copy_shipped_as_int8_or_torchscript_is_verified(protected_owner, form: str, tmp_path) -> None:
    """The thief's deployment tool chain end to end: what verify reads from the shipped file still carries the
    owner's code (FX folds BatchNorm into the int8 convs; alignment rebuilds it)."""
    ticket, claim, data = protected_owner
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
    assert qr.details["decodes_to_claim"] and verdict.details["suspect_source"] in (QUANTIZED_SOURCE, TORCHSCRIPT_SOURCE)
