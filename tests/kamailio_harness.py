"""Kamailio as a real SIP peer of a test: config, start, readiness, what it sent, stop.

Owns running Debian's `kamailio` binary (with `kamailio-tls-modules`) as a
subprocess on 127.0.0.1 only, in its own session so that it and its worker
children are always killed when the test ends, passed or failed. It never
binds anything but loopback and never waits without a bound.

What Kamailio put on the wire: a config that adds `ONSEND_ROUTE` makes it log
every request it sends (the `onsend_route` sees the exact send buffer), base64
encoded on one line, which `sent_messages` reads back.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from edge.core.sip import KeepAlive, Message, SipFramer

KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
KAMAILIO_MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")

# Logged once per request Kamailio sends: its protocol and the exact bytes.
ONSEND_ROUTE = """
onsend_route {
    xlog("L_ALERT", "KAMAILIO-SENT $snd(proto) $(snd(buf){s.encode.base64})\\n");
}
"""
_SENT = re.compile(rb"KAMAILIO-SENT (\d+) ([A-Za-z0-9+/=]+)")
PROTO_TLS = 3  # Kamailio's PROTO_TLS in $snd(proto)


def missing() -> str | None:
    """Why Kamailio cannot run here, or None when it can."""
    if not Path(KAMAILIO).exists():
        return "kamailio is not installed (Debian package kamailio)"
    if not (KAMAILIO_MODULES / "tls.so").exists():
        return "Kamailio's TLS module is not installed (Debian package kamailio-tls-modules)"
    return None


def free_port(kind: int) -> int:
    """A port free on 127.0.0.1 right now (Kamailio needs numbers in its config)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def tls_cfg(cert: Path, key: Path, ca_list: Path, server_name: str | None = None) -> str:
    """Kamailio's tls.cfg: present `cert` on both sides; as a client, verify the
    server against `ca_list` (and send `server_name` as SNI when given)."""
    sni = f"server_name = {server_name}\n" if server_name else ""
    return f"""[server:default]
method = TLSv1.2+
certificate = {cert}
private_key = {key}
verify_certificate = no
require_certificate = no

[client:default]
method = TLSv1.2+
certificate = {cert}
private_key = {key}
ca_list = {ca_list}
verify_certificate = yes
require_certificate = yes
{sni}"""


@dataclass
class Kamailio:
    """A running Kamailio: its UDP port (requests in), TLS port, log file."""

    process: subprocess.Popen[bytes]
    udp: int
    tls: int
    log: Path

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_bytes()[-n:].decode("utf-8", "replace")

    def sent_messages(self) -> list[tuple[int, bytes]]:
        """(protocol, bytes) of every request Kamailio has sent, in order."""
        return [
            (int(m.group(1)), base64.b64decode(m.group(2)))
            for m in _SENT.finditer(self.log.read_bytes())
        ]


def parse_datagram(data: bytes) -> Message | None:
    """One SIP message from one UDP datagram, or None."""
    framer = SipFramer()
    framer.feed(data)
    for _ in range(4):  # a leading keep-alive, then the message
        event = framer.next_event()
        if isinstance(event, Message):
            return event
        if not isinstance(event, KeepAlive):
            return None
    return None


def _group_alive(pgid: int) -> bool:
    """Whether any process is still in process group `pgid` (read from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            # Fields after the ")" that ends the command name: state, ppid, pgrp.
            if int(stat.read_text().rpartition(")")[2].split()[2]) == pgid:
                return True
    return False


async def _exited(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait (polling, at most `timeout` seconds) for `process` to exit."""
    with trio.move_on_after(timeout):
        for _ in range(int(timeout / 0.05) + 1):
            if process.poll() is not None:
                return
            await trio.sleep(0.05)


async def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole session, then SIGKILL what is left; bounded, cancellation-proof."""
    with trio.CancelScope(shield=True):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        await _exited(process, 10)
        # Workers may outlive the main process. The group id is the main
        # process's pid, which cannot be reused while a group member lives, so
        # only signal it while a member does.
        if process.poll() is None or _group_alive(process.pid):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        await _exited(process, 5)


async def _ready(ua: trio.socket.SocketType, kamailio: Kamailio, timeout: float) -> bool:
    """Poll with OPTIONS to Kamailio itself until it answers 200 (False: it exited)."""
    probe = (
        f"OPTIONS sip:127.0.0.1:{kamailio.udp} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{ua.getsockname()[1]};branch=z9hG4bK-ready\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:probe@127.0.0.1>;tag=ready\r\n"
        f"To: <sip:127.0.0.1:{kamailio.udp}>\r\n"
        "Call-ID: kamailio-ready\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    with trio.fail_after(timeout):
        for _ in range(int(timeout / 0.25) + 1):
            if kamailio.process.poll() is not None:
                break
            await ua.sendto(probe, ("127.0.0.1", kamailio.udp))
            with trio.move_on_after(0.25):
                for _ in range(1000):
                    answer = parse_datagram(await ua.recv(65536))
                    if answer is not None and answer.headers.get("call-id") == "kamailio-ready":
                        return answer.head.status_code == 200
    return False


@asynccontextmanager
async def running_kamailio(
    folder: Path,
    config: Callable[[int, int], str],
    ua: trio.socket.SocketType,
    *,
    timeout: float = 15,
) -> AsyncIterator[Kamailio]:
    """Kamailio on `config(udp_port, tls_port)`, ready (it answers `ua`'s OPTIONS 200).

    The config must answer `OPTIONS sip:127.0.0.1:UDP` itself with 200. Ports are
    picked free just before the start; if another process took one meanwhile,
    Kamailio exits and the start is retried (3 attempts). Always stopped on exit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        udp, tls = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
        cfg = folder / "kamailio.cfg"
        cfg.write_text(config(udp, tls))
        log_path = folder / f"kamailio-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [KAMAILIO, "-f", str(cfg), "-DD", "-E", "-m", "64", "-M", "8", "-w", str(folder)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its worker children share our process group id
            )
        kamailio = Kamailio(process, udp, tls, log_path)
        try:
            try:
                ready = await _ready(ua, kamailio, timeout)
            except trio.TooSlowError:
                raise AssertionError(f"Kamailio not ready: {kamailio.log_tail()}") from None
            if ready:
                yield kamailio
                return
        finally:
            await _stop(process)
    raise AssertionError(f"Kamailio did not start: {kamailio.log_tail()}")
