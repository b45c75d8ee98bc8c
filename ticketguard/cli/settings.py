"""Command-line options generated from settings dataclasses, so that a setting's name, type, default and help
are written once, on its field (``core.settings.setting``).

A command asks for a group of options with a parameter annotated ``Annotated[dict[str, Any], Settings(...)]``
and the ``expand_settings`` decorator: the parameter becomes one option per field, and the command gets the
values given, by field name, ready for the dataclass. Annotated with the dataclass itself
(``Annotated[Config, Settings(Config)]``), the parameter gets the dataclass made from them.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from ticketguard.core.errors import InputError

SCALARS = (bool, int, float, str, Path)


@dataclass(frozen=True)
class Settings:
    """Options for the fields ``names`` of ``config`` (by default every field the command line can give).

    ``follow``: every option defaults to None, which leaves the setting to ``follow`` (e.g. "the ticket's"), and
    only the values given reach the command. ``optional``: a field without a default may be left out too.
    ``prefix`` goes before each option's name; ``flags`` names a field's option where the name differs, the
    first being its name and the others old names it still takes. A switch is an on/off pair (``--x/--no-x``)
    unless ``flags`` names it.
    """

    config: type
    names: tuple[str, ...] = ()
    follow: str | None = None
    optional: bool = False
    prefix: str = ""
    flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Option:
    """One generated option: the field it gives, its command parameter, and how its text becomes the value."""

    field_name: str
    parameter: inspect.Parameter
    parse: Callable[[Any], Any]


def expand_settings(command: Callable[..., None]) -> Callable[..., None]:
    """The command with each ``Settings`` parameter replaced by its options; the command gets a dict of the
    settings given (options left at None are left out, so the dataclass's defaults apply), or the dataclass
    made from them where the parameter is annotated with it."""
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, tuple[list[_Option], Callable[..., Any]]] = {}
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        settings = _settings_of(parameter.annotation)
        if settings is None:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        else:
            options = _options(settings)
            make = settings.config if typing.get_args(parameter.annotation)[0] is settings.config else dict
            groups[parameter.name] = (options, make)
            parameters.extend(option.parameter for option in options)
    names = [parameter.name for parameter in parameters] + list(groups)
    if len(set(names)) != len(names):
        raise TypeError(f"{command.__name__} would get two parameters of one name: {sorted(names)}")

    @functools.wraps(command)
    def run(**given: Any) -> None:
        for group, (options, make) in groups.items():
            values = {option.field_name: option.parse(given.pop(option.parameter.name)) for option in options}
            given[group] = make(**{name: value for name, value in values.items() if value is not None})
        command(**given)

    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return run


def _settings_of(annotation: Any) -> Settings | None:
    if typing.get_origin(annotation) is not Annotated:
        return None
    return next((extra for extra in annotation.__metadata__ if isinstance(extra, Settings)), None)


def _options(settings: Settings) -> list[_Option]:
    hints = typing.get_type_hints(settings.config)
    by_name = {f.name: f for f in fields(settings.config)}
    names = settings.names or tuple(name for name in by_name if _offerable(hints[name]))
    return [_option(settings, by_name[name], hints[name]) for name in names]


def _offerable(hint: Any) -> bool:
    kind = _without_none(hint)
    return kind in SCALARS or (typing.get_origin(kind) is tuple and typing.get_args(kind)[0] in SCALARS)


def _without_none(hint: Any) -> Any:
    """``X`` of ``X | None``; any other type as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        return kinds[0] if len(kinds) == 1 else hint
    return hint


def _option(settings: Settings, setting: Field, hint: Any) -> _Option:
    if "help" not in setting.metadata:
        raise TypeError(f"{settings.config.__name__}.{setting.name} has no help; declare it with setting()")
    kind = _without_none(hint)
    flags = settings.flags.get(setting.name) or (_flag(settings.prefix, setting.name),)
    name = flags[0].lstrip("-").replace("-", "_")
    if typing.get_origin(kind) is tuple:  # a list: the option is left out unless given
        default: Any = None
        element = typing.get_args(kind)[0]
        if element is str:
            annotation: Any = list[str] | None
            parse: Callable[[Any], Any] = _repeated
        else:
            annotation = str | None
            parse = functools.partial(_comma_separated, element, flags[0])
    elif kind in SCALARS:
        default = _cli_default(settings, setting)
        annotation = kind if default not in (None, inspect.Parameter.empty) else kind | None
        parse = _from_percent if setting.metadata.get("percent") else _identity
        if kind is bool and setting.name not in settings.flags:  # a switch named in flags is that flag alone
            flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
    else:
        raise TypeError(f"the command line cannot give {settings.config.__name__}.{setting.name} ({hint})")
    help_text = _help(settings, setting, flags[1:], repeated=parse is _repeated)
    option = typer.Option(*flags, help=help_text, metavar=setting.metadata.get("metavar"))
    parameter = inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )
    return _Option(setting.name, parameter, parse)


def _flag(prefix: str, name: str) -> str:
    return "--" + "-".join(part for part in (prefix, name.replace("_", "-")) if part)


def _cli_default(settings: Settings, setting: Field) -> Any:
    """None where the setting follows something else; the field's default, as shown, otherwise."""
    if settings.follow is not None:
        return None
    if setting.default is MISSING:
        return None if settings.optional else inspect.Parameter.empty
    return _shown(setting, setting.default)


def _shown(setting: Field, value: Any) -> Any:
    """A value as people read and give it: a fraction the field declares ``percent`` in percent."""
    return 100 * value if setting.metadata.get("percent") and value is not None else value


def _help(settings: Settings, setting: Field, old_flags: tuple[str, ...], repeated: bool) -> str:
    """The field's help, with where the default comes from and the old names the option still takes."""
    notes = [f"{old} is the old name" for old in old_flags]
    if settings.follow is not None:
        fallback = None if setting.default is MISSING else _shown(setting, setting.default)
        notes.insert(0, f"default: {settings.follow}" + ("" if fallback is None else f", else {_text(fallback)}"))
    text = setting.metadata["help"]
    if notes:
        text = f"{text.rstrip('.')} ({'; '.join(notes)})."
    return f"{text} Repeatable." if repeated else text


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _identity(value: Any) -> Any:
    return value


def _from_percent(value: float | None) -> float | None:
    return None if value is None else value / 100


def _repeated(values: list[str] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(values)


def _comma_separated(element: type, flag: str, text: str | None) -> tuple[Any, ...] | None:
    if text is None:
        return None
    try:
        return tuple(element(part) for part in text.split(","))
    except ValueError:
        kind = "integers" if element is int else "numbers"
        raise InputError(f"{flag} must be comma-separated {kind}, got {text!r}") from None
