"""Edge federation gateway: per-partner mutual TLS in, mutual TLS to an internal pool."""

__version__ = "0.1.0"
