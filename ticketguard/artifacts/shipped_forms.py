"""Two more forms a thief ships a model in, read as data: a quantized state_dict and a TorchScript archive.

A **quantized state_dict** (``torch.save(model.state_dict())`` after ``torch.ao.quantization`` static or
dynamic quantization) holds int8/uint8 quantized tensors and, for Linear layers, a ``_packed_params`` pair
that the quantized module already unpacked into (weight, bias) when it wrote its state_dict. Torch's default
``weights_only`` allow-list admits quantized tensors (``torch._utils._rebuild_qtensor``, the q-storages, the
qschemes and ``torch.qint8``-style dtypes), so ``torch.load(weights_only=True)`` reads such a file with no
extra global allowed. Packed parameters pickled as TorchScript objects (``torch.ScriptObject``, only in
hand-made dicts or whole pickled modules) stay refused: admitting ``torch.ScriptObject`` would let the file
name any registered TorchScript class to rebuild.

A **TorchScript archive** (``torch.jit.save``) is a zip whose ``data.pkl`` pickles the module tree as objects
of ``__torch__.…`` classes. It is never loaded with ``torch.jit.load``, which would compile its ``code/``:
``data.pkl`` is first scanned opcode by opcode (``pickletools``, which runs nothing) and refused if it names
any global beyond tensors, storages and the module classes; then torch's own weights-only unpickler reads it,
with each ``__torch__`` class mapped to ``ModuleAttributes``, a plain attribute holder, and tensors rebuilt
from the archive's ``data/`` records.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.jit._pickle
from torch import _weights_only_unpickler

from ticketguard.core.errors import InputError
from ticketguard.core.files import flatten_state_dict, load_checkpoint

QUANTIZED_SOURCE = "quantized state_dict, dequantized"
TORCHSCRIPT_SOURCE = "TorchScript archive, read as data"
MAX_ARCHIVE_BYTES = 4 * 1024**3  # total declared uncompressed size of a TorchScript archive
MAX_ARCHIVE_ENTRIES = 100_000
MAX_PICKLE_BYTES = 256 * 1024**2  # a data.pkl holds names and shapes only; the tensors live beside it
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # as files.load_tensors unwraps checkpoints
QUANTIZED_RANGES = {
    torch.qint8: (-(2**7), 2**7 - 1),
    torch.quint8: (0, 2**8 - 1),
    torch.qint32: (-(2**31), 2**31 - 1),
    torch.quint4x2: (0, 2**4 - 1),
    torch.quint2x4: (0, 2**2 - 1),
}
PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
# quantized Linear's state_dict: X._packed_params._packed_params = (weight, bias); an Embedding's: X.weight
PACKED_PAIR = "._packed_params._packed_params"
PACKED_EMBEDDING = "._packed_params._packed_weight"
PACKED_DTYPE = "._packed_params.dtype"
# a module's output quantizer (X.scale, X.zero_point) or FX's (name_scale_0, name_zero_point_0)
QUANTIZER_SCALE = re.compile(r"^(.*)scale(_\d+)?$")
QUANTIZER_ZERO_POINT = re.compile(r"^(.*)zero_point(_\d+)?$")
TORCHSCRIPT_HELPERS = (
    torch.jit._pickle.build_intlist,
    torch.jit._pickle.build_tensorlist,
    torch.jit._pickle.build_doublelist,
    torch.jit._pickle.build_boollist,
    torch.jit._pickle.build_tensor_from_id,
    torch.jit._pickle.restore_type_tag,
)
TENSOR_GLOBALS = {
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_qtensor",
    "collections.OrderedDict",
    *(f"torch.jit._pickle.{helper.__name__}" for helper in TORCHSCRIPT_HELPERS),
    *(
        f"torch.{scheme}"
        for scheme in (
            "per_tensor_affine",
            "per_tensor_symmetric",
            "per_channel_affine",
            "per_channel_symmetric",
            "per_channel_affine_float_qparams",
        )
    ),
}
STORAGE_GLOBAL = re.compile(r"^torch\.\w+Storage$")
MODULE_CLASS_PREFIX = "__torch__."
ZIP_MAGIC = b"PK\x03\x04"


class ModuleAttributes:
    """What a TorchScript module object becomes when read as data: its attributes, nothing callable."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise TypeError(
                "a module pickles a state of its own making (as quantized TorchScript modules do), "
                "which is not read; ship the float or quantized state_dict instead"
            )
        self.__dict__.update(state)


def read_shipped_form(path: Path) -> tuple[dict[str, torch.Tensor], str] | None:
    """A TorchScript archive's tensors, or a quantized state_dict dequantized, with what was read; None for
    any other file, which the plain loaders then read."""
    if not path.is_file():
        return None
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            if handle.read(4) == ZIP_MAGIC:
                raise InputError(
                    f"{path} starts as a zip archive (a torch or TorchScript file) but has no central "
                    "directory, so it was cut short or damaged; ship the whole file"
                )
        return None
    with _open_archive(path) as archive:
        prefix = _record_prefix(archive)
        if prefix is None:
            return None
        if any(name.startswith(f"{prefix}/code/") for name in archive.namelist()):
            _check_declared_sizes(path, archive)
            return load_torchscript(path, archive, prefix), TORCHSCRIPT_SOURCE
        quantized = _names_quantized_tensors(_read_pickle(path, archive, f"{prefix}/data.pkl"))
    return (load_quantized(path), QUANTIZED_SOURCE) if quantized else None


def load_quantized(path: Path) -> dict[str, torch.Tensor]:
    """A quantized state_dict with every weight dequantized to float under the float model's names."""
    state = load_checkpoint(path)
    if isinstance(state, Mapping):
        state = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), state)
    if not isinstance(state, Mapping):
        raise InputError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return flatten_state_dict(dequantize_state_dict(state, path), path)


def dequantize_state_dict(state: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Dequantize every quantized tensor ((q - zero_point) · scale), unpack Linear's ``_packed_params`` pair
    into ``weight`` and ``bias``, and drop the quantizers' bookkeeping (scales, zero points, packed dtypes).

    A pruned weight stays exactly 0.0: with a zero point of 0 (symmetric quantization, the default for
    weights) 0 quantizes to q = 0; with a non-zero zero point z, 0 quantizes to q = z, which torch requires to
    lie in the dtype's range (checked here too), and dequantizes to (z - z) · scale = 0.0 exactly. Only
    per-channel float-qparams tensors (quantized embeddings) have a float zero point, where 0 need not come
    back exact. Quantization can also round a small surviving weight to 0.0, so a quantized suspect may show
    a few more zeros than its source.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(key, str) and key.endswith(PACKED_PAIR) and isinstance(value, (tuple, list)):
            module = key.removesuffix(PACKED_PAIR)
            if len(value) != 2:
                raise InputError(f"{path}: {key!r} must hold a (weight, bias) pair, not {len(value)} entries")
            out[f"{module}.weight"] = _dequantize(f"{module}.weight", value[0], path)
            if value[1] is not None:
                out[f"{module}.bias"] = _dequantize(f"{module}.bias", value[1], path)
        elif isinstance(key, str) and key.endswith(PACKED_EMBEDDING):
            out[f"{key.removesuffix(PACKED_EMBEDDING)}.weight"] = _dequantize(key, value, path)
        elif not _is_bookkeeping(key, value, state, path):
            out[key] = _dequantize(str(key), value, path)
    return out


def _is_bookkeeping(key: Any, value: Any, state: Mapping[str, Any], path: Path) -> bool:
    """True for a packed dtype and for half of a quantizer's (scale, zero point) pair of scalars, which is
    checked as it is dropped."""
    if not isinstance(key, str):
        return False
    if key.endswith(PACKED_DTYPE):
        return isinstance(value, torch.dtype)
    match = QUANTIZER_SCALE.match(key) or QUANTIZER_ZERO_POINT.match(key)
    if not match:
        return False
    scale = state.get(f"{match[1]}scale{match[2] or ''}")
    zero_point = state.get(f"{match[1]}zero_point{match[2] or ''}")
    if not (
        isinstance(scale, torch.Tensor)
        and scale.is_floating_point()
        and scale.numel() == 1
        and isinstance(zero_point, torch.Tensor)
        and not zero_point.is_floating_point()
        and zero_point.numel() == 1
    ):
        return False
    _check_quantizer(
        key, scale.double().reshape(1), zero_point.long().reshape(1), QUANTIZED_RANGES[torch.qint32], path
    )
    return True


def _dequantize(name: str, value: Any, path: Path) -> Any:
    """A quantized tensor as float32, after checking its scales and zero points; anything else unchanged."""
    if not isinstance(value, torch.Tensor) or not value.is_quantized:
        return value
    scheme = value.qscheme()
    if scheme in PER_TENSOR:
        scales = torch.tensor([value.q_scale()], dtype=torch.float64)
        zero_points = torch.tensor([value.q_zero_point()])
    else:
        scales, zero_points = value.q_per_channel_scales(), value.q_per_channel_zero_points()
    if scheme == torch.per_channel_affine_float_qparams:  # float zero points, any value of which is valid
        zero_points = torch.zeros(zero_points.shape, dtype=torch.long)
    _check_quantizer(name, scales, zero_points, QUANTIZED_RANGES[value.dtype], path)
    try:
        return value.dequantize()
    except RuntimeError as err:
        raise InputError(f"{path}: quantized weight {name!r} is malformed ({_first_line(err)})") from None


def _check_quantizer(
    name: str, scales: torch.Tensor, zero_points: torch.Tensor, bounds: tuple[int, int], path: Path
) -> None:
    bad_scale = scales[~(torch.isfinite(scales) & (scales > 0))]
    if bad_scale.numel():
        raise InputError(
            f"{path}: {name!r} has a quantization scale of {bad_scale[0].item()}, but every scale must be "
            "positive and finite, so the file is damaged or forged"
        )
    low, high = bounds
    outside = zero_points[(zero_points < low) | (zero_points > high)]
    if outside.numel():
        raise InputError(
            f"{path}: {name!r} has a zero point of {outside[0].item()}, outside its dtype's range "
            f"[{low}, {high}], so the file is damaged or forged"
        )


def load_torchscript(path: Path, archive: zipfile.ZipFile, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript module tree, named as in its state_dict, without running it."""
    data = _read_pickle(path, archive, f"{prefix}/data.pkl")
    classes = _module_classes(path, data)
    storages = _StorageReader(path, archive, prefix)
    allowed = [(ModuleAttributes, name) for name in classes]
    allowed += [(helper, f"torch.jit._pickle.{helper.__name__}") for helper in TORCHSCRIPT_HELPERS]
    try:
        with torch.serialization.safe_globals(allowed):
            unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
            unpickler.persistent_load = storages.load
            root = unpickler.load()
    except InputError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        RuntimeError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
    ) as err:
        raise InputError(f"{path} is not a readable TorchScript archive ({_first_line(err)})") from None
    if not isinstance(root, ModuleAttributes):
        raise InputError(f"{path} is not a TorchScript module archive: its data.pkl holds no module")
    tensors = {name: _dequantize(name, tensor, path) for name, tensor in _named_tensors(root).items()}
    if not tensors:
        raise InputError(f"{path} holds no tensors, so it is not a model")
    return tensors


def _open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise InputError(f"{path} is not a readable zip archive ({_first_line(err)})") from None


def _check_declared_sizes(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse an archive whose central directory declares too much, before a byte of it is unpacked; reads
    then stop at each entry's declared size, so a zip bomb never inflates past it."""
    entries = archive.infolist()
    total = sum(entry.file_size for entry in entries)
    if len(entries) > MAX_ARCHIVE_ENTRIES or total > MAX_ARCHIVE_BYTES:
        raise InputError(
            f"{path} declares {len(entries)} entries and {total / 1024**2:.0f} MiB unpacked, over the limit "
            f"of {MAX_ARCHIVE_ENTRIES} entries and {MAX_ARCHIVE_BYTES / 1024**2:.0f} MiB; refused unread"
        )


def _record_prefix(archive: zipfile.ZipFile) -> str | None:
    """The one top folder holding data.pkl, as torch.save and torch.jit.save write it; None otherwise."""
    prefixes = [
        name.removesuffix("/data.pkl")
        for name in archive.namelist()
        if re.fullmatch(r"[^/]+/data\.pkl", name)
    ]
    return prefixes[0] if len(prefixes) == 1 else None


def _read_entry(path: Path, archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """One entry, at most ``limit`` bytes; zipfile stops at the declared size and checks the CRC."""
    try:
        entry = archive.getinfo(name)
        if entry.file_size > limit:
            raise InputError(
                f"{path}: {name} declares {entry.file_size} bytes, over the {limit} allowed; refused"
            )
        with archive.open(entry) as handle:
            return handle.read(limit + 1)
    except KeyError:
        raise InputError(f"{path} lacks the record {name}; the archive is damaged") from None
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as err:
        raise InputError(f"{path}: record {name} is damaged ({_first_line(err)})") from None


def _read_pickle(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    return _read_entry(path, archive, name, MAX_PICKLE_BYTES)


def _pickle_ops(path: Path, data: bytes) -> list[tuple[str, Any]]:
    """The pickle's opcodes and arguments, parsed without running anything."""
    try:
        return [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    except (ValueError, EOFError, UnicodeDecodeError) as err:  # what pickletools raises on damage
        raise InputError(f"{path} holds a damaged pickle ({_first_line(err)})") from None


def _names_quantized_tensors(data: bytes) -> bool:
    """True when a torch file's pickle rebuilds a quantized tensor or names a packed-params entry."""
    try:
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    except (ValueError, EOFError, UnicodeDecodeError):
        return False  # damaged: torch.load will say how
    return any(
        (op == "GLOBAL" and arg == "torch._utils _rebuild_qtensor")
        or (isinstance(arg, str) and "._packed_params." in arg)
        for op, arg in ops
    )


def _module_classes(path: Path, data: bytes) -> set[str]:
    """The ``__torch__`` classes a data.pkl names; any global beyond them, tensors and storages is refused."""
    names = {_global_name(arg) for op, arg in _pickle_ops(path, data) if op == "GLOBAL"}
    foreign = sorted(
        name
        for name in names
        if not name.startswith(MODULE_CLASS_PREFIX)
        and name not in TENSOR_GLOBALS
        and not STORAGE_GLOBAL.match(name)
    )
    if foreign:
        raise InputError(
            f"{path} holds code objects in its data.pkl ({', '.join(n[:80] for n in foreign[:3])}), "
            "not only tensors and modules; refused without running it"
        )
    return {name for name in names if name.startswith(MODULE_CLASS_PREFIX)}


def _global_name(arg: str) -> str:
    module, _, name = arg.partition(" ")
    return f"{module}.{name}"


class _StorageReader:
    """persistent_load for a TorchScript data.pkl: ('storage', type, key, location, numel) -> a CPU storage
    read from the archive's data/<key> record, of exactly the declared size."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, prefix: str) -> None:
        self.path, self.archive, self.prefix = path, archive, prefix
        self.storages: dict[str, torch.storage.TypedStorage] = {}

    def load(self, pid: Any) -> torch.storage.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InputError(f"{self.path}: data.pkl refers to something other than a stored tensor; refused")
        _, storage_type, key, _location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if (
            not isinstance(dtype, torch.dtype)
            or not isinstance(key, str)
            or not isinstance(numel, int)
            or numel < 0
        ):
            raise InputError(
                f"{self.path}: data.pkl describes a malformed tensor storage; the archive is damaged"
            )
        if key not in self.storages:
            nbytes = numel * torch._utils._element_size(dtype)
            raw = _read_entry(self.path, self.archive, f"{self.prefix}/data/{key}", MAX_ARCHIVE_BYTES)
            if len(raw) < nbytes:
                raise InputError(
                    f"{self.path}: tensor record data/{key} holds {len(raw)} bytes but declares {nbytes}; "
                    "the archive is damaged"
                )
            bytes_ = (
                torch.frombuffer(bytearray(raw[:nbytes]), dtype=torch.uint8)
                if nbytes
                else torch.empty(0, dtype=torch.uint8)
            )
            self.storages[key] = torch.storage.TypedStorage(
                wrap_storage=bytes_.untyped_storage(), dtype=dtype, _internal=True
            )
        return self.storages[key]


def _named_tensors(root: ModuleAttributes) -> dict[str, torch.Tensor]:
    """Tensor attributes by dotted path, each module's own before its children's, as a state_dict orders
    them; a module reached twice (shared, or a cycle in a forged file) is read once."""
    tensors: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, ModuleAttributes]] = [("", root)]
    seen: set[int] = set()
    while pending:
        prefix, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        children = []
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{name}"] = value
            elif isinstance(value, ModuleAttributes):
                children.append((f"{prefix}{name}.", value))
        pending.extend(reversed(children))
    return tensors


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."
