from ticketguard.cli import run

run()
