"""Models named by import path: ``package.module:factory`` or ``package.module:factory(key=value, ...)``.

Any architecture a user has can be named this way (``torchvision.models:resnet18(num_classes=10)``, a module of
their own), and a ticket records the name so that later commands rebuild the model. Importing a module and
calling a factory runs that code, and a ticket folder or a claim is input like any other: a name written in one
must not be enough to run code. A spec is therefore imported only once trusted, by the user naming it (``--model``,
a Python call such as ``SearchConfig(model=...)``) or accepting a recorded one (``--trust-code``,
``trust_model_code``). The keyword arguments are parsed as Python literals, never evaluated.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ticketguard.core.errors import InputError

MAX_SPEC_LENGTH = 500
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_trusted: set[str] = set()


@dataclass(frozen=True)
class ModelSpec:
    """A parsed import path: the module, the factory's attribute path in it and the literal keyword arguments."""

    text: str
    module: str
    factory: str
    kwargs: tuple[tuple[str, Any], ...]


def is_import_path(name: str) -> bool:
    """Registered names never contain a colon; import paths always do."""
    return ":" in name


def parse_spec(text: str) -> ModelSpec:
    """Parse ``module:factory(key=literal, ...)``; InputError with the expected form otherwise."""
    form = "expected package.module:factory or package.module:factory(key=value, ...)"
    if not isinstance(text, str) or len(text) > MAX_SPEC_LENGTH or text.count(":") < 1:
        raise InputError(f"model {str(text)[:80]!r} is neither a registered name nor an import path; {form}")
    module, _, call = text.partition(":")
    if not _MODULE.fullmatch(module.strip()):
        raise InputError(f"model {text!r}: {module!r} is not a module path; {form}")
    try:
        node = ast.parse(call.strip(), mode="eval").body
    except SyntaxError:
        raise InputError(f"model {text!r} cannot be parsed; {form}") from None
    kwargs: list[tuple[str, Any]] = []
    if isinstance(node, ast.Call):
        if node.args or any(k.arg is None for k in node.keywords):
            raise InputError(f"model {text!r}: the factory takes keyword arguments only; {form}")
        try:
            kwargs = [(k.arg, ast.literal_eval(k.value)) for k in node.keywords if k.arg is not None]
        except ValueError:
            raise InputError(f"model {text!r}: keyword values must be Python literals (numbers, strings, "
                             "booleans, None, lists, tuples, dicts)") from None
        node = node.func
    factory = _dotted(node)
    if factory is None:
        raise InputError(f"model {text!r}: {call.strip()!r} is not a factory name; {form}")
    return ModelSpec(text.strip(), module.strip(), factory, tuple(kwargs))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def trust_model_code(spec: str) -> None:
    """Allow ``spec``'s module to be imported and its factory called in this process."""
    _trusted.add(parse_spec(spec).text)


def forget_trusted_code() -> None:
    """Withdraw every trust given in this process: the state a fresh command starts from."""
    _trusted.clear()


def is_trusted(spec: str) -> bool:
    return spec.strip() in _trusted


def build_from_spec(text: str, in_channels: int, num_classes: int) -> nn.Module:
    """Import and call a trusted spec. ``in_channels`` and ``num_classes`` are passed to a factory that has
    parameters of those names and does not set them in the spec, so one factory serves every dataset."""
    spec = parse_spec(text)
    if spec.text not in _trusted:
        raise InputError(
            f"model {spec.text!r} is code named by an import path, and importing it runs that code; if you "
            "trust where the name came from, pass --trust-code (from Python: "
            f"ticketguard.trust_model_code({spec.text!r}))"
        )
    factory = _factory(spec)
    kwargs = dict(spec.kwargs)
    accepted = _parameters(factory)
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if name in accepted and name not in kwargs:
            kwargs[name] = value
    try:
        model = factory(**kwargs)
    except Exception as err:  # noqa: BLE001  the user's code: any failure becomes one clear message
        raise InputError(f"model {spec.text!r} failed to build: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"model {spec.text!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _factory(spec: ModelSpec) -> Callable[..., Any]:
    """The factory, its module found on the Python path or in the current folder (as ``python -m`` would)."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        target: Any = importlib.import_module(spec.module)
    except Exception as err:  # noqa: BLE001  ImportError, or anything the module raises while it runs
        raise InputError(f"model {spec.text!r}: cannot import {spec.module!r} ({type(err).__name__}: {err})") from None
    for part in spec.factory.split("."):
        if not hasattr(target, part):
            raise InputError(f"model {spec.text!r}: {spec.module!r} has no attribute {spec.factory!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"model {spec.text!r}: {spec.factory!r} is not callable")
    return target


def _parameters(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # builtins and some extension types have no signature
        return set()
