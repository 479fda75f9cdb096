"""The sans-I/O core: every decision the gateway makes, and none of its I/O.

Owns: configuration (schema, validation, PEM/DER loading), partner policies,
certificate verification and authorization, the immutable snapshot and its
diff, reason codes, admission limits, PROXY v2 encoding.

Must never: import trio, socket, `OpenSSL.SSL`, prometheus_client, h11, httpx
or dnspython, or import anything from the shell (`edge.*` outside
`edge.core`). `tests/test_architecture.py` walks the imports and fails if a
module here does. The shell (listeners, TLS streams, pools, metrics, the CLI)
imports the core, never the reverse.
"""
