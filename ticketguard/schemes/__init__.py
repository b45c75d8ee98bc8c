"""Ownership schemes: each one embeds evidence into a ticket, extracts it from a suspect and verifies it."""
