"""The command-line wing: parses options, calls the library, prints results (stdout) and progress (stderr)."""

from ticketguard.cli.app import app, main, run

__all__ = ["app", "main", "run"]
