"""The ``ticketguard`` command: one typer app gathering the command groups; bad input is one line, exit 2."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.logging import RichHandler

from ticketguard.cli import blackbox, evaluate, keymask, protect, reproduce, ticket, verify
from ticketguard.cli.output import console
from ticketguard.core.errors import InputError
from ticketguard.core.version import __version__

app = typer.Typer(
    help="Find extremely sparse winning lottery tickets and prove that they are yours.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags show as flags, not as "--json <bool>"
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"ticketguard {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Find extremely sparse winning lottery tickets and prove that they are yours.

    Verifying commands exit 0 when ownership is shown, 1 when it is not, 2 on bad input.
    """


for group in (ticket, protect, verify, blackbox, keymask, evaluate, reproduce):
    app.registered_commands += group.commands.registered_commands


def main(argv: list[str] | None = None) -> int:
    """Run the app; bad input becomes one line on stderr and exit status 2, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    try:
        app(args=argv, prog_name="ticketguard")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    except InputError as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except OSError as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 1
    return 0


def run() -> None:
    sys.exit(main())
