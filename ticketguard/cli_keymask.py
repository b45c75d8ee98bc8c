"""CLI commands of the keymask scheme, merged into the ticketguard app by cli.py."""

from __future__ import annotations

import typer

commands = typer.Typer()
