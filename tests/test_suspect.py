"""Suspects in the forms thieves ship them: ONNX files, Lightning-style checkpoints, renamed state_dicts."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import randomise_batchnorm
from torch import nn

from ticketguard.artifacts.suspect import load_suspect
from ticketguard.attacks.disguises import export_onnx, fold_bn, rename
from ticketguard.core.errors import InputError
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model

# the TorchScript exporter is deprecated and warns about it; exporting with it is what a thief may do
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


@pytest.fixture(scope="module")
def sparse() -> tuple[nn.Module, dict[str, torch.Tensor], Mask]:
    """ResNet-20 with non-trivial BatchNorm statistics, 70 % magnitude-pruned, in eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    randomise_batchnorm(model)
    weights = model.state_dict()
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.7)
    mask.apply_(model)
    return model.eval(), {k: v.clone() for k, v in model.state_dict().items()}, mask


def conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_onnx_export_loads_to_the_batchnorm_folded_weights_in_graph_order(
    sparse, tmp_path, dynamo: bool
) -> None:
    """Both exporters fold BatchNorm into the convs (under names of their own), so the suspect's tensors are
    fold_bn's, and the graph's Conv nodes come in the model's order."""
    model, weights, mask = sparse
    export_onnx(model, tmp_path / "thief.onnx", (1, 8, 8), dynamo=dynamo)
    suspect = load_suspect(tmp_path / "thief.onnx")
    assert suspect.source == "onnx" and suspect.architecture is None and suspect.graph is not None
    folded, _ = fold_bn(weights, mask)
    convs = [node for node in suspect.graph if node.op_type == "Conv"]
    assert len(convs) == len(conv_names(model))
    for name, node in zip(conv_names(model), convs):
        kernel, bias = suspect.weights[node.weights[1]], suspect.weights[node.weights[2]]
        assert torch.allclose(kernel, folded[f"{name}.weight"], rtol=1e-5, atol=1e-6)
        assert torch.allclose(bias, folded[f"{name}.bias"], rtol=1e-5, atol=1e-6)
        assert torch.equal(suspect.mask[node.weights[1]], folded[f"{name}.weight"] != 0)
    classifier = next(node for node in suspect.graph if node.op_type == "Gemm")
    assert torch.equal(suspect.weights[classifier.weights[1]], weights["fc.weight"])
    assert convs[7].attributes["strides"] == (2, 2)


def test_weights_shared_through_identity_nodes_are_resolved(tmp_path) -> None:
    """The TorchScript exporter stores equal tensors once (here the zero biases of untrained BatchNorms)
    and feeds the copies through Identity nodes."""
    export_onnx(build_model("resnet20", 1, 10), tmp_path / "fresh.onnx", (1, 8, 8), dynamo=False)
    convs = [node for node in load_suspect(tmp_path / "fresh.onnx").graph if node.op_type == "Conv"]
    assert len(convs) == 19 and all(node.weights[1] and node.weights[2] for node in convs)
    assert len({node.weights[2] for node in convs}) < len(convs)


def test_external_data_is_read_only_from_the_models_folder(sparse, tmp_path) -> None:
    model, _, _ = sparse
    export_onnx(model, tmp_path / "inline.onnx", (1, 8, 8), dynamo=False)
    proto = onnx.load(tmp_path / "inline.onnx")
    onnx.save_model(
        proto,
        tmp_path / "split.onnx",
        save_as_external_data=True,
        location="split.onnx.data",
        size_threshold=0,
    )
    inline, split = load_suspect(tmp_path / "inline.onnx"), load_suspect(tmp_path / "split.onnx")
    assert inline.weights.keys() == split.weights.keys()
    assert all(torch.equal(inline.weights[name], split.weights[name]) for name in inline.weights)
    escaping = onnx.load(tmp_path / "split.onnx", load_external_data=False)
    for entry in escaping.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../split.onnx.data"
    (tmp_path / "inner").mkdir()
    onnx.save_model(escaping, tmp_path / "inner" / "escaping.onnx")
    with pytest.raises(InputError, match="no file in the model's folder"):
        load_suspect(tmp_path / "inner" / "escaping.onnx")


@pytest.mark.parametrize(
    "content", [b"this is not an onnx model at all", b"\x08\x07\x12\xff\xff\xff\xff\x0f"]
)
def test_malformed_onnx_is_refused_in_one_sentence(tmp_path, content: bytes) -> None:
    (tmp_path / "bad.onnx").write_bytes(content)
    with pytest.raises(InputError, match="not a readable ONNX file") as caught:
        load_suspect(tmp_path / "bad.onnx")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_truncated_onnx_is_refused(sparse, tmp_path) -> None:
    model, _, _ = sparse
    export_onnx(model, tmp_path / "whole.onnx", (1, 8, 8), dynamo=False)
    (tmp_path / "cut.onnx").write_bytes((tmp_path / "whole.onnx").read_bytes()[:5000])
    with pytest.raises(InputError, match="ONNX"):
        load_suspect(tmp_path / "cut.onnx")


def test_lightning_checkpoint_with_a_model_prefix_loads_as_the_registered_architecture(
    sparse, tmp_path
) -> None:
    _, weights, _ = sparse
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{key}": tensor for key, tensor in weights.items()},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    suspect = load_suspect(tmp_path / "last.ckpt")
    assert suspect.architecture == ("resnet20", 1, 10)
    assert all(torch.equal(suspect.weights[key], tensor) for key, tensor in weights.items())


def test_nested_wrapper_prefixes_are_stripped_but_a_prefix_of_some_keys_is_kept(tmp_path) -> None:
    torch.save(
        {"model": {"model.module.a": torch.ones(1, 1), "model.module.b": torch.ones(1, 1)}}, tmp_path / "n.pt"
    )
    assert set(load_suspect(tmp_path / "n.pt").weights) == {"a", "b"}
    torch.save({"model.a": torch.ones(1, 1), "b": torch.ones(1, 1)}, tmp_path / "m.pt")
    assert set(load_suspect(tmp_path / "m.pt").weights) == {"model.a", "b"}


def test_renamed_and_reordered_state_dict_loads_with_every_matrix_masked(sparse, tmp_path) -> None:
    _, weights, mask = sparse
    renamed, renamed_mask = rename(weights, mask, style="opaque", seed=2)
    save_tensors(tmp_path / "renamed.safetensors", renamed)
    suspect = load_suspect(tmp_path / "renamed.safetensors")
    assert suspect.architecture is None and suspect.weights.keys() == renamed.keys()
    assert all(torch.equal(suspect.mask[name], renamed[name] != 0) for name in renamed_mask)
    assert len(suspect.mask) == sum(tensor.dim() > 1 for tensor in weights.values())
