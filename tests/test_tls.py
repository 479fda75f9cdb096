"""edge.tls over real loopback TCP: our stream against itself, stdlib ssl and openssl(1).

Every test runs real handshakes on 127.0.0.1 (or ::1) sockets with trustme
certificates (root -> intermediate -> leaf, ECDSA), and every test body is
wrapped in ``trio.fail_after`` so that a hang fails the test instead of CI.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from edge.core.config import _Loader
from edge.core.policies import load_policies
from edge.core.reasons import Reason
from edge.core.trust import PartnerTrust, Verdict
from edge.pki import CA, Leaf
from edge.tls import (
    MOZILLA_INTERMEDIATE_TLS12_CIPHERS,
    HostnameMismatchError,
    TLSError,
    TLSStream,
    TLSTruncatedError,
    client_context,
    handshake_verdict,
    server_context,
)
from tests.conftest import TLSPKI, TLSIdentity
from tests.test_trust import _leaf_under, _resign_weak, _rsa_root

# Generous per-test ceiling: a hang fails in seconds, a slow CI box still passes.
TIMEOUT = 20.0
VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl(1) not installed")


# ----------------------------------------------------------------------
# Helpers


def make_server_ctx(pki: TLSPKI, *, require_client_cert: bool = True) -> SSL.Context:
    return server_context(
        pki.server.chain,
        pki.server.key,
        require_client_cert=require_client_cert,
        client_ca_names=[pki.root],
    )


def make_client_ctx(
    pki: TLSPKI, *, version: str | None = None, with_cert: bool = True
) -> SSL.Context:
    """A fresh client context; ``version`` pins both ends of the range."""
    if with_cert:
        ctx = client_context([pki.root], pki.client.chain, pki.client.key)
    else:
        ctx = client_context([pki.root])
    if version is not None:
        ctx.set_min_proto_version(VERSIONS[version])
        ctx.set_max_proto_version(VERSIONS[version])
    return ctx


async def tcp_pair(host: str = "127.0.0.1") -> tuple[trio.SocketStream, trio.SocketStream]:
    """(server, client) ends of one real loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream(host, port)
        server = await listeners[0].accept()
    finally:
        for listener in listeners:
            await listener.aclose()
    return server, client


async def both(*fns: Callable[[], Awaitable[object]]) -> list[Exception | None]:
    """Run ``fns`` concurrently; return each one's exception (None if it returned)."""
    results: list[Exception | None] = [None] * len(fns)

    async def run(i: int) -> None:
        try:
            await fns[i]()
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(fns)):
            nursery.start_soon(run, i)
    return results


async def tls_pair(
    pki: TLSPKI,
    *,
    version: str | None = None,
    server_ctx: SSL.Context | None = None,
    client_ctx: SSL.Context | None = None,
    server_hostname: str | None = "localhost",
    host: str = "127.0.0.1",
) -> tuple[TLSStream, TLSStream]:
    """(server, client) TLSStreams over loopback TCP, handshake done on both."""
    server_tcp, client_tcp = await tcp_pair(host)
    server = TLSStream(server_tcp, server_ctx or make_server_ctx(pki), server_side=True)
    client = TLSStream(
        client_tcp,
        client_ctx or make_client_ctx(pki, version=version),
        server_side=False,
        server_hostname=server_hostname,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk, f"stream ended after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


async def receive_until_eof(stream: trio.abc.ReceiveStream, limit: int = 1 << 20) -> bytes:
    buf = bytearray()
    while chunk := await stream.receive_some():
        buf += chunk
        assert len(buf) <= limit
    return bytes(buf)


async def close_all(*streams: trio.abc.AsyncResource) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


# ----------------------------------------------------------------------
# Echo, bulk, tiny writes


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_echo_both_ways_over_serve_tcp(tls_pki: TLSPKI, version: str) -> None:
    server_ctx = make_server_ctx(tls_pki)
    server_seen: list[str] = []

    async def handler(transport: trio.SocketStream) -> None:
        async with TLSStream(transport, server_ctx, server_side=True) as stream:
            await stream.do_handshake()
            server_seen.append(stream.version)
            await stream.send_all(b"hello from the server\n")
            while data := await stream.receive_some():
                await stream.send_all(data)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            client = TLSStream(
                transport,
                make_client_ctx(tls_pki, version=version),
                server_side=False,
                server_hostname="localhost",
            )
            async with client:
                await client.do_handshake()
                assert client.version == version
                assert await receive_exactly(client, 22) == b"hello from the server\n"
                for size in (1, 100, 16383, 16384, 16385, 100_000, 300_000):
                    payload = random.randbytes(size)
                    await client.send_all(payload)
                    assert await receive_exactly(client, size) == payload
                await client.send_eof()
                # The server's loop ends on our close_notify; its aclose sends its own.
                assert await client.receive_some() == b""
            nursery.cancel_scope.cancel()
    assert server_seen == [version]


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_64_mib_each_way_at_the_same_time(tls_pki: TLSPKI, version: str) -> None:
    total = 64 * 1024 * 1024
    chunk = 1024 * 1024
    digests: dict[str, str] = {}

    async def sender(name: str, stream: TLSStream, seed: int) -> None:
        rng = random.Random(seed)
        h = hashlib.sha256()
        for _ in range(total // chunk):
            block = rng.randbytes(chunk)
            h.update(block)
            await stream.send_all(block)
        digests[f"sent by {name}"] = h.hexdigest()

    async def receiver(name: str, stream: TLSStream) -> None:
        h = hashlib.sha256()
        got = 0
        while got < total:
            data = await stream.receive_some()
            assert data
            got += len(data)
            h.update(data)
        assert got == total
        digests[f"received by {name}"] = h.hexdigest()

    with trio.fail_after(TIMEOUT * 2):
        server, client = await tls_pair(tls_pki, version=version)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender, "server", server, 1)
                nursery.start_soon(sender, "client", client, 2)
                nursery.start_soon(receiver, "server", server)
                nursery.start_soon(receiver, "client", client)
        finally:
            await close_all(server, client)
    assert digests["sent by server"] == digests["received by client"]
    assert digests["sent by client"] == digests["received by server"]
    assert digests["sent by server"] != digests["sent by client"]


async def test_ten_thousand_one_byte_writes_arrive_intact(tls_pki: TLSPKI) -> None:
    count = 10_000
    expected = bytes(i % 251 for i in range(count))

    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(tls_pki)
        try:
            received = bytearray()

            async def write_tiny() -> None:
                for i in range(count):
                    await client.send_all(expected[i : i + 1])

            async def read_all() -> None:
                received.extend(await receive_exactly(server, count))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_tiny)
                nursery.start_soon(read_all)
        finally:
            await close_all(server, client)
    assert bytes(received) == expected


# ----------------------------------------------------------------------
# Ends of stream: close_notify, half-close, truncation


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("first", ["client", "server"])
async def test_close_notify_half_close(tls_pki: TLSPKI, version: str, first: str) -> None:
    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(tls_pki, version=version)
        closer, other = (client, server) if first == "client" else (server, client)
        try:
            await closer.send_all(b"last words")
            await closer.send_eof()
            await closer.send_eof()  # idempotent
            with pytest.raises(trio.ClosedResourceError):
                await closer.send_all(b"after eof")
            assert await receive_exactly(other, 10) == b"last words"
            assert await other.receive_some() == b""
            assert await other.receive_some() == b""  # EOF is sticky
            # Half-close: the other direction still flows.
            payload = random.randbytes(200_000)
            received = bytearray()

            async def read_back() -> None:
                received.extend(await receive_exactly(closer, len(payload)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_back)
                await other.send_all(payload)
            assert received == payload
            await other.send_eof()
            assert await closer.receive_some() == b""
        finally:
            await close_all(server, client)


class CuttingStream(trio.abc.HalfCloseableStream):
    """A real TCP stream that, once armed, sends only the first ``keep`` bytes of
    the next ``send_all`` and then closes the socket: a TCP close mid-record.
    ``append``, when set, is sent right after the next ``send_all``'s data, in
    the same write."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.keep: int | None = None
        self.append: bytes | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.append is not None:
            data, self.append = bytes(data) + self.append, None
        if self.keep is None:
            await self.inner.send_all(data)
            return
        assert len(data) > self.keep + 5
        await self.inner.send_all(bytes(data[: self.keep]))
        await self.inner.aclose()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_tcp_close_mid_record_is_truncation_not_eof(tls_pki: TLSPKI, version: str) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        cutter = CuttingStream(server_tcp)
        server = TLSStream(cutter, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp,
            make_client_ctx(tls_pki, version=version),
            server_side=False,
            server_hostname="localhost",
        )
        try:
            await both(server.do_handshake, client.do_handshake)
            await server.send_all(b"a" * 5000)
            assert await receive_exactly(client, 5000) == b"a" * 5000
            cutter.keep = 100  # header plus 95 bytes of a ~5 KiB record
            await server.send_all(b"b" * 5000)
            with pytest.raises(TLSTruncatedError, match="close_notify"):
                await client.receive_some()
            # Broken for good: no byte of the partial record ever came out.
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some()
        finally:
            await close_all(server, client)


async def test_tcp_close_between_records_is_truncation_too(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(tls_pki)
        try:
            await server.send_all(b"complete record")
            await server.transport_stream.aclose()  # TCP FIN, no close_notify
            assert await receive_exactly(client, 15) == b"complete record"
            with pytest.raises(TLSTruncatedError):
                await client.receive_some()
        finally:
            await close_all(server, client)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize(
    ("junk", "reason"),
    [
        # An application-data record that does not decrypt.
        (b"\x17\x03\x03\x00\x20" + bytes(32), "decrypt|bad record mac"),
        # A fatal alert (handshake_failure) sent in the clear after the data.
        (b"\x15\x03\x03\x00\x02\x02\x28", "alert|unexpected record|record"),
    ],
    ids=["bad-record", "plaintext-alert"],
)
async def test_error_after_data_in_one_read_keeps_data_and_reason(
    tls_pki: TLSPKI, version: str, junk: bytes, reason: str
) -> None:
    """Data and a bad record arrive in one TCP segment: the data is delivered,
    then the next read reports OpenSSL's real reason (not an empty error)."""
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        corrupter = CuttingStream(client_tcp)
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            corrupter,
            make_client_ctx(tls_pki, version=version),
            server_side=False,
            server_hostname="localhost",
        )
        try:
            await both(server.do_handshake, client.do_handshake)
            corrupter.append = junk
            await client.send_all(b"good data")
            await trio.sleep(0.05)  # let both arrive before the server reads
            # One call decrypts everything buffered: the data, then the failure.
            assert await server.receive_some() == b"good data"
            with pytest.raises(TLSError) as info:
                await server.receive_some()
            assert not isinstance(info.value, TLSTruncatedError)
            assert re.search(reason, str(info.value)), str(info.value)
            assert info.value.openssl_errors
        finally:
            await close_all(server, client)


# ----------------------------------------------------------------------
# Peers that misbehave


async def test_garbage_instead_of_client_hello_fails_cleanly(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, raw_client = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        try:
            # Not TLS, and the raw client keeps the connection open: the server
            # must fail on the bytes themselves, not on an EOF.
            await raw_client.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 4)
            with pytest.raises(TLSError) as info:
                await server.do_handshake()
            assert not isinstance(info.value, TLSTruncatedError)
            assert str(info.value)
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()
            # aclose is immediate; the raw client then sees the connection end.
            with trio.fail_after(1):
                await server.aclose()
            received = b""
            while chunk := await raw_client.receive_some():
                received += chunk
            assert b"HTTP" not in received
        finally:
            await close_all(server, raw_client)


@pytest.mark.parametrize("side", ["server", "client"])
async def test_silent_peer_is_cancelled_by_timeout(tls_pki: TLSPKI, side: str) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        if side == "server":
            stream = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
            silent = client_tcp
        else:
            stream = TLSStream(
                client_tcp, make_client_ctx(tls_pki), server_side=False, server_hostname="localhost"
            )
            silent = server_tcp
        try:
            start = trio.current_time()
            with trio.move_on_after(0.3) as scope:
                await stream.do_handshake()
            assert scope.cancelled_caught
            assert 0.25 <= trio.current_time() - start < 2.0
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
            start = trio.current_time()
            await stream.aclose()
            assert trio.current_time() - start < 0.5  # immediate; slack for a loaded CI box
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_some()
            # The silent peer sees the TCP connection end (a ClientHello first,
            # when we were the client).
            with trio.fail_after(2):
                while await silent.receive_some():
                    pass
        finally:
            await close_all(stream, silent)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "maximum", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"]
)
async def test_tls_1_0_and_1_1_clients_are_refused(
    tls_pki: TLSPKI, maximum: ssl.TLSVersion
) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    # Debian's OpenSSL refuses TLS < 1.2 at its default security level; lower it
    # so that the ClientHello really goes out and it is OUR server that refuses.
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = maximum
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = trio.SSLStream(client_tcp, old, server_hostname="localhost")
        try:

            async def server_side() -> None:
                try:
                    await server.do_handshake()
                finally:
                    await server.aclose()

            server_exc, client_exc = await both(server_side, client.do_handshake)
        finally:
            await close_all(server, client)
    assert isinstance(server_exc, TLSError)
    assert not isinstance(server_exc, TLSTruncatedError)
    assert "protocol" in str(server_exc) or "version" in str(server_exc)
    assert isinstance(client_exc, trio.BrokenResourceError)
    assert isinstance(client_exc.__cause__, ssl.SSLError)
    assert "PROTOCOL_VERSION" in str(client_exc.__cause__).upper()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_same_stdlib_client_at_tls_1_2_is_accepted(tls_pki: TLSPKI) -> None:
    """Control for the refusal test: only the version differs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(
            server_tcp, make_server_ctx(tls_pki, require_client_cert=False), server_side=True
        )
        client = trio.SSLStream(client_tcp, ctx, server_hostname="localhost")
        try:
            assert await both(server.do_handshake, client.do_handshake) == [None, None]
            assert server.version == "TLSv1.2"
            assert server.peer_chain == []
        finally:
            await close_all(server, client)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_client_certificate_is_required(tls_pki: TLSPKI, version: str) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp,
            make_client_ctx(tls_pki, version=version, with_cert=False),
            server_side=False,
            server_hostname="localhost",
        )
        try:
            server_exc, client_exc = await both(server.do_handshake, client.do_handshake)
            assert isinstance(server_exc, TLSError)
            assert not isinstance(server_exc, TLSTruncatedError)
            assert "certificate" in str(server_exc)
            if version == "TLSv1.3":
                # TLS 1.3: the client's handshake completes; the server's alert
                # arrives on its first read.
                assert client_exc is None
                with pytest.raises(TLSError, match="certificate"):
                    await client.receive_some()
            else:
                assert isinstance(client_exc, TLSError)
                assert "alert" in str(client_exc)
        finally:
            await close_all(server, client)


# ----------------------------------------------------------------------
# What the handshake established


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_handshake_exposes_chains_version_cipher_and_sni(
    tls_pki: TLSPKI, version: str
) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp,
            make_client_ctx(tls_pki, version=version),
            server_side=False,
            server_hostname="localhost",
        )
        try:
            with pytest.raises(trio.BrokenResourceError, match="do_handshake"):
                _ = server.peer_chain
            assert await both(server.do_handshake, client.do_handshake) == [None, None]
            # As sent: leaf then intermediate, never the root.
            assert server.peer_chain == tls_pki.client.chain
            assert client.peer_chain == tls_pki.server.chain
            assert len(client.peer_chain) == 2
            # As verified by OpenSSL on the client: ends with the trust anchor.
            assert client.verified_chain == [*tls_pki.server.chain, tls_pki.root]
            assert server.version == client.version == version
            assert server.cipher == client.cipher
            assert client.cipher is not None
            if version == "TLSv1.3":
                assert client.cipher.startswith("TLS_")
            else:
                assert client.cipher in MOZILLA_INTERMEDIATE_TLS12_CIPHERS.split(":")
                assert "ECDSA" in client.cipher
            assert server.requested_server_name == "localhost"
            # The CertificateRequest named the partner root, so a client with
            # several certificates can choose.
            ca_names = client.connection.get_client_ca_list()
            assert [name.der() for name in ca_names] == [tls_pki.root.subject.public_bytes()]
        finally:
            await close_all(server, client)


async def test_server_without_client_certificate_requirement(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(
            tls_pki,
            server_ctx=make_server_ctx(tls_pki, require_client_cert=False),
            client_ctx=make_client_ctx(tls_pki, with_cert=False),
        )
        try:
            assert server.peer_chain == []
            await client.send_all(b"anonymous")
            assert await receive_exactly(server, 9) == b"anonymous"
        finally:
            await close_all(server, client)


async def test_hostname_mismatch(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp,
            make_client_ctx(tls_pki),
            server_side=False,
            server_hostname="partner.example",
        )
        try:

            async def client_side() -> None:
                try:
                    await client.do_handshake()
                finally:
                    await client.aclose()

            _, client_exc = await both(server.do_handshake, client_side)
            assert isinstance(client_exc, HostnameMismatchError)
            assert "partner.example" in str(client_exc)
            assert server.requested_server_name == "partner.example"
            with pytest.raises(trio.ClosedResourceError):
                await client.send_all(b"must never leave")
            # Nothing was relayed: the server only sees the connection end.
            with pytest.raises(TLSError):
                await server.receive_some()
        finally:
            await close_all(server, client)


async def test_hostname_check_can_be_turned_off(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp,
            make_client_ctx(tls_pki),
            server_side=False,
            server_hostname="partner.example",
            check_hostname=False,
        )
        try:
            assert await both(server.do_handshake, client.do_handshake) == [None, None]
            assert server.requested_server_name == "partner.example"
        finally:
            await close_all(server, client)


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param(
            "::1", marks=pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback")
        ),
    ],
)
async def test_ip_address_server_names(tls_pki: TLSPKI, host: str) -> None:
    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(tls_pki, server_hostname=host, host=host)
        try:
            # Matched against the IP SAN; no SNI is sent for an IP literal (RFC 6066).
            assert server.requested_server_name is None
            await client.send_all(b"by address")
            assert await receive_exactly(server, 10) == b"by address"
        finally:
            await close_all(server, client)
        wrong = "127.0.0.2" if host == "127.0.0.1" else "::2"
        server_tcp, client_tcp = await tcp_pair(host)
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp, make_client_ctx(tls_pki), server_side=False, server_hostname=wrong
        )
        try:
            _, client_exc = await both(server.do_handshake, client.do_handshake)
            assert isinstance(client_exc, HostnameMismatchError)
        finally:
            await close_all(server, client)


# ----------------------------------------------------------------------
# Cancellation and conflicts


async def test_cancelled_handshake_breaks_stream_and_aclose_is_prompt(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp, make_client_ctx(tls_pki), server_side=False, server_hostname="localhost"
        )
        try:
            # The server has not started yet: the client is cancelled mid-handshake,
            # its ClientHello sent, waiting for the reply.
            with trio.move_on_after(0.1) as scope:
                await client.do_handshake()
            assert scope.cancelled_caught
            for op in (client.do_handshake, lambda: client.send_all(b"x"), client.receive_some):
                with pytest.raises(trio.BrokenResourceError):
                    await op()
            with trio.fail_after(0.5):
                await client.aclose()
            # The server, started late, sees a ClientHello and then the end.
            with pytest.raises(TLSError):
                await server.do_handshake()
        finally:
            await close_all(server, client)


@pytest.mark.parametrize("side", ["client", "server"])
async def test_cancellation_at_any_point_of_the_handshake(tls_pki: TLSPKI, side: str) -> None:
    """Cancel one side after ever longer delays: each attempt either completes
    (and the stream works) or leaves the stream broken with a prompt aclose."""
    outcomes = {"completed": 0, "cancelled": 0}
    with trio.fail_after(TIMEOUT):
        for delay in (0, 0.0001, 0.0003, 0.0006, 0.001, 0.002, 0.004, 0.008, 0.05):
            server_tcp, client_tcp = await tcp_pair()
            server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
            client = TLSStream(
                client_tcp, make_client_ctx(tls_pki), server_side=False, server_hostname="localhost"
            )
            victim, peer = (client, server) if side == "client" else (server, client)
            try:

                async def victim_side() -> None:
                    with trio.move_on_after(delay) as scope:  # noqa: B023
                        await victim.do_handshake()  # noqa: B023
                    if scope.cancelled_caught:
                        with trio.fail_after(0.5):
                            await victim.aclose()  # noqa: B023

                async def peer_side() -> None:
                    with trio.move_on_after(2):
                        await peer.do_handshake()  # noqa: B023

                await both(victim_side, peer_side)
                try:
                    await victim.send_all(b"ping")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    outcomes["cancelled"] += 1
                else:
                    outcomes["completed"] += 1
                    assert await receive_exactly(peer, 4) == b"ping"
            finally:
                await close_all(server, client)
    assert outcomes["cancelled"] >= 1
    assert outcomes["completed"] + outcomes["cancelled"] == 9


async def test_cancelled_while_queued_to_send_breaks_the_stream(tls_pki: TLSPKI) -> None:
    """White-box regression: a send cancelled while its records wait for the
    send lock (held here by the test, as a concurrent KeyUpdate answer would)
    has lost those records. The stream must be broken, not silently skip them."""
    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(tls_pki)
        try:
            release = trio.Event()

            async def hold_send_lock(task_status: trio.TaskStatus[None]) -> None:
                async with client._send_lock:
                    task_status.started()
                    await release.wait()

            async with trio.open_nursery() as nursery:
                await nursery.start(hold_send_lock)
                with trio.move_on_after(0.1) as scope:
                    await client.send_all(b"encrypted, then lost")
                release.set()
            assert scope.cancelled_caught
            with pytest.raises(trio.BrokenResourceError):
                await client.send_all(b"next")
        finally:
            await close_all(server, client)


async def test_cancelled_receive_leaves_the_stream_usable(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(tls_pki)
        try:
            for _ in range(3):
                with trio.move_on_after(0.05) as scope:
                    await server.receive_some()
                assert scope.cancelled_caught
            await client.send_all(b"still here" * 2000)
            # A small max_bytes is honoured, record by record.
            got = bytearray()
            while len(got) < 20_000:
                chunk = await server.receive_some(7)
                assert 1 <= len(chunk) <= 7
                got += chunk
            assert bytes(got) == b"still here" * 2000
            await server.send_all(b"and back")
            assert await receive_exactly(client, 8) == b"and back"
        finally:
            await close_all(server, client)


async def test_aclose_is_bounded_when_the_peer_does_not_read(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp,
            make_client_ctx(tls_pki),
            server_side=False,
            server_hostname="localhost",
            close_timeout=0.3,
        )
        try:
            await both(server.do_handshake, client.do_handshake)
            # Fill the socket buffers underneath the TLS layer (white-box): the
            # close_notify that aclose sends then cannot leave.
            with trio.move_on_after(0.2):
                while True:
                    await client_tcp.send_all(bytes(65536))
            start = trio.current_time()
            await client.aclose()
            assert 0.25 <= trio.current_time() - start < 1.5
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_some()
        finally:
            await close_all(server, client)


async def test_cancelled_aclose_closes_the_transport_at_once(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(tls_pki)
        try:
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await client.send_all(b"x")
            # No close_notify went out: the server sees a truncation.
            with pytest.raises(TLSTruncatedError):
                await server.receive_some()
        finally:
            await close_all(server, client)


async def test_concurrent_send_all_or_receive_some_is_busy(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server, client = await tls_pair(tls_pki)
        try:
            async with trio.open_nursery() as nursery:
                # The server never reads: 32 MiB cannot fit in the socket buffers,
                # so this send_all blocks; the client blocks in receive_some.
                nursery.start_soon(client.send_all, bytes(32 * 1024 * 1024))
                nursery.start_soon(client.receive_some)
                await trio.testing.wait_all_tasks_blocked(0.05)
                with pytest.raises(trio.BusyResourceError):
                    await client.send_all(b"second writer")
                with pytest.raises(trio.BusyResourceError):
                    await client.receive_some()
                with pytest.raises(trio.BusyResourceError):
                    await client.send_eof()
                nursery.cancel_scope.cancel()
            # The cancelled writer left a partial record: the stream is broken.
            with pytest.raises(trio.BrokenResourceError):
                await client.send_all(b"x")
        finally:
            await close_all(server, client)


# ----------------------------------------------------------------------
# Interop: stdlib ssl (Debian's OpenSSL 3.0) both ways


def stdlib_client_ctx(pki: TLSPKI, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.root_file))
    ctx.load_cert_chain(str(pki.client.chain_file), str(pki.client.key_file))
    tls = ssl.TLSVersion.TLSv1_2 if version == "TLSv1.2" else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = ctx.maximum_version = tls
    return ctx


def stdlib_server_ctx(pki: TLSPKI) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.chain_file), str(pki.server.key_file))
    ctx.load_verify_locations(cafile=str(pki.root_file))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_interop_stdlib_client_against_our_server(tls_pki: TLSPKI, version: str) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, make_server_ctx(tls_pki), server_side=True)
        client = trio.SSLStream(
            client_tcp, stdlib_client_ctx(tls_pki, version), server_hostname="localhost"
        )
        try:
            assert await both(server.do_handshake, client.do_handshake) == [None, None]
            assert server.version == version == client.version()  # type: ignore[attr-defined]
            assert server.peer_chain == tls_pki.client.chain
            assert server.requested_server_name == "localhost"
            payload = random.randbytes(100_000)
            await client.send_all(payload)
            assert await receive_exactly(server, len(payload)) == payload
            await server.send_all(payload[::-1])
            assert await receive_exactly(client, len(payload)) == payload[::-1]
            # close_notify both ways: ours is read by ssl as a clean EOF and theirs by us.
            await server.send_eof()
            assert await client.receive_some() == b""
            await client.aclose()
            assert await server.receive_some() == b""
        finally:
            await close_all(server, client)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_interop_our_client_against_stdlib_server(tls_pki: TLSPKI, version: str) -> None:
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = trio.SSLStream(server_tcp, stdlib_server_ctx(tls_pki), server_side=True)
        client = TLSStream(
            client_tcp,
            make_client_ctx(tls_pki, version=version),
            server_side=False,
            server_hostname="localhost",
        )
        try:
            assert await both(server.do_handshake, client.do_handshake) == [None, None]
            assert client.version == version
            assert client.verified_chain[-1] == tls_pki.root
            peer = server.getpeercert()  # type: ignore[attr-defined]
            assert peer is not None
            assert ("DNS", "client.partner.example") in peer["subjectAltName"]
            payload = random.randbytes(100_000)
            await server.send_all(payload)
            assert await receive_exactly(client, len(payload)) == payload
            await client.send_all(payload[::-1])
            assert await receive_exactly(server, len(payload)) == payload[::-1]
            await client.send_eof()
            assert await server.receive_some() == b""
            await server.aclose()
            assert await client.receive_some() == b""
        finally:
            await close_all(server, client)


async def _reused_by_stdlib_server(
    client_ctx: SSL.Context, server_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> bool:
    """One connection, one byte each way; did the server resume a session?"""
    server_tcp, client_tcp = await tcp_pair()
    server = trio.SSLStream(server_tcp, server_ctx, server_side=True)
    client = TLSStream(client_tcp, client_ctx, server_side=False, server_hostname=hostname)
    try:
        _, client_error = await both(server.do_handshake, client.do_handshake)
        if client_error is not None:
            raise client_error
        await server.send_all(b"s")
        assert await receive_exactly(client, 1) == b"s"
        await client.send_all(b"c")
        assert await receive_exactly(server, 1) == b"c"
        return bool(server.session_reused)  # type: ignore[attr-defined]
    finally:
        await close_all(server, client)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_client_resumes_sessions_only_when_asked(tls_pki: TLSPKI, version: str) -> None:
    with trio.fail_after(TIMEOUT):
        server_ctx = stdlib_server_ctx(tls_pki)  # one ticket key for every connection
        resuming = client_context(
            [tls_pki.root], tls_pki.client.chain, tls_pki.client.key, resume_sessions=True
        )
        resuming.set_min_proto_version(VERSIONS[version])
        resuming.set_max_proto_version(VERSIONS[version])
        assert not await _reused_by_stdlib_server(resuming, server_ctx)
        assert await _reused_by_stdlib_server(resuming, server_ctx)
        assert await _reused_by_stdlib_server(resuming, server_ctx)
        # The default: every connection is a full handshake.
        plain = make_client_ctx(tls_pki, version=version)
        assert not await _reused_by_stdlib_server(plain, server_ctx)
        assert not await _reused_by_stdlib_server(plain, server_ctx)
        # A new context (a reload) starts with no session.
        fresh = client_context(
            [tls_pki.root], tls_pki.client.chain, tls_pki.client.key, resume_sessions=True
        )
        fresh.set_min_proto_version(VERSIONS[version])
        fresh.set_max_proto_version(VERSIONS[version])
        assert not await _reused_by_stdlib_server(fresh, server_ctx)


async def test_resumed_session_still_checks_the_host_name(tls_pki: TLSPKI) -> None:
    with trio.fail_after(TIMEOUT):
        server_ctx = stdlib_server_ctx(tls_pki)
        ctx = client_context(
            [tls_pki.root], tls_pki.client.chain, tls_pki.client.key, resume_sessions=True
        )
        assert not await _reused_by_stdlib_server(ctx, server_ctx)
        # Sessions are kept per host name: another name gets a full handshake
        # and its own check, which the certificate fails.
        with pytest.raises(HostnameMismatchError):
            await _reused_by_stdlib_server(ctx, server_ctx, hostname="other.example")
        assert await _reused_by_stdlib_server(ctx, server_ctx)


# ----------------------------------------------------------------------
# Interop: openssl s_client / s_server subprocesses


async def s_server_port(out_file: Path) -> int:
    """The port `openssl s_server -accept 127.0.0.1:0` printed to `out_file`."""
    for _ in range(500):  # at most ~5 s for s_server to listen
        for line in out_file.read_text(errors="replace").splitlines():
            if line.startswith("ACCEPT 127.0.0.1:"):
                return int(line.rsplit(":", 1)[1])
        await trio.sleep(0.01)
    raise AssertionError(out_file.read_text(errors="replace"))


def split_chain(identity: TLSIdentity, directory: Path) -> tuple[Path, Path]:
    """openssl(1) sends only the first certificate of -cert: the rest go in -cert_chain."""
    leaf_file = directory / f"{identity.chain_file.stem}-leaf.pem"
    rest_file = directory / f"{identity.chain_file.stem}-intermediates.pem"
    leaf_file.write_bytes(identity.chain[0].public_bytes(serialization.Encoding.PEM))
    rest_file.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in identity.chain[1:])
    )
    return leaf_file, rest_file


async def _stop(process: trio.Process) -> None:
    with trio.move_on_after(2):
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _read_until(stream: trio.abc.ReceiveStream, needle: bytes, limit: int = 65536) -> bytes:
    buf = b""
    while needle not in buf:
        chunk = await stream.receive_some()
        assert chunk, f"ended before {needle!r}; got {buf!r}"
        buf += chunk
        assert len(buf) < limit
    return buf


@needs_openssl
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_interop_openssl_s_client_against_our_server(
    tls_pki: TLSPKI, version: str, tmp_path: Path
) -> None:
    assert OPENSSL is not None
    leaf_file, intermediates_file = split_chain(tls_pki.client, tmp_path)
    server_ctx = make_server_ctx(tls_pki)
    results: dict[str, object] = {}

    async def handler(transport: trio.SocketStream) -> None:
        stream = TLSStream(transport, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            results["version"] = stream.version
            results["sni"] = stream.requested_server_name
            results["peer"] = stream.peer_chain
            while data := await stream.receive_some():
                await stream.send_all(data.upper())
            results["eof"] = "close_notify"
        except TLSTruncatedError:
            results["eof"] = "truncated"
        finally:
            await stream.aclose()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            flag = "-tls1_2" if version == "TLSv1.2" else "-tls1_3"
            command = [
                OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", flag,
                "-servername", "localhost", "-verify_hostname", "localhost",
                "-CAfile", str(tls_pki.root_file), "-verify_return_error",
                "-cert", str(leaf_file), "-cert_chain", str(intermediates_file),
                "-key", str(tls_pki.client.key_file),
                "-quiet", "-no_ign_eof",
            ]  # fmt: skip
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert process.stdin is not None and process.stdout is not None
                await process.stdin.send_all(b"hello from s_client\n")
                line = await _read_until(process.stdout, b"\n")
                assert line == b"HELLO FROM S_CLIENT\n"
                await process.stdin.aclose()  # s_client sends close_notify and exits
                assert await process.wait() == 0
            finally:
                await _stop(process)
            while "eof" not in results:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert results["version"] == version
    assert results["sni"] == "localhost"
    assert results["peer"] == tls_pki.client.chain
    assert results["eof"] == "close_notify"


@needs_openssl
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_interop_our_client_against_openssl_s_server(
    tls_pki: TLSPKI, version: str, tmp_path: Path
) -> None:
    assert OPENSSL is not None
    leaf_file, intermediates_file = split_chain(tls_pki.server, tmp_path)
    out_file = tmp_path / "s_server.out"
    flag = "-tls1_2" if version == "TLSv1.2" else "-tls1_3"
    with trio.fail_after(TIMEOUT), out_file.open("wb") as out:
        command = [
            OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", flag,
            "-cert", str(leaf_file), "-key", str(tls_pki.server.key_file),
            "-cert_chain", str(intermediates_file),
            "-CAfile", str(tls_pki.root_file), "-Verify", "2", "-verify_return_error",
            "-rev",
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            port = await s_server_port(out_file)
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            client = TLSStream(
                transport,
                make_client_ctx(tls_pki),
                server_side=False,
                server_hostname="localhost",
            )
            async with client:
                await client.do_handshake()
                assert client.version == version
                assert client.peer_chain == tls_pki.server.chain
                assert client.verified_chain[-1] == tls_pki.root
                await client.send_all(b"hello s_server\n")
                # -rev answers each line reversed.
                reply = await _read_until(client, b"\n")
                assert reply == b"revres_s olleh\n"
            assert await process.wait() == 0
        finally:
            await _stop(process)


# ----------------------------------------------------------------------
# Issue 15: the verdict inside the handshake, with the alert that says why


@dataclass
class PartnerSite:
    trust: PartnerTrust
    server: Leaf  # the edge's own certificate
    server_root: x509.Certificate
    leaves: dict[str, Leaf]  # situation -> the partner certificate that shows it


@pytest.fixture(scope="module")
def partner_site(tmp_path_factory: pytest.TempPathFactory) -> PartnerSite:
    folder = tmp_path_factory.mktemp("partners")
    root = CA.root("Fabrikam Root")
    issuing = root.intermediate("Fabrikam Issuing")
    revoked = issuing.issue(dns=["sip.fabrikam.com"])
    fab = folder / "fabrikam.com"
    fab.mkdir()
    (fab / "root.pem").write_bytes(root.cert_pem())
    crl = issuing.crl([revoked.cert.serial_number])
    (fab / "issuing.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    # A partner without CRLs: OpenSSL's "unable to get CRL" must be overruled.
    contoso = CA.root("Contoso Root")
    (folder / "contoso.com").mkdir()
    (folder / "contoso.com" / "root.pem").write_bytes(contoso.cert_pem())
    # A partner the operator switched off: only the core knows (no X509 error).
    tailspin = CA.root("Tailspin Root")
    (folder / "tailspin.com").mkdir()
    (folder / "tailspin.com" / "root.pem").write_bytes(tailspin.cert_pem())
    (folder / "tailspin.com" / "policy.toml").write_text("enabled = false\n")
    snapshot = load_policies(folder)
    assert not snapshot.broken
    now = dt.datetime.now(dt.UTC)
    leaves = {
        "ok": issuing.issue(dns=["sip.fabrikam.com"]),
        "ok-no-crl": contoso.issue(dns=["sip.contoso.com"]),
        "unknown_ca": CA.root("Stranger Root").issue(dns=["sip.fabrikam.com"]),
        "expired": issuing.issue(dns=["sip.fabrikam.com"], not_after=now - dt.timedelta(days=1)),
        "revoked": revoked,
        "name_mismatch": issuing.issue(dns=["sip.litware.com"]),
        "partner_disabled": tailspin.issue(dns=["sip.tailspin.com"]),
    }
    edge_root = CA.root("Edge Root")
    server = edge_root.issue(dns=["localhost"])
    return PartnerSite(PartnerTrust(snapshot), server, edge_root.cert, leaves)


async def _s_client(port: int, args: list[str], timeout: float = 10.0) -> str:
    """openssl s_client's whole output. -ign_eof keeps it reading after the
    handshake, so a TLS 1.3 client (whose handshake completes before the server
    judged its certificate) sees the alert too; the server closes either way."""
    assert OPENSSL is not None
    with trio.fail_after(timeout):
        result = await trio.run_process(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return (result.stdout + result.stderr).decode("utf-8", "replace")


# OpenSSL 3.0's s_client wording for each alert.
EXPECTED_ALERT = {
    "unknown_ca": "alert unknown ca",  # 48
    "expired": "alert certificate expired",  # 45
    "revoked": "alert certificate revoked",  # 44
    # No X509 error of its own exists at the point only the core can see this:
    # edge/verify_alert.py sets X509_V_ERR_CERT_REJECTED.
    "name_mismatch": "alert bad certificate",  # 42
    # Likewise: X509_V_ERR_APPLICATION_VERIFICATION.
    "partner_disabled": "alert handshake failure",  # 40
}


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("case", ["ok", "ok-no-crl", *EXPECTED_ALERT])
async def test_partner_verdict_inside_the_handshake(
    partner_site: PartnerSite, tmp_path: Path, version: str, case: str
) -> None:
    ctx = server_context(
        partner_site.server.chain,
        partner_site.server.key,
        require_client_cert=True,
        partner_trust=partner_site.trust,
    )
    verdicts: list[Verdict | None] = []

    async def handler(transport: trio.SocketStream) -> None:
        stream = TLSStream(transport, ctx, server_side=True)
        try:
            await stream.do_handshake()
            verdict = stream.handshake_verdict
            # The gateway's rule: no byte unless the verdict accepted.
            if verdict is not None and verdict.accepted:
                await stream.send_all(b"WELCOME\n")
        except TLSError:
            pass
        finally:
            verdicts.append(stream.handshake_verdict)
            await trio.aclose_forcefully(transport)

    leaf_file, key_file = partner_site.leaves[case].write(tmp_path, case)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            args = [version, "-cert", str(leaf_file), "-cert_chain", str(leaf_file)]
            output = await _s_client(port, [*args, "-key", str(key_file)])
            while not verdicts:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    verdict = verdicts[0]
    assert verdict is not None
    if case.startswith("ok"):
        assert verdict.accepted, verdict.line
        assert "WELCOME" in output
        assert " alert " not in output
    else:
        assert verdict.reason == Reason(case), verdict.line
        assert EXPECTED_ALERT[case] in output, output
        assert "WELCOME" not in output  # no byte before (and without) the verdict


async def test_handshake_verdict_reaches_our_own_client(
    partner_site: PartnerSite, tls_pki: TLSPKI
) -> None:
    ctx = server_context(
        partner_site.server.chain,
        partner_site.server.key,
        require_client_cert=True,
        partner_trust=partner_site.trust,
    )
    leaf = partner_site.leaves["expired"]
    client_ctx = client_context([partner_site.server_root], leaf.chain, leaf.key)
    client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = TLSStream(server_tcp, ctx, server_side=True)
        client = TLSStream(client_tcp, client_ctx, server_side=False, check_hostname=False)
        errors = await both(server.do_handshake, client.do_handshake)
        await close_all(server, client)
    assert isinstance(errors[0], TLSError) and isinstance(errors[1], TLSError)
    assert "certificate expired" in str(errors[1])
    verdict = server.handshake_verdict
    assert verdict is not None and verdict.reason is Reason.EXPIRED


def test_no_judge_no_verdict(tls_pki: TLSPKI) -> None:
    ctx = make_server_ctx(tls_pki)  # legacy: the caller runs the core after the handshake
    conn = SSL.Connection(ctx, None)
    assert handshake_verdict(conn) is None


# Run in a fresh interpreter: OPENSSL_CONF must be set before OpenSSL starts,
# which `import edge` does first thing (pytest's own process imported
# cryptography before edge, so it cannot show this).
_GROUP_SERVER = """
import sys
from functools import partial
import trio
import edge
from edge.pki import CA
from edge.tls import TLSStream, server_context

leaf = CA.root("Edge Root").issue(dns=["localhost"])
ctx = server_context(leaf.chain, leaf.key, require_client_cert=False)

async def handler(transport):
    stream = TLSStream(transport, ctx, server_side=True)
    try:
        await stream.do_handshake()
        await stream.send_all(b"hello\\n")
    except Exception:
        pass
    await trio.aclose_forcefully(transport)

async def main():
    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            print(listeners[0].socket.getsockname()[1], flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

trio.run(main)
"""


@needs_openssl
async def test_key_exchange_groups_are_mozilla_intermediate() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    with trio.fail_after(TIMEOUT * 2):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _GROUP_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert process.stdout is not None and process.stdin is not None
            port = int(await _read_until(process.stdout, b"\n"))
            offered = {}
            for group in ("X25519", "P-256", "P-384", "X448", "P-521", "ffdhe2048"):
                output = await _s_client(port, ["-groups", group, "-brief"])
                offered[group] = "CONNECTION ESTABLISHED" in output
            await process.stdin.aclose()
        finally:
            await _stop(process)
    assert offered == {
        "X25519": True,
        "P-256": True,
        "P-384": True,
        "X448": False,
        "P-521": False,
        "ffdhe2048": False,
    }


@needs_openssl
@pytest.mark.parametrize(("version", "accepted"), [("-tls1_2", False), ("-tls1_3", True)])
async def test_modern_profile_is_tls_1_3_only(
    tls_pki: TLSPKI, version: str, accepted: bool
) -> None:
    ctx = server_context(
        tls_pki.server.chain, tls_pki.server.key, require_client_cert=False, profile="modern"
    )

    async def handler(transport: trio.SocketStream) -> None:
        stream = TLSStream(transport, ctx, server_side=True)
        with contextlib.suppress(TLSError):
            await stream.do_handshake()
        await trio.aclose_forcefully(transport)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            output = await _s_client(listeners[0].socket.getsockname()[1], [version, "-brief"])
            nursery.cancel_scope.cancel()
    assert ("CONNECTION ESTABLISHED" in output) is accepted, output
    if not accepted:
        assert "alert protocol version" in output


def test_unknown_profile_is_refused(tls_pki: TLSPKI) -> None:
    with pytest.raises(ValueError, match="unknown TLS profile"):
        server_context(
            tls_pki.server.chain, tls_pki.server.key, require_client_cert=False, profile="old"
        )


@pytest.mark.parametrize(
    ("table", "profile", "problem"),
    [
        ({}, "intermediate", None),
        ({"tls": {"profile": "modern"}}, "modern", None),
        ({"tls": {"profile": "old"}}, "intermediate", 'tls.profile: must be "intermediate"'),
        ({"tls": {"profil": "modern"}}, "intermediate", "tls.profil"),
    ],
)
def test_tls_profile_config_key(
    tmp_path: Path, table: dict[str, object], profile: str, problem: str | None
) -> None:
    loader = _Loader(tmp_path / "edge.toml")
    assert loader.tls_settings(table).profile == profile
    if problem is None:
        assert loader.problems == []
    else:
        assert len(loader.problems) == 1 and problem in loader.problems[0]


async def test_client_refuses_a_server_below_the_floor(tmp_path: Path) -> None:
    """The edge dialling a server whose chain holds an RSA-1024 key: refused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    root = CA.root("Weak Member Root")
    cert = (
        root._builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fe1.corp.example")]),
            key.public_key(),  # type: ignore[arg-type]
            None,
            None,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("fe1.corp.example")]), False)
        .sign(root.key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "weak.pem", tmp_path / "weak.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    weak_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    weak_server.set_ciphers("DEFAULT:@SECLEVEL=0")  # the stdlib would refuse it too
    weak_server.load_cert_chain(cert_file, key_file)
    client_ctx = client_context([root.cert])
    with trio.fail_after(TIMEOUT):
        server_tcp, client_tcp = await tcp_pair()
        server = trio.SSLStream(server_tcp, weak_server, server_side=True)
        client = TLSStream(
            client_tcp, client_ctx, server_side=False, server_hostname="fe1.corp.example"
        )
        errors = await both(server.do_handshake, client.do_handshake)
        await close_all(client)
        await trio.aclose_forcefully(server_tcp)
    assert isinstance(errors[1], TLSError), errors


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
async def test_weak_signature_gets_bad_certificate_but_an_old_sha1_root_is_fine(
    tmp_path: Path, version: str
) -> None:
    root, root_key = _rsa_root("Old SHA-1 Root")
    # The anchor's own SHA-1 self-signature is below no one: it is trusted as configured.
    sha1_root = _resign_weak(root, root_key, "sha1")
    folder = tmp_path / "policies" / "old.example"
    folder.mkdir(parents=True)
    (folder / "root.pem").write_bytes(sha1_root.public_bytes(serialization.Encoding.PEM))
    trust = PartnerTrust(load_policies(tmp_path / "policies"))
    edge_leaf = CA.root("Edge Root").issue(dns=["localhost"])
    ctx = server_context(
        edge_leaf.chain, edge_leaf.key, require_client_cert=True, partner_trust=trust
    )
    verdicts: list[Verdict | None] = []

    async def handler(transport: trio.SocketStream) -> None:
        stream = TLSStream(transport, ctx, server_side=True)
        with contextlib.suppress(TLSError):
            await stream.do_handshake()
        verdicts.append(stream.handshake_verdict)
        await trio.aclose_forcefully(transport)

    outputs = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            for digest in ("sha256", "sha1"):
                key = ec.generate_private_key(ec.SECP256R1())
                leaf = _leaf_under(sha1_root, root_key, "sip.old.example", key.public_key())
                if digest == "sha1":
                    leaf = _resign_weak(leaf, root_key, "sha1")
                cert_file, key_file = tmp_path / f"{digest}.pem", tmp_path / f"{digest}.key"
                cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
                key_file.write_bytes(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                args = [version, "-cert", str(cert_file), "-key", str(key_file)]
                # OpenSSL 3.0's own floor would refuse to send the SHA-1 certificate.
                args += ["-cipher", "DEFAULT:@SECLEVEL=0"]
                outputs[digest] = await _s_client(port, args)
                while len(verdicts) < len(outputs):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    ok, weak = verdicts
    assert ok is not None and ok.accepted, ok
    assert " alert " not in outputs["sha256"]
    assert weak is not None and weak.reason is Reason.WEAK_CRYPTO
    assert "alert bad certificate" in outputs["sha1"]
