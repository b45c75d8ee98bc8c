"""Layer 5: finding an extreme ticket (IMP with late rewinding and a ratio schedule) or adopting one.

Imports the layers below it; beside ``schemes``, neither imports the other.
"""
