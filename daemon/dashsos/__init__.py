"""dashsos: an emergency recorder for cars."""

__version__ = "0.1.0"
