"""Layer 6: reading a suspect on its own terms and stating a verdict: claims, alignment, the fingerprint,
the defence, trusted time, disputes, and checks through a model's HTTP API.
"""
