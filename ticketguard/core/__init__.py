"""Layer 1, the ground floor: errors, safe files and JSON, the Mask, statistics, threads, the version.

Nothing here imports another ticketguard layer; every layer above may import it.
"""
