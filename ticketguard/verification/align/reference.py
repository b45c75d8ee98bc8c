"""The owner's ``Reference``: the compact record of a protected ticket that alignment reads; its JSON.

A reference travels in claims and is read back from untrusted files, so its codec checks every length against
the architecture before decoding anything.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ticketguard.core.errors import InputError, shorten
from ticketguard.core.masks import Mask
from ticketguard.models import MODELS, is_import_path
from ticketguard.models.architecture import BN_PARAMETERS
from ticketguard.verification.align.layout import Architecture, Layout, layout_of

FORMAT = "ticketguard-reference"
VERSION = 1
MAX_IN_CHANNELS = 1024
MAX_CLASSES = 100_000
MAX_CHANNELS = 1 << 16  # per layer, for a model named by import path, whose shapes only its code knows
MAX_CELLS = 1 << 28  # per mask of such a model


@dataclass(frozen=True)
class KernelPrint:
    """Per output channel of one conv: the L2 norm of its kernel (the reference's units) and its largest
    weight (flat index over in x kh x kw, and value), whose sign tells a flipped channel from a kept one."""

    norm: torch.Tensor
    pivot: torch.Tensor
    pivot_value: torch.Tensor


@dataclass(frozen=True, eq=False)
class Reference:
    """What alignment needs of the owner's ticket, never its weights: the masks, a ``KernelPrint`` per conv
    and per BatchNorm its (4, n) statistics (weight, bias, running mean, running var).

    For a model named by import path the record holds a ``KernelPrint`` per conv and linear weight and no
    BatchNorm statistics (alignment reads them from the suspect); its shapes are checked against the model
    when alignment builds it, which needs its code trusted."""

    architecture: Architecture
    masks: dict[str, torch.Tensor]
    kernels: dict[str, KernelPrint]
    batchnorms: dict[str, torch.Tensor]

    @classmethod
    def of(
        cls,
        architecture: str,
        in_channels: int,
        num_classes: int,
        weights: Mapping[str, torch.Tensor],
        mask: Mask,
    ) -> Reference:
        """The reference of the ticket ``weights`` x ``mask`` (the weights a thief would copy)."""
        arch = (architecture, in_channels, num_classes)
        if architecture not in MODELS:
            return cls._of_any_model(arch, weights, mask)
        layout = layout_of(arch)
        if {k: tuple(t.shape) for k, t in weights.items()} != {k: s for k, (s, _) in layout.state.items()}:
            raise InputError(
                f"the reference weights are no {architecture} state_dict with {in_channels} input channels "
                f"and {num_classes} classes; pass the protected ticket's own weights"
            )
        mask.check_matches(weights)
        if not len(mask):
            raise InputError("the reference needs the ticket's mask; alignment reads channel orders from it")
        kept = {k: t.detach().cpu().double() for k, t in weights.items() if t.is_floating_point()}
        kept.update({k: kept[k] * mask[k].cpu() for k in mask})
        return cls(
            arch,
            {k: mask[k].cpu().bool() for k in mask},
            {key: _kernel_print(kept[key]) for key in layout.kernel_keys},
            {
                bn: torch.stack([kept[f"{bn}.{e}"] for e in BN_PARAMETERS]).float()
                for bn in layout.bn_of.values()
            },
        )

    @classmethod
    def _of_any_model(cls, arch: Architecture, weights: Mapping[str, torch.Tensor], mask: Mask) -> Reference:
        mask.check_matches(weights)
        if not len(mask):
            raise InputError("the reference needs the ticket's mask; alignment reads channel orders from it")
        kept = {k: t.detach().cpu().double() for k, t in weights.items() if t.is_floating_point()}
        kept.update({k: kept[k] * mask[k].cpu() for k in mask})
        kernels = {key: _kernel_print(t) for key, t in kept.items() if key.endswith(".weight") and t.dim() >= 2}
        return cls(arch, {k: mask[k].cpu().bool() for k in mask}, kernels, {})

    def to_json(self) -> dict[str, Any]:
        name, in_channels, num_classes = self.architecture
        return {
            "format": FORMAT,
            "version": VERSION,
            "architecture": name,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "masks": {k: {"shape": list(m.shape), "bits": _encode_bits(m)} for k, m in self.masks.items()},
            "kernels": {
                key: {
                    **({} if name in MODELS else {"channels": len(p.norm)}),
                    "norm": _encode_array(p.norm, "<f4"),
                    "pivot": _encode_array(p.pivot, "<i4"),
                    "pivot_value": _encode_array(p.pivot_value, "<f4"),
                }
                for key, p in self.kernels.items()
            },
            "batchnorms": {bn: _encode_array(s, "<f4") for bn, s in self.batchnorms.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> Reference:
        """Read an untrusted reference: every field's type and size is checked against the architecture it
        names before anything is decoded, so no input can make it allocate more than that architecture
        needs."""
        data = _object(data, "the reference")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise InputError(f"this is no {FORMAT} version {VERSION} file; write it with Reference.to_json")
        name = data.get("architecture")
        if not isinstance(name, str) or not (name in MODELS or is_import_path(name)):
            raise InputError(
                f"reference architecture must be one of {', '.join(MODELS)} or an import path, "
                f"got {shorten(repr(name))}"
            )
        arch = (
            name,
            _integer(data.get("in_channels"), 1, MAX_IN_CHANNELS, "in_channels"),
            _integer(data.get("num_classes"), 2, MAX_CLASSES, "num_classes"),
        )
        if name not in MODELS:
            return _any_model_from_json(arch, data)
        layout = layout_of(arch)
        masks = {}
        for key, entry in _object(data.get("masks"), "reference masks").items():
            entry = _object(entry, f"reference mask {key!r}")
            shape = layout.state.get(key, ((), None))[0]
            if len(shape) < 2 or entry.get("shape") != list(shape):
                raise InputError(
                    f"reference mask {key!r} is no weight of {name} with its shape {list(shape)}"
                )
            masks[key] = _decode_bits(entry.get("bits"), shape, f"mask {key!r}")
        if not masks:
            raise InputError("reference masks are empty; alignment reads channel orders from them")
        return cls(
            arch, masks, _decode_kernels(data.get("kernels"), layout), _decode_batchnorms(data, layout)
        )


def _any_model_from_json(arch: Architecture, data: dict[str, Any]) -> Reference:
    """A reference of a model named by import path: without its code, every size is bounded by the limits
    above, and alignment checks them against the model before using them."""
    masks = {}
    for key, entry in _object(data.get("masks"), "reference masks").items():
        entry = _object(entry, f"reference mask {key!r}")
        shape = entry.get("shape")
        if (
            not isinstance(shape, list) or not 2 <= len(shape) <= 5
            or not all(type(n) is int and 1 <= n <= MAX_CHANNELS for n in shape)
            or math.prod(shape) > MAX_CELLS
        ):
            raise InputError(f"reference mask {key!r} must have 2 to 5 dims of 1 to {MAX_CHANNELS} entries")
        masks[key] = _decode_bits(entry.get("bits"), tuple(shape), f"mask {key!r}")
    if not masks:
        raise InputError("reference masks are empty; alignment reads channel orders from them")
    kernels = {}
    for key, entry in _object(data.get("kernels"), "reference kernels").items():
        entry = _object(entry, f"reference kernel {key!r}")
        channels = _integer(entry.get("channels"), 1, MAX_CHANNELS, f"kernel {key!r} channels")
        print_ = KernelPrint(
            _decode_array(entry.get("norm"), "<f4", channels, f"{key} norm"),
            _decode_array(entry.get("pivot"), "<i4", channels, f"{key} pivot"),
            _decode_array(entry.get("pivot_value"), "<f4", channels, f"{key} pivot_value"),
        )
        if (print_.norm < 0).any() or (print_.pivot < 0).any():
            raise InputError(f"reference kernel {key!r} has a negative norm or pivot")
        kernels[key] = print_
    if _object(data.get("batchnorms"), "reference batchnorms"):
        raise InputError("a reference of a model named by import path holds no BatchNorm statistics")
    return Reference(arch, masks, kernels, {})


def _kernel_print(kernel: torch.Tensor) -> KernelPrint:
    rows = kernel.flatten(1)
    pivot = rows.abs().argmax(1)
    return KernelPrint(rows.norm(dim=1).float(), pivot, rows.gather(1, pivot[:, None]).squeeze(1).float())


# ---- JSON codecs: every length is checked before decoding ------------------------------------------------


def _encode_array(tensor: torch.Tensor, dtype: str) -> str:
    return base64.b64encode(tensor.numpy().astype(dtype).tobytes()).decode("ascii")


def _encode_bits(mask: torch.Tensor) -> str:
    packed = np.packbits(mask.numpy().ravel())
    return base64.b64encode(zlib.compress(packed.tobytes(), 9)).decode("ascii")


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def _integer(value: Any, low: int, high: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"reference {field} must be an integer from {low} to {high}, got {value!r}")
    return value


def _base64(text: Any, max_length: int, field: str) -> bytes:
    if not isinstance(text, str) or len(text) > max_length:
        raise InputError(f"reference {field} must be a base64 string of at most {max_length} characters")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"reference {field} is not valid base64") from None


def _decode_array(text: Any, dtype: str, count: int, field: str) -> torch.Tensor:
    size = count * np.dtype(dtype).itemsize
    raw = _base64(text, 4 * math.ceil(size / 3), field)
    if len(raw) != size:
        raise InputError(f"reference {field} must hold {count} values, got {len(raw)} bytes")
    array = np.frombuffer(raw, dtype=dtype)
    if not np.isfinite(array).all():
        raise InputError(f"reference {field} holds non-finite values")
    return torch.from_numpy(array.astype(np.int64 if array.dtype.kind == "i" else np.float32))


def _decode_bits(text: Any, shape: tuple[int, ...], field: str) -> torch.Tensor:
    """zlib-compressed packed bits, inflated to at most the size ``shape`` needs (no zip bombs)."""
    count = math.prod(shape)
    packed = -(-count // 8)
    compressed = _base64(text, 4 * math.ceil((packed + packed // 1000 + 64) / 3), field)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, packed)
    except zlib.error:
        raise InputError(f"reference {field} is not zlib-compressed packed bits") from None
    if len(raw) != packed or not inflater.eof or inflater.unused_data:
        raise InputError(f"reference {field} must hold exactly {count} bits")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count)
    return torch.from_numpy(bits.astype(bool)).view(shape)


def _decode_kernels(value: Any, layout: Layout) -> dict[str, KernelPrint]:
    entries = _object(value, "reference kernels")
    if set(entries) != set(layout.kernel_keys):
        raise InputError(
            f"reference kernels must describe exactly the {len(layout.convs)} convs of the model"
        )
    kernels = {}
    for key in layout.kernel_keys:
        entry = _object(entries[key], f"reference kernel {key!r}")
        out_channels, *rest = layout.state[key][0]
        print_ = KernelPrint(
            _decode_array(entry.get("norm"), "<f4", out_channels, f"{key} norm"),
            _decode_array(entry.get("pivot"), "<i4", out_channels, f"{key} pivot"),
            _decode_array(entry.get("pivot_value"), "<f4", out_channels, f"{key} pivot_value"),
        )
        if (print_.norm < 0).any() or (print_.pivot < 0).any() or (print_.pivot >= math.prod(rest)).any():
            raise InputError(f"reference kernel {key!r} has a negative norm or a pivot outside the kernel")
        kernels[key] = print_
    return kernels


def _decode_batchnorms(data: dict[str, Any], layout: Layout) -> dict[str, torch.Tensor]:
    entries = _object(data.get("batchnorms"), "reference batchnorms")
    if set(entries) != set(layout.bn_of.values()):
        raise InputError(f"reference batchnorms must describe exactly the {len(layout.bn_of)} BatchNorms")
    stats = {}
    for bn, text in entries.items():
        width = layout.state[f"{bn}.weight"][0][0]
        stats[bn] = _decode_array(text, "<f4", 4 * width, f"batchnorm {bn!r}").view(4, width)
        if (stats[bn][3] < 0).any():
            raise InputError(f"reference batchnorm {bn!r} has a negative running variance")
    return stats
