"""Layer 9: whole stories built from the library: the attack harness, its report, the paper's numbers,
the demo, and ``reproduce``.
"""
