"""Attack chains as written on the command line, e.g. ``magnitude:fraction=0.2+finetune:epochs=1``: parsing,
each parameter checked against the attack's own signature, and the run, one attack after another."""

from __future__ import annotations

import contextlib
import inspect
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ticketguard.attacks.removal import ATTACKS, Weights
from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask


@dataclass(frozen=True)
class Step:
    """One attack of a chain with its own parameters (context such as data or the claim is added later)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.params.items())])


def _parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of attack ``name`` with their declared types (``float | None`` -> float)."""
    attack = ATTACKS[name]
    hints = typing.get_type_hints(attack)
    declared = {}
    for parameter in set(inspect.signature(attack).parameters) - {"weights", "mask"}:
        if typing.get_origin(hints[parameter]) is typing.Literal:  # a choice of words: the attack checks it
            declared[parameter] = str
            continue
        kinds = [k for k in typing.get_args(hints[parameter]) if k is not type(None)] or [hints[parameter]]
        declared[parameter] = kinds[0]
    return declared


_PLAIN = {bool: "true or false", int: "an integer", float: "a finite number", str: "text"}


def _convert(name: str, key: str, text: str, kind: Any) -> Any:
    """A spec's ``key=text`` as the type the attack declares; anything else is refused in one sentence."""
    if kind not in _PLAIN:
        raise InputError(f"attack {name!r} takes {key} from the command's options (--claim, --data)")
    value = None
    if kind is bool:
        value = {"true": True, "false": False}.get(text.lower())
    else:
        with contextlib.suppress(ValueError):
            value = kind(text)
    if value is None:
        raise InputError(f"attack parameter {key}={text!r} of {name!r} must be {_PLAIN[kind]}")
    return _checked(name, key, value, kind)


def _checked(name: str, key: str, value: Any, kind: Any) -> Any:
    """``value`` if it has the declared plain type (an int serves as a float); data and devices pass."""
    if kind not in _PLAIN:
        return value
    fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not fits:
        raise InputError(f"attack parameter {key} of {name!r} must be {_PLAIN[kind]}, got {value!r}")
    return value


def parse_chain(text: str) -> list[Step]:
    """``magnitude:fraction=0.1+finetune:epochs=2`` -> two steps, run left to right; each value is read as the
    type its attack declares."""
    steps = []
    for part in text.split("+"):
        name, *pairs = part.strip().split(":")
        if name not in ATTACKS:
            raise InputError(f"unknown attack {name!r}; choose one of: {', '.join(ATTACKS)}")
        declared = _parameters(name)
        params = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise InputError(
                    f"attack parameter {pair!r} of {name!r} must read key=value, e.g. fraction=0.2"
                )
            if key not in declared:
                raise InputError(
                    f"attack {name!r} takes no parameter {key}; it takes: {', '.join(sorted(declared))}"
                )
            params[key] = _convert(name, key, value, declared[key])
        steps.append(Step(name, params))
    return steps


def run_step(
    weights: Mapping[str, torch.Tensor], mask: Mask, step: Step, context: Mapping[str, Any] | None = None
) -> tuple[Weights, Mask]:
    """Run one attack with its parameters plus whatever of ``context`` (data, signature, key_density,
    threshold, device) it takes; an unknown parameter, or one of another type than declared, is refused."""
    if step.name not in ATTACKS:
        raise InputError(f"unknown attack {step.name!r}; choose one of: {', '.join(ATTACKS)}")
    attack, declared = ATTACKS[step.name], _parameters(step.name)
    unknown = set(step.params) - set(declared)
    if unknown:
        raise InputError(
            f"attack {step.name!r} takes no parameter {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(declared))}"
        )
    extra = {k: v for k, v in (context or {}).items() if k in declared and k not in step.params}
    needed = [
        p.name
        for p in inspect.signature(attack).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.name not in step.params
        and p.name not in extra
    ]
    if needed:
        option = needed[0].replace("_", "-")
        raise InputError(
            f"attack {step.name!r} needs {', '.join(needed)}: give --{option} or {needed[0]}=VALUE"
        )
    given = {**step.params, **extra}
    for key, value in given.items():
        if value is not None:
            _checked(step.name, key, value, declared[key])
    return attack(weights, mask, **given)


def chain(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    steps: list[Step],
    context: Mapping[str, Any] | None = None,
) -> tuple[Weights, Mask]:
    """Attacks one after another, e.g. prune 10 % then fine-tune."""
    result, current = dict(weights), mask
    for step in steps:
        result, current = run_step(result, current, step, context)
    return result, current


def attack(
    weights: Mapping[str, torch.Tensor], mask: Mask, spec: str, **context: Any
) -> tuple[Weights, Mask]:
    """Run an attack chain written as on the command line, e.g. ``"magnitude:fraction=0.2+finetune:epochs=1"``;
    ``context`` supplies what attacks may need (data, signature, threshold, device, ...)."""
    return chain(weights, mask, parse_chain(spec), context)
