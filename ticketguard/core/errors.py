"""The one exception type for bad user input; the CLI prints it as a sentence and exits with status 2."""


class InputError(ValueError):
    """Input that ticketguard refuses: the message says what was wrong and what to do."""
