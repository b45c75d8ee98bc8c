"""The one exception type for bad user input; the CLI prints it as a sentence and exits with status 2."""


class InputError(ValueError):
    """Input that ticketguard refuses: the message says what was wrong and what to do."""


def shorten(text: str, limit: int = 160) -> str:
    """One line of at most ``limit`` characters: a hostile file must not flood the terminal."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
