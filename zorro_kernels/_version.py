"""The one place the version is written: setup.py reads it as text (no torch import) and both packages export it."""

__version__ = "0.1.0"
