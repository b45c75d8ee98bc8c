"""ticketguard: find extremely sparse winning lottery tickets and prove that they are yours."""

__version__ = "0.1.0"
