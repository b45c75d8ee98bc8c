"""``export_onnx``: the last disguise, a file rather than weights.

Apart from the weight disguises because it runs an exporter on a model (and may need onnxscript).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.core.files import atomic_path


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], dynamo: bool) -> None:
    """Export ``model`` in eval mode to one self-contained ONNX file (batch size 1), written atomically.

    ``dynamo`` picks torch's dynamo exporter (needs onnxscript) over the TorchScript one. Both fold BatchNorm
    into the convs, so the file holds ``fold_bn``'s tensors under the exporter's own names.
    """
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        raise InputError(
            "the dynamo ONNX exporter needs onnxscript: pip install onnxscript, or use dynamo=False"
        )
    example = (torch.zeros(1, *input_shape, device=next(model.parameters()).device),)
    training = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp:
            options = {"external_data": False, "verbose": False} if dynamo else {}
            torch.onnx.export(
                model,
                example,
                str(tmp),
                dynamo=dynamo,
                input_names=["input"],
                output_names=["logits"],
                **options,
            )
    finally:
        model.train(training)
