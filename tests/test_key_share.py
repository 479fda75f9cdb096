"""Key shares (edge/openssl.cnf): no HelloRetryRequest toward peers without ML-KEM.

A pool member or partner edge on OpenSSL 3.0 (Debian 12's HAProxy, nginx,
openssl) has no X25519MLKEM768. When the edge's ClientHello carried a key share
for that group only, such a server answered HelloRetryRequest on every
connection: a round trip and a second ClientHello each time (issue 19). Two
edges must still agree on the post-quantum hybrid.

The edge's side runs in a fresh interpreter: OPENSSL_CONF (edge/__init__.py)
only counts when it is set before OpenSSL starts, which in this test process
happened long ago.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import TLSPKI
from tests.test_tls import s_server_port, split_chain

TIMEOUT = 20.0
OPENSSL = shutil.which("openssl")

# argv: s_server's port, root, client chain, client key. Prints the group agreed
# with s_server, then the group two of the edge's own contexts agree on.
_CLIENT = """
import edge  # first: it points OPENSSL_CONF at edge/openssl.cnf before OpenSSL starts

import sys
from functools import partial
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge.pki import CA
from edge.tls import TLSStream, client_context, server_context

port, root, chain, key = sys.argv[1:5]
identity = (
    x509.load_pem_x509_certificates(Path(root).read_bytes()),
    x509.load_pem_x509_certificates(Path(chain).read_bytes()),
    serialization.load_pem_private_key(Path(key).read_bytes(), None),
)

async def to_s_server(ctx):
    tcp = await trio.open_tcp_stream("127.0.0.1", int(port))
    async with TLSStream(tcp, ctx, server_side=False, server_hostname="localhost") as client:
        await client.do_handshake()
        print(client.connection.get_group_name(), flush=True)
        await client.send_all(b"one hello\\n")
        reply = b""
        while b"\\n" not in reply:
            chunk = await client.receive_some(100)
            if not chunk:
                break
            reply += chunk
        assert reply == b"olleh eno\\n", reply

async def between_edges(ml_kem_share):
    root = CA.root("Edge Root")
    leaf = root.issue(dns=["localhost"])
    server_ctx = server_context(leaf.chain, leaf.key, require_client_cert=False)
    own = client_context([root.cert], ml_kem_share=ml_kem_share)
    groups = {}

    async def handler(tcp):
        stream = TLSStream(tcp, server_ctx, server_side=True)
        await stream.do_handshake()
        groups["server"] = stream.connection.get_group_name()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        tcp = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        client = TLSStream(tcp, own, server_side=False, server_hostname="localhost")
        await client.do_handshake()
        groups["client"] = client.connection.get_group_name()
        await client.aclose()
        with trio.move_on_after(10):
            while "server" not in groups:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    print(groups["client"], groups.get("server"), flush=True)

async def main():
    with trio.fail_after(15):
        await to_s_server(client_context(*identity))
        await to_s_server(client_context(*identity, ml_kem_share=False))  # the pool's
        await between_edges(True)
        await between_edges(False)

trio.run(main)
"""


@pytest.mark.skipif(OPENSSL is None, reason="openssl(1) not installed")
async def test_one_client_hello_to_a_server_without_ml_kem(tls_pki: TLSPKI, tmp_path: Path) -> None:
    assert OPENSSL is not None
    version = subprocess.run(
        [OPENSSL, "version"], capture_output=True, text=True, timeout=10
    ).stdout
    if not version.startswith("OpenSSL 3.0"):
        pytest.skip(f"needs an openssl(1) without ML-KEM (3.0); found {version.strip()}")
    leaf_file, intermediates_file = split_chain(tls_pki.server, tmp_path)
    out_file = tmp_path / "s_server.out"
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    with trio.fail_after(TIMEOUT), out_file.open("wb") as out:
        command = [
            OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-naccept", "2", "-tls1_3",
            "-cert", str(leaf_file), "-key", str(tls_pki.server.key_file),
            "-cert_chain", str(intermediates_file), "-msg", "-rev",
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
        try:
            port = await s_server_port(out_file)
            files = (tls_pki.root_file, tls_pki.client.chain_file, tls_pki.client.key_file)
            client = await trio.run_process(
                [sys.executable, "-c", _CLIENT, str(port), *map(str, files)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
            assert client.returncode == 0, client.stderr.decode(errors="replace")
            assert await process.wait() == 0
        finally:
            with trio.move_on_after(2):
                if process.returncode is None:
                    process.kill()
                await process.wait()
    with_s_server, pool_with_s_server, between_edges, pool_between_edges = (
        client.stdout.decode().splitlines()
    )
    assert with_s_server == pool_with_s_server == "x25519"
    # The pool's context sends no ML-KEM share but still gets the hybrid from
    # a server that has it (after a HelloRetryRequest).
    assert between_edges == pool_between_edges == "X25519MLKEM768 X25519MLKEM768"
    received = [
        line for line in out_file.read_text(errors="replace").splitlines() if line.startswith("<<<")
    ]
    hellos = [line for line in received if line.endswith("ClientHello")]
    assert len(hellos) == 2, "\n".join(received)  # one per connection: no retry
