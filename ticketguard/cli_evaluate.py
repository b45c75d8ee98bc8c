"""CLI commands for attacks, the evaluation harness and the demo, merged into the ticketguard app by cli.py."""

from __future__ import annotations

import typer

commands = typer.Typer()
