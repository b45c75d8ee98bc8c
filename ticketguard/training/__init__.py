"""Layer 3: training a (masked) network: the loop, the mask keeper, multi-process runs.

Imports only ``core``, ``models`` and ``data``.
"""
