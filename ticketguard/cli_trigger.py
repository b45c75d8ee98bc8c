"""CLI commands of the trigger-set scheme, merged into the ticketguard app by cli.py."""

from __future__ import annotations

import typer

commands = typer.Typer()
