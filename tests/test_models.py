import pytest
import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.models import MODELS, build_model, identify_architecture


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32), (3, 12)])
def test_every_model_maps_images_to_class_logits(name: str, channels: int, size: int) -> None:
    model = build_model(name, in_channels=channels, num_classes=7).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_resnet20_has_the_papers_parameter_count_and_option_a_shortcuts() -> None:
    model = build_model("resnet20")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.27e6, rel=0.01)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # stem + 18 in blocks: option-A shortcuts carry no weights
    assert {c.out_channels for c in convs} == {16, 32, 64}


def test_resnet18_and_50_use_a_3x3_stride1_stem_and_projection_shortcuts() -> None:
    for name, params in (("resnet18", 11.17e6), ("resnet50", 23.5e6)):
        model = build_model(name)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)


def test_identify_architecture_recognises_each_state_dict() -> None:
    for name in MODELS:
        state = build_model(name, in_channels=1, num_classes=5).state_dict()
        assert identify_architecture(state) == (name, 1, 5)
    state = build_model("resnet20").state_dict()
    state.pop("fc.bias")
    assert identify_architecture(state) is None


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match="resnet20"):
        build_model("vgg16")
