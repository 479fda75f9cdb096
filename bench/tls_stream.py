"""edge.tls.TLSStream against trio.SSLStream: one-stream throughput and handshake rate.

Both stacks run in this one process over real loopback TCP (127.0.0.1), on the
same ECDSA P-256 certificates (root -> intermediate -> leaf, from edge.pki),
with mutual TLS and a fresh TCP connection per handshake. Rounds alternate
between the two stacks so that machine noise hits both alike.

Because client and server share the process, wall time understates the cost
of each side; CPU time (time.process_time, both ends together) per MiB and per
handshake is printed too.

    python bench/tls_stream.py            # ~1-2 minutes
    python bench/tls_stream.py --quick    # < 60 s
    python bench/tls_stream.py --only ours --rounds 1   # e.g. under a profiler
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import OpenSSL
import trio
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from edge.pki import CA
from edge.tls import TLSStream, client_context, server_context

MiB = 1024 * 1024
_OURS_OPENSSL = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
SEND_CHUNK = 1 * MiB
Opener = Callable[[trio.SocketStream, trio.SocketStream], tuple[trio.abc.Stream, trio.abc.Stream]]


@dataclass
class Stack:
    """How to wrap a (server, client) TCP pair in TLS, and how to handshake."""

    name: str
    wrap: Opener
    handshake: Callable[[trio.abc.Stream], Awaitable[None]]
    describe: Callable[[trio.abc.Stream], str]


@dataclass
class Results:
    mb_per_s: list[float] = field(default_factory=list)
    cpu_ms_per_mib: list[float] = field(default_factory=list)
    handshakes_per_s: list[float] = field(default_factory=list)
    cpu_ms_per_handshake: list[float] = field(default_factory=list)


def build_stacks(directory: Path) -> list[Stack]:
    root = CA.root("Bench Root")
    issuing = root.intermediate("Bench Issuing CA", path_length=0)
    server_leaf = issuing.issue(dns=["localhost"])
    client_leaf = issuing.issue(dns=["client.bench.example"])
    root_file = directory / "root.pem"
    root_file.write_bytes(root.cert.public_bytes(Encoding.PEM))
    server_cert, server_key = server_leaf.write(directory, "server")
    client_cert, client_key = client_leaf.write(directory, "client")

    ours_server = server_context(
        list(server_leaf.chain),
        server_leaf.key,
        require_client_cert=True,
        client_ca_names=[root.cert],
    )
    ours_client = client_context([root.cert], list(client_leaf.chain), client_leaf.key)

    def wrap_ours(
        server_tcp: trio.SocketStream, client_tcp: trio.SocketStream
    ) -> tuple[trio.abc.Stream, trio.abc.Stream]:
        return (
            TLSStream(server_tcp, ours_server, server_side=True),
            TLSStream(client_tcp, ours_client, server_side=False, server_hostname="localhost"),
        )

    async def handshake_ours(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, TLSStream)
        await stream.do_handshake()

    def describe_ours(stream: trio.abc.Stream) -> str:
        assert isinstance(stream, TLSStream)
        return (
            f"{stream.version} {stream.cipher} (pyOpenSSL {OpenSSL.__version__}, {_OURS_OPENSSL})"
        )

    stdlib_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stdlib_server.load_cert_chain(str(server_cert), str(server_key))
    stdlib_server.load_verify_locations(cafile=str(root_file))
    stdlib_server.verify_mode = ssl.CERT_REQUIRED
    stdlib_client = ssl.create_default_context(cafile=str(root_file))
    stdlib_client.load_cert_chain(str(client_cert), str(client_key))

    def wrap_trio(
        server_tcp: trio.SocketStream, client_tcp: trio.SocketStream
    ) -> tuple[trio.abc.Stream, trio.abc.Stream]:
        return (
            trio.SSLStream(server_tcp, stdlib_server, server_side=True),
            trio.SSLStream(client_tcp, stdlib_client, server_hostname="localhost"),
        )

    async def handshake_trio(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, trio.SSLStream)
        await stream.do_handshake()

    def describe_trio(stream: trio.abc.Stream) -> str:
        assert isinstance(stream, trio.SSLStream)
        cipher = stream.cipher()
        name = cipher[0] if cipher else None
        return f"{stream.version()} {name} (stdlib ssl, {ssl.OPENSSL_VERSION})"

    return [
        Stack("ours", wrap_ours, handshake_ours, describe_ours),
        Stack("trio", wrap_trio, handshake_trio, describe_trio),
    ]


async def tcp_pair(
    listener: trio.SocketListener, port: int
) -> tuple[trio.SocketStream, trio.SocketStream]:
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    return server, client


async def handshake_pair(stack: Stack, server: trio.abc.Stream, client: trio.abc.Stream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stack.handshake, server)
        nursery.start_soon(stack.handshake, client)


async def throughput_round(
    stack: Stack, listener: trio.SocketListener, port: int, total: int
) -> tuple[float, float, str]:
    """(MB/s, CPU ms per MiB, description) for ``total`` bytes client -> server."""
    server, client = stack.wrap(*await tcp_pair(listener, port))
    payload = bytes(SEND_CHUNK)
    try:
        await handshake_pair(stack, server, client)
        description = stack.describe(client)
        received = 0

        async def sink() -> None:
            nonlocal received
            while received < total:
                data = await server.receive_some()
                if not data:
                    raise RuntimeError("stream ended early")
                received += len(data)

        async def source() -> None:
            for _ in range(total // SEND_CHUNK):
                await client.send_all(payload)

        wall0, cpu0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink)
            nursery.start_soon(source)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        assert received == total
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)
    return total / wall / 1e6, cpu * 1000 / (total / MiB), description


async def handshake_round(
    stack: Stack, listener: trio.SocketListener, port: int, seconds: float, limit: int
) -> tuple[float, float]:
    """(handshakes per second, CPU ms per handshake, both ends): fresh TCP each time."""
    count = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    deadline = wall0 + seconds
    while count < limit and time.perf_counter() < deadline:
        server, client = stack.wrap(*await tcp_pair(listener, port))
        try:
            await handshake_pair(stack, server, client)
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)
        count += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return count / wall, cpu * 1000 / count


def summary(values: list[float]) -> str:
    return f"best {max(values):9.1f}  median {statistics.median(values):9.1f}"


def summary_low(values: list[float]) -> str:
    return f"best {min(values):9.3f}  median {statistics.median(values):9.3f}"


async def main(args: argparse.Namespace) -> int:
    stop_at = time.perf_counter() + args.budget
    with tempfile.TemporaryDirectory() as tmp:
        stacks = [s for s in build_stacks(Path(tmp)) if args.only in (None, s.name)]
        results = {s.name: Results() for s in stacks}
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listener = listeners[0]
        port = listener.socket.getsockname()[1]
        total = args.mib * MiB
        print(f"throughput: {args.mib} MiB one way per round, {args.rounds} rounds per stack")
        for round_no in range(args.rounds):
            for stack in stacks:
                if time.perf_counter() > stop_at:
                    break
                with trio.fail_after(60):
                    mbps, cpu, description = await throughput_round(stack, listener, port, total)
                if round_no == 0:
                    print(f"  {stack.name}: {description}")
                results[stack.name].mb_per_s.append(mbps)
                results[stack.name].cpu_ms_per_mib.append(cpu)
        print(
            f"handshakes: {args.seconds} s (at most {args.limit}) per round, {args.rounds} rounds"
        )
        for _ in range(args.rounds):
            for stack in stacks:
                if time.perf_counter() > stop_at:
                    break
                with trio.fail_after(60):
                    rate, cpu = await handshake_round(
                        stack, listener, port, args.seconds, args.limit
                    )
                results[stack.name].handshakes_per_s.append(rate)
                results[stack.name].cpu_ms_per_handshake.append(cpu)
        await listener.aclose()

    print()
    for name, r in results.items():
        if not r.mb_per_s or not r.handshakes_per_s:
            print(f"{name}: time budget ran out before a full round")
            continue
        print(f"{name}:")
        print(f"  throughput        MB/s        {summary(r.mb_per_s)}")
        print(f"  CPU per MiB       ms          {summary_low(r.cpu_ms_per_mib)}")
        print(f"  handshakes        per second  {summary(r.handshakes_per_s)}")
        print(f"  CPU per handshake ms          {summary_low(r.cpu_ms_per_handshake)}")
    if {"ours", "trio"} <= results.keys():
        ours, theirs = results["ours"], results["trio"]
        if ours.mb_per_s and theirs.mb_per_s and ours.handshakes_per_s and theirs.handshakes_per_s:
            med = statistics.median
            print()
            print("ratio ours/trio (higher is better for ours; CPU ratios: trio/ours)")
            print(
                f"  throughput  best {max(ours.mb_per_s) / max(theirs.mb_per_s):.2f}"
                f"  median {med(ours.mb_per_s) / med(theirs.mb_per_s):.2f}"
                f"   CPU/MiB median {med(theirs.cpu_ms_per_mib) / med(ours.cpu_ms_per_mib):.2f}"
            )
            hs_ours, hs_theirs = ours.handshakes_per_s, theirs.handshakes_per_s
            print(
                f"  handshakes  best {max(hs_ours) / max(hs_theirs):.2f}"
                f"  median {med(hs_ours) / med(hs_theirs):.2f}"
                f"   CPU/handshake median "
                f"{med(theirs.cpu_ms_per_handshake) / med(ours.cpu_ms_per_handshake):.2f}"
            )
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run, well under 60 s")
    parser.add_argument("--rounds", type=int, help="rounds per stack and measure")
    parser.add_argument("--mib", type=int, help="MiB sent one way per throughput round")
    parser.add_argument("--seconds", type=float, help="seconds per handshake round")
    parser.add_argument("--limit", type=int, default=5000, help="max handshakes per round")
    parser.add_argument("--budget", type=float, help="stop starting rounds after this many s")
    parser.add_argument("--only", choices=["ours", "trio"], help="measure one stack only")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (3 if quick else 5)
    args.mib = args.mib or (64 if quick else 256)
    args.seconds = args.seconds or (1.0 if quick else 3.0)
    args.budget = args.budget or (40.0 if quick else 240.0)
    return args


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args(sys.argv[1:])))
