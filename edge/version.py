"""The running edge's version and build facts (`edge --version`, `edge_build_info`).

Owns: reading the installed distribution's version with ``importlib.metadata``
(the one number pyproject.toml sets) and naming the OpenSSL that does the TLS
(the one cryptography links, which pyOpenSSL uses; not Python's ``ssl``).

Must never: import trio, sockets or the gateway (``edge --version`` must be
instant and work on a broken configuration).
"""

from __future__ import annotations

import importlib.metadata
import platform

__all__ = ["DISTRIBUTION", "build_info", "version"]

DISTRIBUTION = "edge-federation-gateway"


def version() -> str:
    """The installed version; ``0+unknown`` when run from a tree that was never installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_info() -> dict[str, str]:
    """``version``, ``python`` and ``openssl``: the labels of ``edge_build_info``."""
    from cryptography.hazmat.backends.openssl.backend import backend

    return {
        "version": version(),
        "python": platform.python_version(),
        "openssl": str(backend.openssl_version_text()),
    }
