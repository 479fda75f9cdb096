#!/usr/bin/env python3
"""A demo internal pool member: a mutual-TLS echo server (edge.demo.EchoMember).

    python echo-pool.py --listen 127.0.0.1:15062 --cert pool/fe1.corp.example.pem \\
        --key pool/fe1.corp.example.key --client-root pool/enterprise-root.pem

It presents `--cert` (which must name the member's topology host), requires a
client certificate chaining to `--client-root` (the edge's internal
certificate) and echoes every byte back. Used by deploy/compose (inside the
edge image, which carries the `edge` package) and by
deploy/ci/container-test.sh (on the host). Stops on SIGTERM/SIGINT, also as a
container's PID 1 (which gets no default signal handling).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edge.demo import EchoMember


async def serve(member: EchoMember, host: str, port: int, name: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(member.serve, host, port)
            print(f"echo-pool: {name} listening on {host}:{bound}", flush=True)
            async for signum in signals:
                print(f"echo-pool: {signal.Signals(signum).name}, stopping", flush=True)
                nursery.cancel_scope.cancel()
                break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT")
    parser.add_argument("--cert", type=Path, required=True, help="chain, leaf first (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    parser.add_argument("--client-root", type=Path, required=True, help="root for the edge's cert")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    chain = x509.load_pem_x509_certificates(args.cert.read_bytes())
    key = load_pem_private_key(args.key.read_bytes(), password=None)
    roots = x509.load_pem_x509_certificates(args.client_root.read_bytes())
    member = EchoMember(chain, key, roots)  # type: ignore[arg-type]  # an EC key, by make-certs
    names = chain[0].subject.rfc4514_string()
    trio.run(serve, member, host.strip("[]"), int(port), names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
