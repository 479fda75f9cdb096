"""The image's HEALTHCHECK: GET /healthz on the gateway's own [metrics] address.

Reads the same configuration file the gateway runs with ($EDGE_CONFIG, as the
image sets it), so moving `[metrics] address` to another port does not leave a
health check polling the old one. A wildcard bind (0.0.0.0, ::) is checked on
loopback. Standard library only; writes nothing (the root filesystem is
read-only). Exit 0 healthy, 1 anything else, with one line saying why.
"""

import os
import sys
import tomllib
import urllib.request


def main() -> int:
    config = os.environ.get("EDGE_CONFIG", "/etc/edge/edge.toml")
    try:
        with open(config, "rb") as f:
            address = tomllib.load(f)["metrics"]["address"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        print(f"unhealthy: {config}: no [metrics] address to check ({exc})")
        return 1
    host, _, port = str(address).rpartition(":")
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status = response.status
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(f"{'healthy' if status == 200 else 'unhealthy'}: {url}: HTTP {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
