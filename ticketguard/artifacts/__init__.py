"""Layer 4: what is written and read: the ticket folder, and a suspect model in every form it ships.

Imports ``core``, ``models``, ``data`` and ``training`` (a ticket records the config it was trained with).
"""
