"""The version every artifact records: kept at the bottom so that writers need not import the whole package."""

__version__ = "0.1.0"
