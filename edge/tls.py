"""TLS over any trio stream, on pyOpenSSL: the stream the whole gateway stands on.

This module owns moving TLS records between an ``OpenSSL.SSL.Connection`` and a
trio transport stream, and building the contexts. It never decides whether a
peer is trusted: a partner-facing server context asks the core
(``edge.core.trust``) from inside the handshake, through the verify callback,
so a refused partner gets the TLS alert that says why (see "Verdict in the
handshake" below); the verdict rides on ``TLSStream.handshake_verdict``.
It never logs, and never sees payload bytes except to encrypt and decrypt them.

General theory of operation
===========================

Why not ``trio.SSLStream``? It wraps the stdlib ``ssl`` module, which does not
show us the chain the peer actually sent, the chain OpenSSL verified, or let us
verify one partner's chain against that partner's roots alone. pyOpenSSL does,
so this is ``trio.SSLStream``'s design re-told for pyOpenSSL.

The ``Connection`` is built with no socket (``Connection(ctx, None)``): it then
reads ciphertext from an *incoming memory BIO* that we fill with
``bio_write()`` and writes ciphertext into an *outgoing memory BIO* that we
empty with ``bio_read()``. OpenSSL itself never blocks and never does I/O; all
I/O is ours, done with trio, and can therefore be cancelled.

Every TLS operation (handshake, read, write, shutdown) may need to *both* send
and receive: a read may have to answer a TLS 1.3 KeyUpdate, a handshake
alternates flights. So every operation goes through one helper,
``_retry(fn)``, which loops:

1. call ``fn`` on the ``Connection``;
2. whatever it produced in the outgoing BIO is sent on the transport, under
   ``_send_lock`` (a strict FIFO lock, so records leave in the order OpenSSL
   produced them even when the sending task and the receiving task both have
   something to send);
3. if ``fn`` raised ``WantReadError`` and nothing was sent, read once from the
   transport under ``_recv_lock``, feed the incoming BIO, and go round again.

Full duplex: one task may sit in ``receive_some`` while another is in
``send_all``. Both may want to read from the transport at once (for instance a
writer that is waiting for a handshake that the reader is driving). The
transport may only be read by one task, so ``_recv_lock`` guards it, and a task
that waited for the lock checks ``_recv_count``: if someone else fed the BIO
while it waited, it does not read again (that could block forever on data
that will never come) but retries ``fn`` first. This is trio's own scheme.

Outer conflict detectors make two concurrent ``send_all`` calls (or two
``receive_some`` calls) an error, as for every trio stream.

The handshake runs once (``_handshake_started`` plus ``_handshake_finished``);
a second caller waits for the first one (on an event made only then).

Failure model. The stream is OK, BROKEN or CLOSED:

* any OpenSSL error (bad record, alert from the peer, failed handshake) makes
  it BROKEN and raises ``TLSError`` (a ``trio.BrokenResourceError``), after a
  best-effort, time-bounded flush of the outgoing BIO so that the alert OpenSSL
  wrote (e.g. "certificate required") reaches the peer;
* a transport that ends without a close_notify raises ``TLSTruncatedError``:
  a truncation is not a clean end of stream, and a relay must be able to tell
  "the partner said goodbye" from "the TCP connection was cut";
* a cancelled or failed transport *send* makes it BROKEN (part of a record may
  have left), and so does a cancellation while waiting for ``_send_lock`` with
  records already taken out of OpenSSL (they can never be sent again, and the
  peer would see the next record out of sequence); a cancelled handshake makes
  it BROKEN; a cancelled transport
  *receive* does not (nothing was consumed from OpenSSL's point of view), so
  ``receive_some`` under a timeout is safe and the stream stays usable;
* ``aclose`` never waits on the peer: it sends close_notify only if the
  handshake completed and the send side is free, bounded by
  ``close_timeout``, and then closes the transport. Cancelled, it closes the
  transport at once.

Half-close. ``send_eof`` sends close_notify and keeps the transport open: TLS
1.3 (and OpenSSL, for 1.2) lets the other direction keep flowing until the peer
sends its own close_notify, which ``receive_some`` reports as ``b""``.

TLS 1.3 session tickets. A TLS 1.3 server's last handshake output is only
session tickets; like trio, we hold it back and send it with the first
record we send, so a handshake costs one write fewer and a peer that closes
right after the handshake does not make us fail on an unsent ticket.

Session resumption. Server contexts made here never resume (a resumed
session would skip the partner's certificate, and with it authorization).
Client contexts may: ``client_context(..., resume_sessions=True)`` gives the
context a small cache of one session per server host name, kept beside the
context (a weak map, so a context rebuilt on reload starts empty and never
resumes a session verified against old roots). A client ``TLSStream`` offers
the cached session for its ``server_hostname``; it stores the newest session
after its first successful read (TLS 1.3 tickets arrive after the handshake)
or, for TLS 1.2, right after the handshake. A resumed session keeps the
server's certificate, so the host-name check still runs on it. Use it only
toward servers that are ours (the pool), where it saves a certificate
exchange, its signatures and its verification on every connection.

Cost. Reads pull up to ``_TRANSPORT_READ_SIZE`` of ciphertext and then decrypt
every complete record already buffered in one call; writes encrypt up to
``_WRITE_CHUNK`` of plaintext (OpenSSL writes one 16 KiB record per call)
before one transport send. Both keep the per-record Python overhead low while
bounding the memory one connection can hold. When decrypting several records
meets an error (an alert, a bad record, a truncation) after some plaintext,
that plaintext is returned first and the error is kept and raised by the next
read: OpenSSL reports the reason only once. When OpenSSL's last read found
no complete record and no ciphertext came in since, the next read goes
straight to the transport instead of asking OpenSSL again (``_drained``);
and a memory BIO that gave less than asked for is empty, so draining the
outgoing BIO takes one ``bio_read``. Each saves a call and an exception per
record batch.

Data path (issue 19: small messages on many live connections)
=============================================================

Per small record the cost was Python around the record, not crypto: trio's
socket wrappers (a conflict detector, an error translator, a checkpoint and
a cancel-shielded checkpoint per ``send``/``recv``), two ``trio.Lock``
round trips, a schedule point per ``receive_some`` and per ``send_all``, an
``SSL_read`` into a fresh 128 KiB buffer and a ``bio_read`` into a fresh
1 MiB one. What the stream does now, once established:

* Ciphertext moves with ``os.readv``/``os.write`` on the descriptor of the
  ``trio.SocketStream`` underneath (trio is used for readiness only:
  ``trio.lowlevel.wait_readable/wait_writable`` when the call would block,
  so cancellation and ``aclose`` from another task behave as before). Reads
  land in one module-wide buffer that is handed to ``bio_write`` before any
  await, so it is never shared between two reads. Any other transport
  (tests' memory streams) goes through its own ``send_all``/``receive_some``.
* ``relay_receive``/``relay_send`` are ``receive_some``/``send_all`` without
  the trailing schedule point when no I/O had to wait and without a cancel
  check of their own; ``edge.relay`` yields itself every few chunks, so a
  pump that always finds data cannot starve the other connections, and sees
  cancellation there or at the next wait.
* After a relay read that returned data OpenSSL can only have queued a TLS
  1.3 KeyUpdate answer (renegotiation is off): the outgoing BIO is checked
  every ``_LAZY_READS`` reads and after every transport read bigger than
  ``_LAZY_FED_MAX`` (so a peer can make at most a few KiB wait there), and
  every write takes whatever is queued before its own records, so the order
  on the wire is OpenSSL's.
* The two locks are ``_Gate``s (strict FIFO, no schedule point when free).
* ``SSL_read`` is asked for one record (16 KiB), ``bio_read`` for one write
  batch, since pyOpenSSL allocates the size asked for on every call.

Direct mode (``go_direct``): OpenSSL on the socket. The relay's data path
(``edge.relay`` for two ``TLSStream``s over sockets, which is every relayed
connection) moves both streams onto their sockets once the handshake is done:
``SSL_set_fd`` through pyOpenSSL's binding (``OpenSSL._util``: pyOpenSSL
cannot move an established memory-BIO connection onto a socket; the pinned
version has the name, and without it nothing switches) replaces both memory
BIOs with a socket BIO, and from then on ``SSL_read``/``SSL_write`` read and
write the descriptor themselves. The handshake keeps the memory BIOs, and
with them the verify callback's alerts, the flush after a failed handshake,
the held-back tickets and the timeouts. The switch is safe only when the
incoming memory BIO is empty, so ``go_direct`` first decrypts every record
already read (that plaintext goes first, and a close_notify or error among it
keeps the stream on memory BIOs) and sends whatever OpenSSL queued; a record
OpenSSL has half read stays in its own buffer and continues from the socket.
pyOpenSSL's pointers to the freed BIOs are set to None so no ``bio_*`` call
can reach freed memory. The hub in ``edge.relay_hub`` then serves the
records; a stream in direct mode still works as a trio stream
(``_retry_direct`` waits for the readiness OpenSSL asks for), which is what
``aclose`` and any later caller use. Cost per small record after the switch:
an ``SSL_read``, an ``SSL_write`` and their system calls; the ~130 Python
calls of the memory-BIO path (trio's waits, this module's retry loop, the BIO
copies) are gone. Idle, a direct stream holds no BIO buffers.

Idle memory (issue 19: thousands of idle relayed connections)
=============================================================

An idle relayed connection is two ``SSL`` objects and their Python around
them; what this module keeps per stream, once established:

* The memory BIOs never give back the buffer they grew to (OpenSSL's
  ``BUF_MEM`` only grows): one 128 KiB transport read fed at once, or 128 KiB
  of plaintext encrypted before one ``bio_read``, left each BIO that big for
  the rest of the connection (measured: ~570 KiB per idle relayed connection
  after a single 128 KiB burst each way, against ~80 after 1 KiB). A
  transport read is now fed in ``_BIO_SLICE`` slices, the next one when
  OpenSSL asks for more (what is left is copied out of the shared read buffer
  before any await: ``_keep_unfed``), and ``_write_some`` drains the outgoing
  BIO every ``_BIO_SLICE`` of plaintext. OpenSSL's own record buffers go back
  when empty (``MODE_RELEASE_BUFFERS``).
* The handshake's judgement (the verify callback's per-connection copy of the
  walked path) is dropped when the handshake ends; only the verdict is kept,
  and the gateway swaps in its shared copy (``share_verdict``,
  ``edge.shared_certs``).
* No per-instance dict (``__slots__``), no handshake event unless a second
  caller waits, no ``ParkingLot`` in a gate until it is contended.
* ``relay_idle_fd`` lets the relay wait for an idle socket in its own frame
  rather than five coroutine frames deep.

What remains per ``SSL`` object is OpenSSL's (measured with heaptrack on
OpenSSL 4.0: the connection struct, two record layers, cipher contexts, the
peer's certificates, the session): about 30 KiB, plus ~9 KiB on a client
that offered an ML-KEM key share, which OpenSSL keeps until the end.

Verdict in the handshake
========================

pyOpenSSL's verify callback sees one certificate at a time (inside it the
server's ``get_peer_cert_chain()`` is still None: OpenSSL stores the chain
only after verification), and when it returns False OpenSSL keeps its current
``X509_V_ERR_*`` code and turns it into the alert (``ssl_x509err2alert``). So a
partner-facing context (``server_context(partner_trust=...)``) gets a store
whose errors mean something: every partner's anchors (``PARTIAL_CHAIN``: pinned
issuing CAs are anchors) and the CRLs of partners whose revocation is not
``off`` (``CRL_CHECK_ALL``, so a revoked certificate is error 23). The
callback (``_HandshakeJudge``):

* collects the path OpenSSL walks (top down, one certificate per call);
* on an error that is a fact about that path (unknown issuer, expired, not
  yet valid, revoked, bad signature, not a CA, wrong purpose, key too small,
  MD5/SHA-1 signature below the anchor: OpenSSL security level 2)
  refuses at once, so OpenSSL's own code picks the alert: ``unknown_ca``,
  ``certificate_expired``, ``bad_certificate``, ``certificate_revoked``,
  ``decrypt_error``, ``unsupported_certificate``;
* when such an error comes before the walk, with only the leaf known (wrong
  purpose, no issuer, an unreadable extension), asks the core on the leaf
  alone: its reason (and partner) replaces OpenSSL's only when it is a
  refusal other than ``unknown_ca``, so the core sharpens, never overrules;
  an error at a depth past ``MAX_CHAIN_LENGTH`` is ``invalid_chain``;
* overrules every other OpenSSL error (a missing CRL, a stale CRL, ...) and
  lets the walk go on;
* at the last call (depth 0, OpenSSL satisfied) asks the core,
  ``PartnerTrust.verify_client``, on the walked path, and returns its answer.
  OpenSSL's "ok" never accepts what the core rejects. A refusal only the core
  sees (name outside the partner's domains, disabled, ambiguous, weak
  signature, profile) has no X509 error of its own at that point; pyOpenSSL's
  public callback cannot set one (OpenSSL 3+ would report
  ``X509_V_ERR_UNSPECIFIED``, alert ``internal_error``), so the judge is
  installed by ``edge.verify_alert``, which sets the error whose alert says
  why (``bad_certificate`` for a name outside the partner's domains; its
  docstring has the table and why it uses pyOpenSSL's private binding).
  docs/operations.md lists what a refused partner sees per reason.

The connection's verdict (the core's, or for an OpenSSL refusal one built
from its error code) is kept for the gateway: ``TLSStream.handshake_verdict``.
A completed handshake whose verdict is missing or not accepted must be
treated as rejected (the gateway fails closed on it).

Key exchange groups: pyOpenSSL cannot set them; ``edge/openssl.cnf`` (loaded
through ``OPENSSL_CONF``, which ``edge/__init__.py`` sets before OpenSSL
starts unless the operator set one) limits every context to X25519MLKEM768,
X25519, P-256 and P-384 (Mozilla "intermediate", plus the hybrid), with key
shares for the hybrid and X25519. The pool's client context sends the X25519
share only while still preferring the hybrid (``client_context(...,
ml_kem_share=False)``, through pyOpenSSL's binding).
"""

from __future__ import annotations

import contextlib
import enum
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from edge import verify_alert
from edge.core.config import is_ip_address
from edge.core.policies import Revocation
from edge.core.reasons import Reason
from edge.core.trust import (
    MAX_CHAIN_LENGTH,
    PartnerTrust,
    Verdict,
    crypto_floor_problem,
    reason_for_openssl_error,
)

if TYPE_CHECKING:
    from OpenSSL.crypto import X509

# pyOpenSSL's binding, for what pyOpenSSL has no call for: moving a stream onto
# its socket ("Direct mode") and the pool's key shares (client_context). None
# when a pyOpenSSL without these names is installed: neither is then used.
try:
    from OpenSSL._util import lib as _ssl_lib

    _SSL_SET_FD: Callable[[Any, int], int] | None = _ssl_lib.SSL_set_fd
    _SET_GROUPS: Callable[[Any, bytes], int] | None = _ssl_lib.SSL_CTX_set1_curves_list
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
    _SSL_SET_FD = None
    _SET_GROUPS = None

__all__ = [
    "MOZILLA_INTERMEDIATE_TLS12_CIPHERS",
    "TLS_PROFILES",
    "HostnameMismatchError",
    "TLSError",
    "TLSStream",
    "TLSTruncatedError",
    "client_context",
    "server_context",
]

T = TypeVar("T")

# How much ciphertext one transport read asks for. Large enough that one read
# usually carries several 16 KiB records, small enough to bound memory.
_TRANSPORT_READ_SIZE = 128 * 1024
# How much plaintext receive_some returns when the caller gives no max_bytes.
_DEFAULT_RECEIVE_SIZE = 128 * 1024
# How much plaintext is encrypted before one transport send.
_WRITE_CHUNK = 128 * 1024
# The most ciphertext either memory BIO holds at once. A memory BIO never gives
# back the buffer it grew to (measured: after one 128 KiB burst an idle relayed
# connection kept ~570 KiB, its four BIOs' high-water marks), so a transport
# read is fed to OpenSSL in slices of this size and the outgoing BIO is
# drained whenever this much plaintext was encrypted (see "Idle memory").
_BIO_SLICE = 32 * 1024
# How much ciphertext one bio_read may take out of the outgoing BIO: a
# _BIO_SLICE of plaintext in records with their overhead (pyOpenSSL allocates
# this much per call).
_BIO_READ_SIZE = _BIO_SLICE + 2048
# While a read is fed slice by slice, the next slice goes in as soon as less
# than one record may be left in the BIO (so no WantReadError per slice):
# what is left is estimated from the plaintext OpenSSL returned plus this much
# per record (TLS 1.3's AEAD overhead; TLS 1.2's is larger, which only makes
# the estimate feed later, at worst when OpenSSL asks).
_RECORD_OVERHEAD = 22
_ONE_RECORD = 16 * 1024 + 512
# The most plaintext one SSL_read can return (one record): pyOpenSSL allocates
# the size asked for on every call, so asking for more only costs.
_RECORD_PLAINTEXT = 16 * 1024
# A relay read that returned data checks the outgoing BIO (a TLS 1.3
# KeyUpdate answer) only once in this many reads; every write takes it anyway.
_LAZY_READS = 8
# ... and only when the transport read that fed it was at most this big, so
# what a peer can make OpenSSL queue there meanwhile stays small.
_LAZY_FED_MAX = 4096
# One transport read lands here (see _transport_receive): shared by every
# stream of the process, used only between two awaits.
_SCRATCH = bytearray(_TRANSPORT_READ_SIZE)
_SCRATCH_VIEW = memoryview(_SCRATCH)
_SCRATCH_LIST = [_SCRATCH]
# How long aclose() and an error path spend trying to deliver a close_notify or
# an alert to a peer that does not read.
_DEFAULT_CLOSE_TIMEOUT = 1.0
# Client contexts that resume sessions -> {server host name: newest session}.
_SESSIONS: weakref.WeakKeyDictionary[SSL.Context, dict[str, SSL.Session]] = (
    weakref.WeakKeyDictionary()
)
# Most host names one context remembers sessions for (a pool is small).
_MAX_SESSION_HOSTS = 1024
# Certificates seen in verify callbacks, by DER (see _interned): at most
# 1024 of at most 4 KiB (real ones are 0.5-2 KiB), so ~10 MiB at worst
# whatever peers send.
_INTERNED: dict[bytes, x509.Certificate] = {}
_MAX_INTERNED = 1024
_MAX_INTERNED_DER = 4096
# (server certificate, host name) pairs that matched (see _verify_hostname).
_HOSTNAME_MATCHES: dict[tuple[x509.Certificate, str], None] = {}
_MAX_HOSTNAME_MATCHES = 1024

# The pool's groups (client_context(ml_kem_share=False)): the hybrid first and
# in a tuple of its own, so a server with ML-KEM prefers it, but only X25519
# gets a key share ("*"). OpenSSL 3.5+ syntax, as in edge/openssl.cnf.
_POOL_GROUPS = b"X25519MLKEM768 / *X25519:P-256:P-384"

# Mozilla's "intermediate" TLS 1.2 suites (v5.7), restricted to ECDHE + AEAD
# (the DHE suites are left out: finite-field DH is slow and rarely needed).
MOZILLA_INTERMEDIATE_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


# `[tls] profile`: Mozilla's "intermediate" (TLS 1.2 and 1.3) or "modern" (TLS 1.3 only).
TLS_PROFILES = ("intermediate", "modern")
# OpenSSL security level 2 (112-bit): refuses RSA/DH keys under 2048 bits and
# MD5/SHA-1 signatures in handshakes and in the chains OpenSSL verifies.
_SECURITY_LEVEL = ":@SECLEVEL=2"

# The private-key types pyOpenSSL can install in a Context.
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)

# What a transport raises when the peer is already gone.
_TRANSPORT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class TLSError(trio.BrokenResourceError):
    """The TLS layer failed: a protocol error, an alert, a failed handshake.

    ``openssl_errors`` holds OpenSSL's error queue entries (library, function,
    reason) when there were any; ``str()`` is a one-line description without
    any key material or payload.
    """

    def __init__(self, message: str, openssl_errors: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.openssl_errors: tuple[Any, ...] = tuple(openssl_errors)


class TLSTruncatedError(TLSError):
    """The transport ended without a close_notify (TCP closed mid-stream)."""


class HostnameMismatchError(TLSError):
    """The server's certificate does not name the host we connected to."""


class _NeedBytes(SSL.WantReadError):
    """``_read_plain`` without asking OpenSSL: its last read found no complete
    record, and no ciphertext came in since (see ``TLSStream._drained``)."""


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raise BusyResourceError when two tasks use one direction at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


def _describe(exc: SSL.Error) -> tuple[str, list[Any]]:
    """A one-line description of an OpenSSL error, and its raw error list."""
    errors = list(exc.args[0]) if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(e[2]) for e in errors if isinstance(e, tuple) and len(e) == 3]
    if reasons:
        return "; ".join(reasons), errors
    return (str(exc) or type(exc).__name__), errors


def _tls_error(exc: SSL.Error) -> TLSError:
    """The stream error for an OpenSSL failure."""
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else -1
        if isinstance(code, int) and code > 0:
            # Direct mode only: the socket itself failed (ECONNRESET, EPIPE).
            return TLSError(f"transport failed: {os.strerror(code)}")
        # (-1, 'Unexpected EOF'): the transport ended without close_notify.
        return TLSTruncatedError("peer closed the connection without TLS close_notify")
    message, errors = _describe(exc)
    return TLSError(message, errors)


class TLSStream(trio.abc.HalfCloseableStream):
    """A TLS connection over a trio stream, server or client side.

    Args:
      transport_stream: the stream carrying ciphertext (usually a
        ``trio.SocketStream``, which sets TCP_NODELAY).
      context: a fully built ``OpenSSL.SSL.Context`` (see ``server_context``
        and ``client_context``). It must not be modified afterwards.
      server_side: True to accept, False to connect.
      server_hostname: client side only: sent as SNI and, when
        ``check_hostname`` is true, matched (RFC 6125) against the server
        certificate's subject alternative names after the handshake.
      check_hostname: client side only; defaults to True when a
        ``server_hostname`` is given.
      close_timeout: the most ``aclose()`` spends delivering close_notify.
    """

    # Thousands of these live at once, two per relayed connection: no
    # per-instance dict (see "Idle memory" in the module docstring).
    __slots__ = (
        "_check_hostname",
        "_close_hook",
        "_close_timeout",
        "_conn",
        "_deferred_error",
        "_delayed_outgoing",
        "_direct",
        "_drained",
        "_eof_received",
        "_eof_sent",
        "_fed_left",
        "_handshake_finished",
        "_handshake_ok",
        "_handshake_started",
        "_handshake_waiters",
        "_last_fed",
        "_lazy_reads",
        "_out_parts",
        "_outer_recv",
        "_outer_send",
        "_recv_count",
        "_recv_lock",
        "_send_lock",
        "_session_cache",
        "_socket",
        "_state",
        "_unfed",
        "_verdict",
        "_write_view",
        "server_hostname",
        "server_side",
        "transport_stream",
    )

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        check_hostname: bool | None = None,
        close_timeout: float = _DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if server_side and server_hostname is not None:
            raise ValueError("server_hostname is for the client side only")
        if check_hostname and server_hostname is None:
            raise ValueError("check_hostname needs a server_hostname")
        self.transport_stream = transport_stream
        self.server_side = server_side
        self.server_hostname = server_hostname
        self._check_hostname = (
            server_hostname is not None if check_hostname is None else check_hostname
        )
        self._close_timeout = close_timeout
        # Where to keep this connection's session once it is resumable (client
        # side, resume_sessions contexts only); None once kept.
        self._session_cache: dict[str, SSL.Session] | None = None
        self._conn = SSL.Connection(context, None)
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            if server_hostname is not None:
                self._conn.set_tlsext_host_name(_sni_bytes(server_hostname))
                cache = _SESSIONS.get(context)
                if cache is not None:
                    self._session_cache = cache
                    session = cache.get(server_hostname)
                    if session is not None:
                        self._conn.set_session(session)
        self._state = _State.OK
        self._handshake_started = False
        self._handshake_finished = False  # the attempt ended, either way
        # Made only when a second caller has to wait for the handshake.
        self._handshake_waiters: trio.Event | None = None
        self._handshake_ok = False
        # The verdict reached inside the handshake, taken out of _JUDGEMENTS
        # when it ended (with it goes the judgement's copy of the path).
        self._verdict: Verdict | None = None
        self._delayed_outgoing: bytes | None = None
        self._send_lock = _Gate()
        self._recv_lock = _Gate()
        self._recv_count = 0
        self._eof_received = False
        # OpenSSL's last read found no complete record and no ciphertext was
        # fed since: the next read goes to the transport without asking it.
        self._drained = False
        # An error met after some plaintext was decrypted (see _read_plain).
        self._deferred_error: SSL.Error | None = None
        self._eof_sent = False
        self._outer_send = _ConflictDetector("another task is sending on this TLSStream")
        self._outer_recv = _ConflictDetector("another task is receiving on this TLSStream")
        # Relay reads since the outgoing BIO was last checked, and the size of
        # the last transport read (see _retry).
        self._lazy_reads = 0
        self._last_fed = 0
        # Resumable progress of the send in flight (see _write_some), and the
        # records it already took out of the outgoing BIO.
        self._write_view: memoryview | None = None
        self._out_parts: list[bytes] | None = None
        # Ciphertext read from the transport but not yet given to OpenSSL (a
        # transport read is fed in _BIO_SLICE slices); never a view of _SCRATCH
        # across an await (see _keep_unfed).
        self._unfed: memoryview | None = None
        self._fed_left = 0  # estimated ciphertext still in the incoming BIO
        # A trio SocketStream: ciphertext moves with os.readv/os.write on its
        # descriptor (see "Data path" in the module docstring).
        self._socket: trio.socket.SocketType | None = (
            transport_stream.socket if isinstance(transport_stream, trio.SocketStream) else None
        )
        # OpenSSL reads and writes the socket itself (go_direct), and what
        # aclose must tell the relay hub before the socket goes.
        self._direct = False
        self._close_hook: Callable[[], None] | None = None

    # ------------------------------------------------------------------
    # What the handshake established

    @property
    def connection(self) -> SSL.Connection:
        """The underlying pyOpenSSL connection (for inspection, not for I/O)."""
        return self._conn

    @property
    def handshake_done(self) -> bool:
        """True once the handshake has *succeeded* (False after a failed one)."""
        return self._handshake_ok

    def _need_handshake(self, what: str) -> None:
        if not self._handshake_finished:
            raise trio.BrokenResourceError(f"call do_handshake() before reading {what}")

    @property
    def peer_chain(self) -> list[x509.Certificate]:
        """The certificates the peer sent, leaf first, as sent (unverified).

        OpenSSL omits the leaf from the server-side chain; this puts it back so
        both sides see the same shape. Empty when the peer sent none.
        """
        self._need_handshake("peer_chain")
        chain = self._conn.get_peer_cert_chain(as_cryptography=True) or []
        if self.server_side:
            leaf = self._conn.get_peer_certificate(as_cryptography=True)
            if leaf is None:
                return []
            return [leaf, *chain]
        return list(chain)

    @property
    def verified_chain(self) -> list[x509.Certificate]:
        """The chain OpenSSL verified, leaf first, ending with the trust anchor.

        Meaningful only when the context verifies the peer with OpenSSL (the
        client contexts made here do). Server contexts made here leave the
        decision to ``edge.core.trust``, whose verdict carries its own verified
        chain; for them this is empty or OpenSSL's unverified guess.
        """
        self._need_handshake("verified_chain")
        return list(self._conn.get_verified_chain(as_cryptography=True) or [])

    @property
    def handshake_verdict(self) -> Verdict | None:
        """The core's verdict reached inside the handshake (a context built with
        ``server_context(partner_trust=...)``), readable after a failed handshake
        too (why it was refused). None when no verdict was reached: treat that,
        and any verdict not accepted, as a refusal."""
        if self._handshake_finished:
            return self._verdict
        return handshake_verdict(self._conn)

    def share_verdict(self, verdict: Verdict) -> None:
        """Hold ``verdict``, equal to ``handshake_verdict``, instead of this
        stream's own copy: the gateway's one object for every connection of a
        partner (edge.shared_certs), so that an idle connection keeps no second
        copy of the path. ValueError if it is not equal."""
        if not self._handshake_finished or verdict != self._verdict:
            raise ValueError("not this stream's handshake verdict")
        self._verdict = verdict

    @property
    def version(self) -> str:
        """Negotiated protocol version, e.g. ``TLSv1.3``."""
        self._need_handshake("version")
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str | None:
        """Negotiated cipher suite name, e.g. ``TLS_AES_128_GCM_SHA256``."""
        self._need_handshake("cipher")
        return self._conn.get_cipher_name()

    @property
    def requested_server_name(self) -> str | None:
        """The SNI the client asked for (server side), or None."""
        name = self._conn.get_servername()
        return name.decode("ascii", "replace") if name is not None else None

    # ------------------------------------------------------------------
    # The engine

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLSStream is broken")
        raise trio.ClosedResourceError("this TLSStream is closed")

    def _take_outgoing(self) -> bytes:
        """Everything OpenSSL has written, emptying the outgoing BIO."""
        parts = self._take_outgoing_parts()
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _take_outgoing_parts(self) -> list[bytes]:
        """``_take_outgoing`` as the pieces it was taken out in (one
        ``writev``, no join)."""
        if self._direct:  # OpenSSL wrote to the socket itself
            return []
        parts = self._out_parts or []  # records _write_some took out already
        self._out_parts = None
        while True:
            try:
                chunk = self._conn.bio_read(_BIO_READ_SIZE)
            except SSL.WantReadError:
                # pyOpenSSL signals "outgoing BIO empty" this way.
                break
            parts.append(chunk)
            if len(chunk) < _BIO_READ_SIZE:
                # A memory BIO hands out all it holds up to the size asked
                # for: less means it is empty now (no second read, no
                # exception per record batch).
                break
        return parts

    async def _transport_send(self, parts: list[bytes]) -> bool:
        """Send all of ``parts``, in order, on the transport; True when it had
        to wait."""
        sock = self._socket
        if sock is None:
            await self.transport_stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
            return True
        # One writev for the records ``_write_some`` took out slice by slice:
        # they go out without being joined (one piece: the same as write).
        views = [memoryview(parts[0])] if len(parts) == 1 else [memoryview(p) for p in parts]
        left = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        waited = False
        while left:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the transport is closed")
            try:
                n = os.writev(fd, views)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                waited = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"transport send failed: {exc}") from exc
            left -= n
            if not left:
                return waited
            while n:  # drop what was written from the front
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0
            while views and not views[0]:
                views.pop(0)
        return waited

    async def _transport_receive(self) -> bool:
        """Read once from the transport into the incoming BIO (end of stream:
        ``bio_shutdown``); True when it had to wait."""
        sock = self._socket
        if sock is None:
            data = await self.transport_stream.receive_some(_TRANSPORT_READ_SIZE)
            self._last_fed = len(data)
            if data:
                self._unfed = memoryview(data)
                self._feed_unfed()
            else:
                self._conn.bio_shutdown()
            return True
        waited = False
        if self._last_fed < _TRANSPORT_READ_SIZE and self._last_fed > 0:
            # The last read emptied the socket: with a message or two in
            # flight per connection, asking again now would almost always be
            # an EAGAIN (a system call and an exception) before the wait.
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the transport is closed")
            await trio.lowlevel.wait_readable(fd)
            waited = True
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the transport is closed")
            try:
                # Into one module-wide buffer: no 128 KiB allocation per read,
                # and no await between filling it and handing it to OpenSSL.
                n = os.readv(fd, _SCRATCH_LIST)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                waited = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"transport receive failed: {exc}") from exc
            break
        self._last_fed = n
        if n > _BIO_SLICE:
            self._unfed = _SCRATCH_VIEW[:n]  # kept only until the next await
            self._feed_unfed()
        elif n:
            self._conn.bio_write(_SCRATCH_VIEW[:n])
            self._fed_left += n
        else:
            self._conn.bio_shutdown()
        return waited

    def _feed_unfed(self) -> bool:
        """Give OpenSSL the next slice of the ciphertext read and not yet fed;
        False when there was none."""
        view = self._unfed
        if view is None:
            return False
        if len(view) > _BIO_SLICE:
            self._conn.bio_write(view[:_BIO_SLICE])
            self._unfed = view[_BIO_SLICE:]
            self._fed_left += _BIO_SLICE
        else:
            self._conn.bio_write(view)
            self._unfed = None
            self._fed_left += len(view)
        return True

    def _keep_unfed(self) -> None:
        """Copy what is left unfed out of _SCRATCH, which the next transport
        read (of any stream) overwrites: before every await."""
        view = self._unfed
        if view is not None and view.obj is _SCRATCH:
            self._unfed = memoryview(bytes(view))

    async def _flush_after_error(self) -> None:
        """Deliver an alert OpenSSL queued before failing, if we can, quickly."""
        try:
            data = self._take_outgoing()
        except SSL.Error:
            return
        if self._delayed_outgoing:
            data = self._delayed_outgoing + data
            self._delayed_outgoing = None
        if not data or self._send_lock.locked():
            return
        with trio.move_on_after(self._close_timeout):
            async with self._send_lock:
                with contextlib.suppress(*_TRANSPORT_GONE):
                    await self._transport_send([data])

    async def _fail(self, exc: SSL.Error) -> TLSError:
        self._state = _State.BROKEN
        await self._flush_after_error()
        return _tls_error(exc)

    async def _retry(
        self,
        fn: Callable[[], T],
        *,
        is_handshake: bool = False,
        eager: bool = False,
        lazy_reads: bool = False,
    ) -> T | None:
        """Run ``fn`` until it completes, doing the I/O it asks for.

        See the module docstring for the theory. ``eager``: no schedule point
        when no I/O had to wait (the relay's data path, which yields by itself).
        """
        if self._direct:
            return await self._retry_direct(fn, eager=eager)
        if not eager:
            # The relay checks for cancellation at its own schedule points.
            await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        finished = False
        ret: T | None = None
        while not finished:
            want_read = False
            called_openssl = True
            try:
                ret = fn()
            except _NeedBytes:
                want_read = True
                called_openssl = False
            except SSL.WantReadError:
                want_read = True
            except SSL.Error as exc:
                self._keep_unfed()
                raise await self._fail(exc) from exc
            else:
                finished = True
            finally:
                if self._unfed is not None:
                    self._keep_unfed()
            # Every path drains the outgoing BIO right after calling OpenSSL,
            # with no await in between, except a relay read that returned
            # data: the outgoing BIO is then checked every _LAZY_READS reads
            # only (see "Data path" in the module docstring).
            to_send: list[bytes] = []
            if not called_openssl:
                pass
            elif lazy_reads and finished and ret and self._last_fed <= _LAZY_FED_MAX:
                self._lazy_reads += 1
                if self._lazy_reads >= _LAZY_READS:
                    self._lazy_reads = 0
                    to_send = self._take_outgoing_parts()
            else:
                to_send = self._take_outgoing_parts()
            if (
                is_handshake
                and finished
                and self.server_side
                and self._conn.get_protocol_version_name() == "TLSv1.3"
            ):
                # Hold back the TLS 1.3 server's session tickets (see theory).
                if to_send:
                    self._delayed_outgoing = b"".join(to_send)
                to_send = []
            if to_send:
                try:
                    await self._send_lock.acquire()
                    try:
                        if self._delayed_outgoing is not None:
                            to_send = [self._delayed_outgoing, *to_send]
                            self._delayed_outgoing = None
                        if await self._transport_send(to_send):
                            yielded = True
                    finally:
                        self._send_lock.release()
                except BaseException:
                    # Records taken out of OpenSSL are lost (cancelled while
                    # queueing for the lock) or partly sent: no way back.
                    self._state = _State.BROKEN
                    raise
            elif want_read and self._unfed is not None:
                # Ciphertext already read and not yet given to OpenSSL: feed
                # it before reading the transport again.
                self._feed_unfed()
                self._drained = False
            elif want_read:
                recv_count = self._recv_count
                await self._recv_lock.acquire()
                try:
                    if recv_count == self._recv_count:
                        if await self._transport_receive():
                            yielded = True
                        self._drained = False
                        self._recv_count += 1
                finally:
                    self._recv_lock.release()
        if not yielded and not eager:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return ret

    # ------------------------------------------------------------------
    # Handshake

    async def do_handshake(self) -> None:
        """Run the TLS handshake (once; later calls wait for or reuse it).

        Raises ``TLSError`` (a ``trio.BrokenResourceError``) when it fails,
        ``HostnameMismatchError`` on the client side when the server's
        certificate does not name ``server_hostname``. Cancelled, it leaves the
        stream broken: put a timeout around it.
        """
        self._check_status()
        if self._handshake_started:
            if self._handshake_finished:
                await trio.lowlevel.checkpoint()
            else:
                if self._handshake_waiters is None:
                    self._handshake_waiters = trio.Event()
                await self._handshake_waiters.wait()
            self._check_status()
            return
        self._handshake_started = True
        try:
            await self._retry(self._conn.do_handshake, is_handshake=True)
            if self._check_hostname:
                self._verify_hostname()
            if (
                self._session_cache is not None
                and self._conn.get_protocol_version_name() != "TLSv1.3"
            ):
                self._remember_session()
            self._handshake_ok = True
        except BaseException:
            self._state = _State.BROKEN
            raise
        finally:
            self._handshake_finished = True
            # The verdict stays; the judgement (its own copy of the walked path,
            # per connection) goes now rather than with the connection.
            judgement = _JUDGEMENTS.pop(self._conn, None)
            self._verdict = judgement.verdict if judgement is not None else None
            # Wake any waiter, success or not; they re-check the state.
            if self._handshake_waiters is not None:
                self._handshake_waiters.set()
                self._handshake_waiters = None

    def _verify_hostname(self) -> None:
        from service_identity import VerificationError
        from service_identity.cryptography import (
            verify_certificate_hostname,
            verify_certificate_ip_address,
        )

        assert self.server_hostname is not None
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            raise HostnameMismatchError("server sent no certificate")
        # A pure function of the certificate (compared by DER) and the name: a
        # resumed pool member presents the same one on every connection.
        key = (cert, self.server_hostname)
        if key in _HOSTNAME_MATCHES:
            return
        try:
            if is_ip_address(self.server_hostname):
                verify_certificate_ip_address(cert, self.server_hostname)
            else:
                verify_certificate_hostname(cert, self.server_hostname)
        except (VerificationError, ValueError) as exc:
            raise HostnameMismatchError(
                f"server certificate does not name {self.server_hostname!r}"
            ) from exc
        except Exception as exc:  # service_identity raises its own for "no SAN"
            raise HostnameMismatchError(
                f"server certificate does not name {self.server_hostname!r}: {exc}"
            ) from exc
        if len(_HOSTNAME_MATCHES) >= _MAX_HOSTNAME_MATCHES:
            _HOSTNAME_MATCHES.pop(next(iter(_HOSTNAME_MATCHES)))
        _HOSTNAME_MATCHES[key] = None

    async def _ensure_handshake(self) -> None:
        if not self._handshake_finished:
            await self.do_handshake()
        self._check_status()

    # ------------------------------------------------------------------
    # Receiving

    def _read_plain(self, max_bytes: int) -> bytes:
        """Decrypt up to ``max_bytes``: every complete record already buffered,
        and the rest of the last transport read, fed slice by slice.

        Returns b"" once the peer's close_notify has been read.
        """
        if self._eof_received:
            return b""
        if self._deferred_error is not None:
            exc, self._deferred_error = self._deferred_error, None
            raise exc
        if self._drained:
            raise _NeedBytes
        chunks: list[bytes] = []
        got = 0
        while got < max_bytes:
            try:
                more = self._conn.recv(min(max_bytes - got, _RECORD_PLAINTEXT))
            except SSL.WantReadError:
                self._fed_left = 0  # the incoming BIO is empty
                if self._unfed is not None and self._feed_unfed():
                    continue
                self._drained = True
                if not chunks:
                    raise
                break
            except SSL.ZeroReturnError:
                self._eof_received = True
                break
            except SSL.Error as exc:
                if not chunks:
                    raise
                # Hand back what we have and raise this on the next call: a
                # second recv() would not repeat OpenSSL's reason (it reports
                # an empty error), and the reason (an alert, a bad record MAC,
                # a truncation) is what the caller must see.
                self._deferred_error = exc
                break
            chunks.append(more)
            got += len(more)
            if self._unfed is not None:
                self._fed_left -= len(more) + _RECORD_OVERHEAD
                if self._fed_left < _ONE_RECORD:
                    self._feed_unfed()
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes from the peer; ``b""`` after its close_notify.

        Raises ``TLSTruncatedError`` when the transport ends without a
        close_notify, ``TLSError`` on any other TLS failure.
        """
        return await self._receive(max_bytes, eager=False)

    async def relay_receive(self, max_bytes: int) -> bytes:
        """``receive_some`` without a schedule point when the bytes were already
        there (it still raises ``Cancelled`` when cancelled). For a caller that
        yields by itself at least every few calls (``edge.relay``)."""
        return await self._receive(max_bytes, eager=True)

    async def _receive(self, max_bytes: int | None, *, eager: bool) -> bytes:
        with self._outer_recv:
            if self._state is not _State.OK or not self._handshake_ok:
                self._check_status()
                await self._ensure_handshake()
            if max_bytes is None:
                max_bytes = _DEFAULT_RECEIVE_SIZE
            elif max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            data = await self._retry(
                lambda: self._read_plain(max_bytes), eager=eager, lazy_reads=eager
            )
            assert data is not None
            if self._session_cache is not None:
                # TLS 1.3: the server's tickets came before these bytes.
                self._remember_session()
            return data

    def relay_idle_fd(self) -> int:
        """The descriptor a relay should wait on (readable) before its next
        ``relay_receive``, or -1 to call it at once.

        When OpenSSL holds no complete record, nothing came in since and the
        last transport read emptied the socket, ``relay_receive`` would only
        wait for the socket, five coroutine frames deep; an idle connection's
        parked stacks were a good part of its Python memory. A relay waits in
        its own frame instead, and the read after it goes straight to the
        socket (no second wait). Cancelled meanwhile, nothing was consumed.
        """
        sock = self._socket
        if (
            sock is None
            or not self._drained
            or self._state is not _State.OK
            or not self._handshake_ok
            or self._eof_received
            or self._deferred_error is not None
            or self._unfed is not None
            or self._recv_lock.locked()
            or not 0 < self._last_fed < _TRANSPORT_READ_SIZE
        ):
            return -1
        self._last_fed = 0  # the caller waits for readability: read at once after it
        return sock.fileno()

    def _remember_session(self) -> None:
        cache, self._session_cache = self._session_cache, None
        session = self._conn.get_session()
        if cache is None or session is None or self.server_hostname is None:
            return
        if len(cache) >= _MAX_SESSION_HOSTS and self.server_hostname not in cache:
            cache.pop(next(iter(cache)))
        cache[self.server_hostname] = session

    # ------------------------------------------------------------------
    # Sending

    def _write_some(self) -> bool:
        """Encrypt up to ``_WRITE_CHUNK`` of the pending plaintext.

        Progress lives in ``_write_view`` so that a retry (after a want-read)
        continues where OpenSSL stopped instead of writing bytes twice.
        Returns True when everything has been encrypted.
        """
        view = self._write_view
        assert view is not None
        budget = _WRITE_CHUNK
        pending = 0  # plaintext encrypted since the outgoing BIO was drained
        while view and budget > 0:
            n = self._conn.send(view[: min(len(view), budget)])
            view = view[n:]
            budget -= n
            self._write_view = view
            pending += n
            if pending >= _BIO_SLICE and view and budget > 0 and not self._direct:
                # More records follow in this batch: take these out now, so
                # the BIO never grows past about one slice (see _BIO_SLICE).
                if self._out_parts is None:
                    self._out_parts = []
                self._out_parts.append(self._conn.bio_read(_BIO_READ_SIZE))
                pending = 0
        return not view

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``.

        Cancelled mid-way, the stream is broken (part of a record may have
        been sent).
        """
        await self._send(data, eager=False)

    async def relay_send(self, data: bytes | bytearray | memoryview) -> None:
        """``send_all`` without a schedule point when the transport took
        everything at once (it still raises ``Cancelled`` when cancelled)."""
        await self._send(data, eager=True)

    async def _send(self, data: bytes | bytearray | memoryview, *, eager: bool) -> None:
        with self._outer_send:
            if self._state is not _State.OK or not self._handshake_ok:
                self._check_status()
                await self._ensure_handshake()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof() was called on this TLSStream")
            if not data:
                await trio.lowlevel.checkpoint()
                return
            self._write_view = memoryview(data).cast("B")
            try:
                while True:
                    done = await self._retry(self._write_some, eager=eager)
                    if done:
                        break
            except BaseException:
                if self._write_view:
                    self._state = _State.BROKEN
                raise
            finally:
                self._write_view = None

    async def send_eof(self) -> None:
        """Send close_notify; the peer can go on sending until it sends its own."""
        with self._outer_send:
            self._check_status()
            await self._ensure_handshake()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            self._eof_sent = True
            await self._retry(self._conn.shutdown)

    async def wait_send_all_might_not_block(self) -> None:
        with self._outer_send:
            self._check_status()
            await self.transport_stream.wait_send_all_might_not_block()

    # ------------------------------------------------------------------
    # Direct mode: OpenSSL on the socket (see "Direct mode")

    def can_go_direct(self) -> bool:
        """True when ``go_direct`` may move this stream onto its socket: an
        established stream over a ``trio.SocketStream`` that nobody is using,
        with both directions open."""
        return (
            _SSL_SET_FD is not None
            and self._socket is not None
            and not self._direct
            and self._state is _State.OK
            and self._handshake_ok
            and not self._eof_received
            and not self._eof_sent
            and self._deferred_error is None
            and self._write_view is None
            and not self._send_lock.locked()
            and not self._recv_lock.locked()
        )

    async def go_direct(self) -> bytes:
        """Hand the socket to OpenSSL: from now on it reads and writes the
        descriptor itself, and the caller waits for readiness.

        Returns the plaintext already decrypted from ciphertext this stream
        had read (send it before anything else). ``direct`` tells whether it
        switched: it does not when that plaintext ended with the peer's
        close_notify or an error (both kept for the next ``receive_some``,
        as after any read); the stream then works as before. Call only when
        ``can_go_direct()``.
        """
        assert _SSL_SET_FD is not None and self._socket is not None
        data = self._drain_buffered()
        parts = self._take_outgoing_parts()
        if self._delayed_outgoing is not None:
            parts.insert(0, self._delayed_outgoing)
            self._delayed_outgoing = None
        if parts:
            try:
                async with self._send_lock:
                    await self._transport_send(parts)
            except BaseException:
                self._state = _State.BROKEN
                raise
        fd = self._socket.fileno()
        if (
            self._state is _State.OK
            and self._drained  # the incoming BIO is empty
            and self._unfed is None
            and not self._eof_received
            and self._deferred_error is None
            and fd >= 0
        ):
            conn = self._conn
            # SSL_set_fd frees both memory BIOs; pyOpenSSL's pointers to them
            # go too, so that no bio_* call can reach freed memory (they
            # raise TypeError on None).
            if _SSL_SET_FD(conn._ssl, fd) == 1:
                conn._into_ssl = None
                conn._from_ssl = None
                self._direct = True
                self._drained = False
                self._last_fed = 0
                self._fed_left = 0
        return data

    def _drain_buffered(self) -> bytes:
        """Decrypt every record already read from the transport, no I/O."""
        chunks: list[bytes] = []
        while True:
            try:
                more = self._read_plain(_TRANSPORT_READ_SIZE)
            except SSL.WantReadError:  # _NeedBytes too: all decrypted
                break
            except SSL.Error as exc:
                self._deferred_error = exc
                break
            if not more:
                break
            chunks.append(more)
        return b"".join(chunks)

    @property
    def direct(self) -> bool:
        """True once ``go_direct`` moved this stream onto its socket."""
        return self._direct

    def direct_io(self) -> tuple[SSL.Connection, trio.socket.SocketType]:
        """The connection and socket a relay hub reads and writes (direct mode)."""
        assert self._direct and self._socket is not None
        return self._conn, self._socket

    def direct_failed(self, exc: SSL.Error) -> TLSError:
        """A hub's call on this stream failed: the stream is broken (OpenSSL
        already wrote any alert to the socket); the error to report."""
        self._state = _State.BROKEN
        return _tls_error(exc)

    def direct_eof(self, *, sent: bool) -> None:
        """A hub read this stream's close_notify (sent=False) or is sending
        ours (sent=True)."""
        if sent:
            self._eof_sent = True
        else:
            self._eof_received = True

    def direct_close_hook(self, hook: Callable[[], None] | None) -> None:
        """Have ``aclose`` call ``hook`` before it closes the socket (a relay
        hub takes the socket out of its epoll set); None removes it."""
        self._close_hook = hook

    def direct_first_read(self) -> None:
        """A hub read data: TLS 1.3 session tickets came before it."""
        if self._session_cache is not None:
            self._remember_session()

    async def _retry_direct(self, fn: Callable[[], T], *, eager: bool) -> T:
        """``_retry`` for direct mode: OpenSSL does the I/O; we wait for the
        readiness it asks for (under the gate of that direction, so that a
        read wanting to write never waits on the socket beside a writer)."""
        if not eager:
            await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        while True:
            try:
                ret = fn()
                break
            except SSL.WantReadError:  # _NeedBytes too
                self._drained = False
                gate, wait = self._recv_lock, trio.lowlevel.wait_readable
            except SSL.WantWriteError:
                gate, wait = self._send_lock, trio.lowlevel.wait_writable
            except SSL.Error as exc:
                self._state = _State.BROKEN
                raise _tls_error(exc) from exc
            assert self._socket is not None
            fd = self._socket.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the transport is closed")
            await gate.acquire()
            try:
                await wait(fd)
            finally:
                gate.release()
            yielded = True
        if not yielded and not eager:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return ret

    # ------------------------------------------------------------------
    # Closing

    async def aclose(self) -> None:
        """Send close_notify if possible (bounded in time), close the transport.

        Never waits for the peer. Cancelled, it closes the transport at once.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        if self._close_hook is not None:
            hook, self._close_hook = self._close_hook, None
            hook()
        graceful = (
            self._state is _State.OK
            and self._handshake_finished
            and not self._eof_sent
            and not self._send_lock.locked()
        )
        self._state = _State.CLOSED
        try:
            if graceful:
                self._eof_sent = True
                with trio.move_on_after(self._close_timeout):
                    with contextlib.suppress(SSL.Error):
                        self._conn.shutdown()
                    data = (self._delayed_outgoing or b"") + self._take_outgoing()
                    self._delayed_outgoing = None
                    if data:
                        async with self._send_lock:
                            await self._transport_send([data])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, SSL.Error):
            pass
        finally:
            transport = self.transport_stream
            if type(transport) is trio.SocketStream:
                # aclose_forcefully's effect (closed at once, never blocks, never
                # raises Cancelled) without its cancelled scope and the Cancelled
                # it raises and catches: twice per relayed connection.
                transport.socket.close()
                await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                await trio.aclose_forcefully(transport)


class _Gate:
    """A strict-FIFO lock for the tasks of one stream, cheaper than trio's.

    A free gate is taken without a schedule point: every use here is followed
    by a transport operation, which waits if it has to, and the relay yields
    by itself (``trio.Lock`` always yields, and its deadlock-detection
    bookkeeping costs about ten Python calls per acquire and release: two
    locks per record). A busy gate queues its callers in a ``ParkingLot`` and
    ``release`` hands ownership to the first of them, so the order is FIFO; a
    caller cancelled while queued never gets it.
    """

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        # Made at the first contention: four gates per relayed connection, and
        # most are never contended (an empty ParkingLot is ~0.5 KiB).
        self._lot: trio.lowlevel.ParkingLot | None = None

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        if not self._held:
            self._held = True
            return
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()  # release() handed the gate over to us

    def release(self) -> None:
        if self._lot:  # None or empty: nobody waits
            self._lot.unpark(count=1)
        else:
            self._held = False

    async def __aenter__(self) -> None:
        # The close and error paths: a cancelled caller sends nothing.
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def _sni_bytes(hostname: str) -> bytes:
    # SNI carries DNS names only (RFC 6066), never IP literals, and in A-label
    # form.
    if is_ip_address(hostname):
        return b""
    return hostname.rstrip(".").encode("idna")


# ----------------------------------------------------------------------
# Context factories


def _base_context(
    chain: Sequence[x509.Certificate] | None,
    key: PrivateKey | None,
    profile: str = "intermediate",
) -> SSL.Context:
    if profile not in TLS_PROFILES:
        raise ValueError(f"unknown TLS profile {profile!r} (one of {', '.join(TLS_PROFILES)})")
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION if profile == "modern" else SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    ctx.set_cipher_list((MOZILLA_INTERMEDIATE_TLS12_CIPHERS + _SECURITY_LEVEL).encode("ascii"))
    # Give OpenSSL's record buffers (about 17 KiB each way per connection) back
    # whenever they are empty: an idle connection then holds none.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # Key-exchange groups: pyOpenSSL has no call to choose them; edge/openssl.cnf
    # (OPENSSL_CONF, see the module docstring) limits them for every context.
    if chain:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        if key is None:
            raise ValueError("a certificate needs its private key")
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    return ctx


# X509_V_ERR_* codes that are facts about the path OpenSSL built from the partners'
# anchors; refusing on them lets OpenSSL's alert say why (module docstring).
_DEFINITIVE_ERRORS = frozenset(
    {
        2,  # unable to get issuer certificate          -> unknown_ca
        7,  # certificate signature failure              -> decrypt_error
        9,  # certificate is not yet valid               -> bad_certificate
        10,  # certificate has expired                   -> certificate_expired
        18,  # self-signed leaf                          -> unknown_ca
        19,  # self-signed certificate in chain          -> unknown_ca
        20,  # unable to get local issuer certificate    -> unknown_ca
        21,  # unable to verify the first certificate    -> unknown_ca
        23,  # certificate revoked                       -> certificate_revoked
        24,  # invalid CA certificate                    -> unknown_ca
        25,  # path length constraint exceeded           -> unknown_ca
        26,  # unsupported certificate purpose           -> unsupported_certificate
        66,  # EE key too small                          -> bad_certificate
        67,  # CA key too small                          -> bad_certificate
        68,  # CA signature digest too weak (MD5, SHA-1) -> bad_certificate
    }
)
# The codes the core reports for them.
_OPENSSL_ONLY_REASONS = {66: Reason.WEAK_CRYPTO, 67: Reason.WEAK_CRYPTO, 68: Reason.WEAK_CRYPTO}


@dataclass
class _Judgement:
    """One connection's verification in progress: the path walked so far (by
    depth) and, once decided, the verdict."""

    path: dict[int, x509.Certificate] = field(default_factory=dict)
    verdict: Verdict | None = None


# Connection -> its judgement; weak, so a finished connection leaves nothing behind.
_JUDGEMENTS: weakref.WeakKeyDictionary[SSL.Connection, _Judgement] = weakref.WeakKeyDictionary()


class _HandshakeJudge:
    """The verify callback of a partner-facing context: the core decides, inside
    the handshake (see "Verdict in the handshake" in the module docstring).

    It never raises (pyOpenSSL would re-raise out of the handshake instead of
    sending an alert): anything unexpected is a refusal."""

    def __init__(self, trust: PartnerTrust) -> None:
        self.trust = trust

    def __call__(self, conn: SSL.Connection, cert: X509, err: int, depth: int, ok: int) -> bool:
        judgement = _JUDGEMENTS.get(conn)
        if judgement is None:
            judgement = _JUDGEMENTS[conn] = _Judgement()
        if judgement.verdict is not None:
            # Decided: later calls (OpenSSL's name-constraint pass) change nothing.
            return judgement.verdict.accepted
        try:
            return self._judge(judgement, cert, err, depth, ok)
        except Exception as exc:  # fail closed, never raise into OpenSSL
            judgement.verdict = Verdict(
                False,
                Reason.INTERNAL_ERROR,
                f"verification failed inside the handshake: {type(exc).__name__}",
            )
            return False

    def _judge(self, judgement: _Judgement, cert: X509, err: int, depth: int, ok: int) -> bool:
        if not 0 <= depth <= 2 * MAX_VERIFY_DEPTH:
            raise ValueError(f"depth {depth} out of range")
        judgement.path[depth] = _interned(cert)
        if not ok and err in _DEFINITIVE_ERRORS:
            if (
                depth == 0
                and len(judgement.path) >= 2
                and max(judgement.path) == len(judgement.path) - 1
            ):
                # OpenSSL's walk has reached the leaf: the whole path is known, so
                # the core decides (it may know a path OpenSSL did not build); the
                # alert stays OpenSSL's.
                chain = [judgement.path[d] for d in sorted(judgement.path)]
                judgement.verdict = self.trust.verify_client(chain)
                return judgement.verdict.accepted
            if depth >= MAX_CHAIN_LENGTH:
                # OpenSSL stopped at its depth limit: the peer sent more than the
                # core accepts (the core's rule and reason; the alert stays OpenSSL's).
                judgement.verdict = Verdict(
                    False,
                    Reason.INVALID_CHAIN,
                    f"the peer sent more than {MAX_CHAIN_LENGTH} certificates "
                    f"(OpenSSL stopped at depth {depth}); at most {MAX_CHAIN_LENGTH} "
                    "are accepted",
                )
                return False
            if depth == 0 and len(judgement.path) == 1:
                # An error on the leaf before OpenSSL's walk (no issuer found,
                # wrong purpose, unreadable extension): only the leaf is known.
                # The core, building the path itself, may name the reason and the
                # partner better (bad_purpose from fabrikam's own root; invalid_chain
                # for a malformed SAN); it may only sharpen OpenSSL's refusal, never
                # overrule it, and an unknown_ca from it (the intermediates it was
                # not shown) says less than OpenSSL's fact. The alert stays OpenSSL's.
                core = self.trust.verify_client([judgement.path[0]])
                if not core.accepted and core.reason is not Reason.UNKNOWN_CA:
                    judgement.verdict = core
                    return False
            # Earlier (building the path, checking CRLs) only this certificate is
            # known: OpenSSL's fact about it is the verdict.
            reason = _OPENSSL_ONLY_REASONS.get(err) or reason_for_openssl_error(err)
            judgement.verdict = Verdict(
                False,
                reason,
                f"refused in the TLS handshake: OpenSSL verify error {err} at depth {depth} "
                f"(certificate {_short_subject(judgement.path[depth])})",
            )
            return False
        if ok and depth == 0:
            chain = [judgement.path[d] for d in sorted(judgement.path)]
            judgement.verdict = self.trust.verify_client(chain)
            return judgement.verdict.accepted
        return True  # an error the core may overrule, or a certificate above the leaf


def _verdict_reason(conn: SSL.Connection) -> Reason | None:
    verdict = handshake_verdict(conn)
    return None if verdict is None else verdict.reason


def handshake_verdict(conn: SSL.Connection) -> Verdict | None:
    """The verdict reached inside `conn`'s handshake, or None (no partner-facing
    context, or the peer sent no certificate)."""
    judgement = _JUDGEMENTS.get(conn)
    return None if judgement is None else judgement.verdict


# Longest path the store will build (leaf + intermediates + anchor), as the core.
MAX_VERIFY_DEPTH = 8


def _short_subject(cert: x509.Certificate) -> str:
    text = cert.subject.rfc4514_string()[:120]
    return "".join(ch if ch.isprintable() else "?" for ch in text) or "(empty subject)"


def _interned(cert: X509) -> x509.Certificate:
    """`cert` as a cryptography certificate, the same object for the same DER:
    partners present the same certificates on every handshake, so this skips a
    parse, and the core's caches compare identical objects."""
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    if len(der) > _MAX_INTERNED_DER:  # any peer can send these: only small ones stay
        return x509.load_der_x509_certificate(der)
    found = _INTERNED.get(der)
    if found is None:
        found = x509.load_der_x509_certificate(der)
        if len(_INTERNED) >= _MAX_INTERNED:
            _INTERNED.pop(next(iter(_INTERNED)))
        _INTERNED[der] = found
    return found


def _partner_store(ctx: SSL.Context, trust: PartnerTrust) -> None:
    """Every partner's anchors, and the CRLs of partners that check revocation: the
    store only picks OpenSSL's error (hence the alert); the core decides per partner."""
    from OpenSSL import crypto

    store = ctx.get_cert_store()
    assert store is not None
    for root in trust.all_roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    flags = crypto.X509StoreFlags.PARTIAL_CHAIN
    # CRLs do not hash; a CRL shared by partners (a public CA) goes in once, by DER.
    crls = {
        crl.public_bytes(serialization.Encoding.DER): crl
        for policy in trust.snapshot.partners.values()
        if policy.revocation is not Revocation.OFF
        for crl in policy.crls
    }
    for crl in crls.values():
        store.add_crl(crl)
    if crls:
        flags |= crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL
    store.set_flags(flags)
    ctx.set_verify_depth(MAX_VERIFY_DEPTH)


def server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    *,
    require_client_cert: bool,
    client_ca_names: Sequence[x509.Certificate] = (),
    client_roots: Sequence[x509.Certificate] = (),
    partner_trust: PartnerTrust | None = None,
    profile: str = "intermediate",
) -> SSL.Context:
    """A hardened server context.

    ``require_client_cert`` makes the handshake fail when the client sends no
    certificate. ``partner_trust`` (partner-facing mtls listeners): the core
    judges the client's chain inside the handshake and a refusal sends the
    alert that says why; read the verdict with ``TLSStream.handshake_verdict``
    (build a new context when the policy snapshot changes).
    ``client_ca_names``: certificates whose subjects are advertised in the
    CertificateRequest (the partner roots; default: ``partner_trust``'s
    anchors), so clients with several certificates pick the right one.

    ``client_roots``: when given (with ``require_client_cert``), OpenSSL
    itself verifies the client's chain against these roots and fails the
    handshake otherwise, as a pool member does with the enterprise CA.

    ``profile``: ``"intermediate"`` (TLS 1.2 and 1.3) or ``"modern"`` (TLS 1.3
    only), Mozilla's server-side TLS recommendations.

    Session resumption is off: a resumed session would skip the certificate
    exchange, and with it authorization (nginx CVE-2025-23419).
    """
    ctx = _base_context(chain, key, profile)
    ctx.set_session_id(b"edge-federation")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_options(SSL.OP_NO_TICKET)
    if require_client_cert:
        mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        if client_roots:
            _add_roots(ctx, client_roots)
            ctx.set_verify(mode, _meets_floor)
        elif partner_trust is not None:
            _partner_store(ctx, partner_trust)
            verify_alert.install(ctx, mode, _HandshakeJudge(partner_trust), _verdict_reason)
            client_ca_names = client_ca_names or partner_trust.all_roots
        else:
            # No judge given: any certificate passes the TLS layer and the caller
            # must run the core on ``peer_chain`` before reading a byte (no alert
            # says why). Partner-facing listeners should pass ``partner_trust``.
            ctx.set_verify(mode, _accept_at_tls_layer)
        for ca in client_ca_names or client_roots:
            ctx.add_client_ca(ca)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx


def _accept_at_tls_layer(conn: SSL.Connection, cert: X509, err: int, depth: int, ok: int) -> bool:
    return True


def _meets_floor(conn: SSL.Connection, cert: X509, err: int, depth: int, ok: int) -> bool:
    """Verify callback for chains OpenSSL judges alone (pool members, servers we
    dial): OpenSSL's answer, and every key on the path above the cryptographic
    floor (security level 2 leaves EC curves to us)."""
    if not ok:
        return False
    try:
        return crypto_floor_problem([cert.to_cryptography()]) is None
    except Exception:  # an unreadable certificate fails closed
        return False


def client_context(
    roots: Sequence[x509.Certificate],
    chain: Sequence[x509.Certificate] | None = None,
    key: PrivateKey | None = None,
    *,
    resume_sessions: bool = False,
    profile: str = "intermediate",
    ml_kem_share: bool = True,
) -> SSL.Context:
    """A hardened client context that verifies the server against ``roots``.

    OpenSSL verifies the chain (the handshake fails otherwise); the host name
    is checked by ``TLSStream`` after the handshake and before any byte is
    sent. ``chain``/``key``: the client certificate to present (mutual TLS).

    ``resume_sessions``: ``TLSStream`` clients on this context resume the
    newest session they hold for the same ``server_hostname`` (see the module
    docstring). Only for servers that are ours, such as the pool members.

    ``ml_kem_share=False``: the ClientHello carries an X25519 key share only,
    still naming the post-quantum hybrid first (``_POOL_GROUPS``). A server
    without ML-KEM (a pool member on OpenSSL 3.0) takes X25519 at once; one
    with ML-KEM asks for the hybrid (HelloRetryRequest) and gets it. The
    client then never makes an ML-KEM key it does not use, and never keeps one
    for the life of the connection (measured: 12 KiB per idle connection).
    For the pool, where connections are many and long-lived.
    """
    if not roots:
        raise ValueError("a client context needs at least one trusted root")
    ctx = _base_context(chain, key, profile)
    # pyOpenSSL has no call for groups; its binding has OpenSSL's. Before any
    # Connection exists, as pyOpenSSL's own setters require.
    if (
        not ml_kem_share
        and _SET_GROUPS is not None
        and _SET_GROUPS(ctx._context, _POOL_GROUPS) != 1
    ):  # pragma: no cover
        raise ValueError("OpenSSL refused the pool's key-exchange groups")
    _add_roots(ctx, roots)
    ctx.set_verify(SSL.VERIFY_PEER, _meets_floor)
    if resume_sessions:
        _SESSIONS[ctx] = {}
    return ctx


def _add_roots(ctx: SSL.Context, roots: Sequence[x509.Certificate]) -> None:
    from OpenSSL.crypto import X509 as _X509

    store = ctx.get_cert_store()
    assert store is not None
    for root in roots:
        store.add_cert(_X509.from_cryptography(root))
