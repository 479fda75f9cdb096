"""Edge federation gateway: per-partner mutual TLS in, mutual TLS to an internal pool."""

import os as _os
from pathlib import Path as _Path

__version__ = "0.1.0"

# OpenSSL reads its configuration once, when it starts (the first import of
# cryptography or pyOpenSSL): point it at ours first. It limits the key-exchange
# groups of every TLS context (see edge/openssl.cnf and edge/tls.py).
_os.environ.setdefault("OPENSSL_CONF", str(_Path(__file__).with_name("openssl.cnf")))
