"""Layer 7: what a thief or a forger does: removal attacks, forgeries, chains of them, free disguises.

Uses the verifier's own reading and defence (layer 6) so that the attack grid and ``verify`` agree.
"""
