"""Atomic file writes, hashing and safe tensor loading.

A suspect model is attacker-controlled input: tensors are read with safetensors or with
``torch.load(weights_only=True)``, never by unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ticketguard.errors import InputError

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err})") from None


def read_manifest(folder: str | Path, name: str, expected_format: str, kind: str) -> dict[str, Any]:
    """The JSON manifest of a ticket or key folder, after checking its format tag and every file's sha256."""
    folder = Path(folder)
    if not (folder / name).is_file():
        raise InputError(f"{folder} is not a {kind} folder: {name} is missing")
    manifest = read_json(folder / name)
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise InputError(f"{folder / name} is not a {expected_format} manifest")
    for file, expected in manifest.get("files", {}).items():
        path = folder / file
        if not path.is_file():
            raise InputError(f"{path} is missing from the {kind} folder")
        if sha256_file(path) != expected:
            raise InputError(f"{path} does not match the sha256 in {name}: the file was changed or damaged")
    return manifest


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save named tensors as safetensors, atomically (contiguous CPU copies, any memory format)."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(plain, str(tmp))


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Save a training checkpoint of tensors, numbers and strings, atomically; read back with weights_only."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return _torch_load(Path(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a flat name -> tensor mapping from safetensors or a torch file, without executing pickled code.

    Checkpoints that wrap their state_dict (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for any malformed header
            raise InputError(f"{path} is not a readable safetensors file ({err})") from None
    return _flatten_state_dict(_torch_load(path), path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(str(err))
        if "GLOBAL" in reason:
            raise InputError(
                f"refused to load {path}: it holds pickled objects other than tensors ({reason}); "
                "convert it to safetensors or a plain state_dict"
            ) from None
        raise InputError(f"{path} is not a readable torch file ({reason})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise InputError(f"{path} is not a readable torch file ({err})") from None


def _unpickler_reason(message: str) -> str:
    """The one line of torch's long weights-only error that says what was wrong.

    A forbidden object is named on a line with "GLOBAL"; other damage follows "WeightsUnpickler error:".
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]
    if named:
        return named[0].split(". Please use")[0].removeprefix("WeightsUnpickler error:").strip()
    marker = "WeightsUnpickler error:"
    detail = message.split(marker, 1)[1] if marker in message else message
    rest = [line.strip() for line in detail.splitlines() if line.strip()]
    return rest[0] if rest else "unreadable"


def _flatten_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path} holds entries that are not named tensors: {', '.join(bad[:5])}")
    return _strip_wrapper_prefixes(dict(obj))


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes that training wrappers put on every key (DDP's ``module.``, a Lightning module's
    ``model.``, torch.compile's ``_orig_mod.``), nested or not; a prefix that only some keys share names a
    real layer and stays."""
    while prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state
