"""Atomic file writes and staged folders, the one check before any output is written, hashing, JSON read and
checked against a schema, and safe tensor loading.

A suspect model is attacker-controlled input: tensors are read with safetensors or with
``torch.load(weights_only=True)``, never by unpickling arbitrary objects. So are ticket, key and claim JSON:
``check_json`` admits only what their schemas describe, with finite numbers and real integers.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import pickle
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ticketguard.core.errors import InputError, shorten
from ticketguard.core.schema import check_json

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
TICKET_MANIFEST = "ticket.json"
KEY_MANIFEST = "key.json"
# Folders whose manifest pins every file by sha256: a file written into one breaks it, so nothing is.
SEALED_MANIFESTS = (TICKET_MANIFEST, KEY_MANIFEST)
TEMPORARY_SUFFIX = ".tmp"
MAX_JSON_BYTES = 64 * 1024**2
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def as_json(value: Any) -> Any:
    """``value`` (a dataclass, or plain data) as a JSON file gives it back: tuples as lists, dataclasses as
    dicts; the form in which a stored record and a fresh one compare equal."""
    return json.loads(json.dumps(asdict(value) if is_dataclass(value) else value))


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file of at most MAX_JSON_BYTES; nesting too deep for Python is bad input, not a crash.
    A file from outside (a ticket, key or claim) is then checked against its schema with ``check_json``."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(
                f"{path} is over {MAX_JSON_BYTES // 1024**2} MiB, more than any JSON file ticketguard writes"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except RecursionError:
        raise InputError(f"{path} nests JSON deeper than Python can read") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, and integers of over 4300 digits
        raise InputError(f"{path} is not valid JSON ({shorten(str(err))})") from None
    return data


def read_manifest(
    folder: str | Path,
    name: str,
    expected_format: str,
    kind: str,
    schema: Mapping[str, Any],
    files: Sequence[str],
) -> dict[str, Any]:
    """The JSON manifest of a ticket or key folder, after checking its format tag, its ``schema``, that it
    lists the sha256 of exactly ``files`` (all in the folder), and every file's hash."""
    folder = Path(folder)
    if not (folder / name).is_file():
        raise InputError(f"{folder} is not a {kind} folder: {name} is missing")
    manifest = read_json(folder / name)
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise InputError(f"{folder / name} is not a {expected_format} manifest")
    check_json(manifest, schema, str(folder / name))
    listed = manifest.get("files")
    if not isinstance(listed, dict) or sorted(listed) != sorted(files):
        shown = shorten(", ".join(map(repr, sorted(listed))) if isinstance(listed, dict) else repr(listed))
        raise InputError(
            f"{folder / name} must list the sha256 of exactly {', '.join(files)}, but lists "
            f"{shown or 'none'}: the {kind} folder was changed or damaged"
        )
    for file in files:
        path = folder / file
        if not path.is_file():
            raise InputError(f"{path} is missing from the {kind} folder")
        if sha256_file(path) != listed[file]:
            raise InputError(f"{path} does not match the sha256 in {name}: the file was changed or damaged")
    return manifest


def prepare_output(
    path: str | Path,
    force: bool,
    option: str = "--out",
    *,
    folder: bool = False,
    inputs: Sequence[Path] = (),
    replaces: Sequence[str] | None = None,
) -> None:
    """The one check before an artifact (a file, or with ``folder`` a whole folder) is written to ``path``.

    Refused: anything inside a ticket or key folder (its manifest pins every file), a file where a folder
    goes or the reverse, an output that would replace one of the command's ``inputs``, and, without ``force``,
    an existing file or non-empty folder. A folder that ``force`` lets a staged write replace whole must hold
    only the names in ``replaces`` (an earlier output of the same kind): other files are never swept away.
    What a killed run left (temporary ``.NAME.*.tmp`` siblings, a folder holding nothing else) is not the
    user's work: it is cleared, not refused.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise InputError(f"give {option} a name of its own, not {str(path)!r}")
    parent = _sealed_folder(path.parent)
    if parent is not None:
        raise InputError(
            f"{path} would lie inside {path.parent}, whose {parent} pins every file by sha256; "
            f"choose an {option} outside it"
        )
    for source in map(Path, inputs):
        if path.resolve() == source.resolve() or path.resolve() in source.resolve().parents:
            raise InputError(f"{option} {path} would replace the input {source}; choose another {option}")
    unfinished = folder and path.is_dir() and _only_leftovers(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise InputError(f"{path} is a file, and {option} needs a folder; choose another {option}")
        if not force and path.is_dir() and not unfinished:
            raise InputError(
                f"{path} already exists and is not empty; choose another {option} or give --force"
            )
        foreign = [] if replaces is None or unfinished or not path.is_dir() else sorted(
            entry.name for entry in path.iterdir() if entry.name not in replaces and not _is_leftover(entry)
        )
        if foreign:
            raise InputError(
                f"{path} holds {', '.join(foreign[:3])}, which this command never writes, and --force "
                f"replaces only an earlier output of it; choose another {option}"
            )
    else:
        if path.is_dir():
            raise InputError(f"{path} is a folder; give {option} a file name")
        if not force and path.exists():
            raise InputError(f"{path} already exists; choose another {option} or give --force")
    _clear_leftovers(path, unfinished)


def _sealed_folder(folder: Path) -> str | None:
    return next((name for name in SEALED_MANIFESTS if (folder / name).is_file()), None)


def _is_leftover(path: Path) -> bool:
    """A name this package only uses while writing (``.NAME.RANDOM.tmp``): left behind by a killed run."""
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def _only_leftovers(folder: Path) -> bool:
    """True for an empty folder and for one holding only leftovers, at any depth."""
    return all(
        _is_leftover(entry) or (entry.is_dir() and not entry.is_symlink() and _only_leftovers(entry))
        for entry in folder.iterdir()
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clear_leftovers(path: Path, unfinished: bool) -> None:
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*{TEMPORARY_SUFFIX}") if _is_leftover(p)]
    if unfinished:
        stale += list(path.iterdir())
    for entry in stale:
        log.info("removing %s, left unfinished by an interrupted run", entry)
        _remove(entry)


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a new temporary folder beside ``folder`` to fill; if the block succeeds it takes ``folder``'s
    place by renaming (an old ``folder``, allowed by ``prepare_output``, is moved aside first and removed
    after), else it is removed. ``folder`` is thus whole or as it was, never half-written."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
    staging.mkdir()
    try:
        yield staging
        if folder.exists():
            old = folder.parent / f".{folder.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
            os.replace(folder, old)
            os.replace(staging, folder)
            _remove(old)
        else:
            os.replace(staging, folder)
    finally:
        if staging.exists():
            _remove(staging)


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors' names and values, independent of the order they are held in."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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
            tensors = safetensors.torch.load_file(str(path))
        except Exception as err:  # noqa: BLE001  safetensors raises its own error types for any malformed header
            raise InputError(f"{path} is not a readable safetensors file ({shorten(str(err))})") from None
        if not tensors:
            raise InputError(f"{path} holds no tensors, so it is not a model")
        return tensors
    return flatten_state_dict(_torch_load(path), path)


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


def flatten_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint, unwrapped from the usual wrapper keys and module prefixes."""
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
