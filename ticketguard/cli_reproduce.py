"""CLI command that reproduces the paper's tables and figures, merged into the ticketguard app by cli.py."""

from __future__ import annotations

import typer

commands = typer.Typer()
