"""Options generated from settings dataclasses: names, defaults, conversions and help come from the fields."""

from dataclasses import dataclass, field, fields
from typing import Annotated, Any

import pytest
import typer

from ticketguard.cli.app import app
from ticketguard.cli.options import DataChoice, RunOptions
from ticketguard.cli.settings import Settings, expand_settings
from ticketguard.core.errors import InputError
from ticketguard.core.settings import setting
from ticketguard.protect import SignatureConfig, TriggerConfig, TriggerSource
from ticketguard.search.config import SearchConfig
from ticketguard.training.loop import TrainConfig
from ticketguard.verification.blackbox import Endpoint


@dataclass(frozen=True)
class Toy:
    name: str = setting(help="A name.")
    rate: float = setting(0.01, help="A rate in points.", percent=True)
    sizes: tuple[int, ...] = setting((), help="Sizes.")
    tags: tuple[str, ...] = setting((), metavar="TAG", help="Tags.")
    loud: bool = setting(False, help="Be loud.")
    limit: int | None = setting(None, help="A limit.")


@dataclass(frozen=True)
class Undocumented:
    size: int = field(default=1)


ALL = Annotated[dict[str, Any], Settings(Toy)]
FOLLOWING = Annotated[dict[str, Any], Settings(Toy, ("rate", "limit"), follow="the ticket's")]
RENAMED = Annotated[
    dict[str, Any], Settings(Toy, ("name", "limit"), optional=True, prefix="toy", flags={"name": ("--title", "--name")})
]


def _command(marker: Any) -> tuple[Any, dict[str, Any]]:
    """A one-command app that records the settings it was given."""
    seen: dict[str, Any] = {}
    toy_app = typer.Typer()

    def toy(*, given: Any) -> None:
        seen.update(given if isinstance(given, dict) else {"made": given})

    toy.__annotations__ = {"given": marker, "return": None}
    toy_app.command()(expand_settings(toy))
    return typer.main.get_command(toy_app), seen


def _run(marker: Any, argv: list[str]) -> dict[str, Any]:
    command, seen = _command(marker)
    command.main(argv, standalone_mode=False)
    return seen


def _help(command: Any, name: str) -> str:
    return next(p.help for p in command.params if p.name == name)


def test_options_take_the_fields_defaults_and_leave_out_what_is_not_given() -> None:
    assert _run(ALL, ["--name", "x"]) == {"name": "x", "rate": 0.01, "loud": False}


def test_options_convert_percent_lists_and_switches() -> None:
    given = _run(ALL, ["--name", "x", "--rate", "5", "--sizes", "1,2", "--tags", "a", "--tags", "b", "--loud",
                       "--limit", "3"])
    assert given == {"name": "x", "rate": 0.05, "sizes": (1, 2), "tags": ("a", "b"), "loud": True, "limit": 3}
    with pytest.raises(InputError, match="--sizes must be comma-separated integers"):
        _run(ALL, ["--name", "x", "--sizes", "1,x"])


def test_a_field_without_a_default_is_a_required_option(capsys: pytest.CaptureFixture[str]) -> None:
    command, seen = _command(ALL)
    with pytest.raises(SystemExit) as exit_:
        command.main([], prog_name="toy")
    assert exit_.value.code == 2 and "Missing option '--name'" in capsys.readouterr().err and not seen


def test_following_options_give_only_what_is_given_and_say_what_they_follow() -> None:
    assert _run(FOLLOWING, []) == {}
    assert _run(FOLLOWING, ["--rate", "2"]) == {"rate": 0.02}
    command, _ = _command(FOLLOWING)
    assert _help(command, "rate") == "A rate in points (default: the ticket's, else 1)."


def test_renamed_options_take_their_old_names_too() -> None:
    assert _run(RENAMED, []) == {}
    assert _run(RENAMED, ["--name", "x", "--toy-limit", "4"]) == {"name": "x", "limit": 4}
    command, _ = _command(RENAMED)
    assert _help(command, "title") == "A name (--name is the old name)."
    assert _help(command, "toy_limit") == "A limit."


def test_a_parameter_annotated_with_the_settings_class_gets_the_dataclass() -> None:
    made = _run(Annotated[Toy, Settings(Toy, ("name", "limit"))], ["--name", "x"])["made"]
    assert made == Toy(name="x")


def test_a_setting_without_help_is_refused() -> None:
    with pytest.raises(TypeError, match="has no help"):
        _command(Annotated[dict[str, Any], Settings(Undocumented)])


@pytest.mark.parametrize(
    "config",
    [SearchConfig, TrainConfig, SignatureConfig, TriggerConfig, TriggerSource, DataChoice, RunOptions, Endpoint],
)
def test_every_setting_states_its_help(config: type) -> None:
    assert all(f.metadata["help"].endswith(".") for f in fields(config))


def test_find_offers_every_search_setting_with_the_fields_help() -> None:
    find = typer.main.get_command(app).commands["find"]
    offered = {p.name: p.help for p in find.params}
    for setting_field in fields(SearchConfig):
        if setting_field.name != "train":
            assert offered[setting_field.name].startswith(setting_field.metadata["help"].rstrip("."))


def test_shared_options_keep_their_flags_and_defaults() -> None:
    protect = {p.name: p for p in typer.main.get_command(app).commands["protect"].params}
    assert protect["json"].opts == ["--json"] and protect["json"].is_flag and not protect["json"].secondary_opts
    assert protect["trust_code"].opts == ["--trust-code"] and protect["force"].default is False
    assert protect["device"].default == "auto" and protect["alpha"].default == RunOptions.alpha
    assert protect["data"].default is None and protect["data_dir"].opts == ["--data-dir"]
