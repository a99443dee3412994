"""The single source of decomm's version number (read by setup.py and the package)."""

__version__ = "0.1.0"
