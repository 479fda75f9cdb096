"""The relays and the echo backend for bench/compare.py: PKI, configurations, processes, /proc.

Owns: writing one PKI (edge.pki, ECDSA P-256) and one configuration per relay
(our `edge run`, HAProxy `mode tcp`, nginx `stream`), starting and stopping
them as child processes, and reading their CPU time and resident memory from
/proc (the process and every descendant, so nginx's workers count).

The relays are configured alike, after our own security posture: TLS 1.2
minimum with the same TLS 1.2 suites, the partner must present a certificate
that chains to the partner root (verify required), no session resumption and
no tickets on the partner side, MTLS to the pool member whose certificate must
chain to the enterprise root and name the member's host, and one log line per
connection to a file. Each peer keeps its default for the internal leg, which
includes TLS session reuse toward the pool member.

The echo backend is HAProxy with a Lua echo service (C TLS, an event loop,
two threads), verifying the relay's client certificate against the
enterprise root: no Python in it, so it is not the bottleneck.

Only 127.0.0.1. Every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge.pki import CA, Leaf
from edge.tls import MOZILLA_INTERMEDIATE_TLS12_CIPHERS

HOST = "127.0.0.1"
EDGE_NAME = "edge.contoso.example"
MEMBER_HOST = "fe1.corp.test"
PARTNER_DOMAIN = "fabrikam.com"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


# ----------------------------------------------------------------------
# PKI


@dataclass(frozen=True)
class Files:
    """Where the PKI was written."""

    partner_chain: Path
    partner_key: Path
    partner_root: Path
    edge_ca: Path
    public_chain: Path
    public_key: Path
    public_combined: Path
    internal_chain: Path
    internal_key: Path
    internal_combined: Path
    enterprise_root: Path
    member_combined: Path


def write_pki(folder: Path) -> Files:
    """Partner root -> intermediate -> leaf; edge public CA -> edge public leaf;
    enterprise root -> edge internal leaf and pool member leaf. All ECDSA P-256."""
    certs = folder / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    partner_root = CA.root("Bench Partner Root")
    partner_issuing = partner_root.intermediate("Bench Partner Issuing CA")
    partner = partner_issuing.issue(dns=[f"sip.{PARTNER_DOMAIN}"], eku=["client"])
    edge_ca = CA.root("Bench Edge Public CA")
    public = edge_ca.issue(dns=[EDGE_NAME], eku=["server"])
    enterprise = CA.root("Bench Enterprise Root")
    internal = enterprise.issue(dns=["edge.corp.test"], eku=["client"])
    member = enterprise.issue(dns=[MEMBER_HOST], eku=["server"])

    def combined(leaf: Leaf, stem: str) -> Path:
        leaf.write(certs, stem)
        path = certs / f"{stem}-combined.pem"
        path.write_bytes(leaf.chain_pem() + leaf.key_pem())
        path.chmod(0o600)
        return path

    partner_chain, partner_key = partner.write(certs, "partner")
    (certs / "partner-root.pem").write_bytes(partner_root.cert_pem())
    (certs / "edge-ca.pem").write_bytes(edge_ca.cert_pem())
    (certs / "enterprise-root.pem").write_bytes(enterprise.cert_pem())
    public_combined = combined(public, "edge-public")
    internal_combined = combined(internal, "edge-internal")
    member_combined = combined(member, "member")
    return Files(
        partner_chain=partner_chain,
        partner_key=partner_key,
        partner_root=certs / "partner-root.pem",
        edge_ca=certs / "edge-ca.pem",
        public_chain=certs / "edge-public.pem",
        public_key=certs / "edge-public.key",
        public_combined=public_combined,
        internal_chain=certs / "edge-internal.pem",
        internal_key=certs / "edge-internal.key",
        internal_combined=internal_combined,
        enterprise_root=certs / "enterprise-root.pem",
        member_combined=member_combined,
    )


# ----------------------------------------------------------------------
# /proc


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.setdefault(int(rest[1]), []).append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids = _children()
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 1000:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time of these processes (all their threads), from /proc/PID/stat."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(rest[11]) + int(rest[12])  # utime, stime
    return ticks / _CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes, from /proc/PID/statm."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except OSError:
            continue
    return total


# ----------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout:g}s")


@dataclass
class Relay:
    """One relay under test (or the backend): its command, port and process."""

    name: str
    workers: int
    port: int
    argv: list[str]
    folder: Path
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        out = open(self.folder / f"{self.name}.out", "wb")  # noqa: SIM115 (kept by Popen)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            env={**os.environ, **self.env},
        )
        out.close()
        wait_listening(self.port, self.proc)
        time.sleep(0.3)  # let workers settle (nginx forks after binding)
        self.refresh()

    def refresh(self) -> None:
        assert self.proc is not None
        self.pids = tree(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids)

    def rss(self) -> int:
        return rss_bytes(self.pids)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.folder / f"{self.name}.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


_ECHO_LUA = """\
-- 1 KiB at a time: every message of the benchmark is a multiple of 1 KiB.
core.register_service("echo", "tcp", function(applet)
  while true do
    local data = applet:receive(1024)
    if data == nil or data == "" then return end
    applet:send(data)
  end
end)
"""


def backend(folder: Path, files: Files) -> Relay:
    """The MTLS echo pool member: HAProxy + Lua, 2 threads, verifies the relay's certificate."""
    port = free_port()
    lua = folder / "echo.lua"
    lua.write_text(_ECHO_LUA)
    cfg = folder / "backend.cfg"
    cfg.write_text(
        f"""global
  lua-load {lua}
  nbthread 2
  maxconn 8000
defaults
  mode tcp
  timeout client 1800s
  timeout connect 5s
  timeout server 1800s
frontend member
  bind {HOST}:{port} ssl crt {files.member_combined} ca-file {files.enterprise_root} verify required
  tcp-request content use-service lua.echo
"""
    )
    return Relay("backend", 2, port, ["haproxy", "-f", str(cfg), "-db"], folder)


def _edge_limits() -> str:
    """Limits high enough for the benchmark's one source address and 2,000 idle connections
    (the peers have no such limits); only the keys this version of edge.core.config knows."""
    import dataclasses

    from edge.core.config import Limits

    wanted: dict[str, float] = {
        "handshake_timeout_s": 10,
        "max_connections": 20000,
        "max_connections_per_partner": 20000,
        "max_connections_per_source": 20000,
        "max_handshakes_in_progress": 20000,
        "new_connections_per_source_per_s": 1000000,
        "new_connections_per_source_burst": 1000000,
    }
    known = {f.name: f.type for f in dataclasses.fields(Limits)}
    return "\n".join(
        f"{k} = {int(v) if 'int' in str(known[k]) else float(v)}"
        for k, v in wanted.items()
        if k in known
    )


def edge_relay(
    folder: Path,
    files: Files,
    backend_port: int,
    workers: int,
    profile: Path | None = None,
    name: str | None = None,
) -> Relay:
    name = name or f"edge-{workers}w"
    port = free_port()
    policies = folder / "federation_policies" / PARTNER_DOMAIN
    policies.mkdir(parents=True, exist_ok=True)
    shutil.copy(files.partner_root, policies / "root.pem")
    (policies / "policy.toml").write_text(f'domains = ["{PARTNER_DOMAIN}"]\n')
    cfg = folder / f"{name}.toml"
    cfg.write_text(
        f"""[identity]
public_cert = "{files.public_chain}"
public_key = "{files.public_key}"
internal_cert = "{files.internal_chain}"
internal_key = "{files.internal_key}"
internal_roots = ["{files.enterprise_root}"]

[[listeners]]
name = "federation"
address = "{HOST}:{port}"
mode = "mtls"
policies = "federation_policies"
pool = "frontend"

[[pools]]
name = "frontend"
members = [{{ host = "{MEMBER_HOST}", address = "{HOST}", port = {backend_port} }}]

[metrics]
address = "{HOST}:0"

[limits]
{_edge_limits()}
"""
    )
    argv = [sys.executable, "-m", "edge.cli", "run", "--config", str(cfg)]
    if profile is not None:  # cProfile, written when the relay stops (SIGTERM drains)
        argv[1:1] = ["-m", "cProfile", "-o", str(profile / f"{name}.prof")]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return Relay(name, workers, port, argv, folder)


def haproxy_relay(folder: Path, files: Files, backend_port: int, workers: int) -> Relay:
    port = free_port()
    cfg = folder / f"haproxy-{workers}.cfg"
    server_tls = (
        f"ssl crt {files.internal_combined} ca-file {files.enterprise_root} "
        f"verify required verifyhost {MEMBER_HOST} sni str({MEMBER_HOST})"
    )
    cfg.write_text(
        f"""global
  nbthread {workers}
  maxconn 8000
  tune.ssl.cachesize 0
  ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets prefer-client-ciphers
  ssl-default-bind-ciphers {MOZILLA_INTERMEDIATE_TLS12_CIPHERS}
  ssl-default-server-options ssl-min-ver TLSv1.2
  ssl-default-server-ciphers {MOZILLA_INTERMEDIATE_TLS12_CIPHERS}
  log stdout format raw local0
defaults
  mode tcp
  log global
  option tcplog
  timeout client 1800s
  timeout connect 5s
  timeout server 1800s
frontend federation
  bind {HOST}:{port} ssl crt {files.public_combined} ca-file {files.partner_root} verify required
  default_backend pool
backend pool
  server fe1 {HOST}:{backend_port} {server_tls}
"""
    )
    return Relay(f"haproxy-{workers}w", workers, port, ["haproxy", "-f", str(cfg), "-db"], folder)


def nginx_relay(folder: Path, files: Files, backend_port: int, workers: int) -> Relay:
    port = free_port()
    cfg = folder / f"nginx-{workers}.conf"
    name = f"nginx-{workers}w"
    cfg.write_text(
        f"""load_module {NGINX_STREAM_MODULE};
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {folder}/{name}.pid;
error_log {folder}/{name}.error.log warn;
events {{ worker_connections 9000; }}
stream {{
  log_format relay '$remote_addr [$time_local] $status $bytes_sent $bytes_received '
                   '$session_time "$ssl_client_s_dn" $upstream_addr';
  access_log {folder}/{name}.access.log relay;
  server {{
    listen {HOST}:{port} ssl;
    ssl_certificate {files.public_chain};
    ssl_certificate_key {files.public_key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {MOZILLA_INTERMEDIATE_TLS12_CIPHERS};
    ssl_prefer_server_ciphers on;
    ssl_session_cache off;
    ssl_session_tickets off;
    ssl_client_certificate {files.partner_root};
    ssl_verify_client on;
    ssl_verify_depth 3;
    proxy_pass {HOST}:{backend_port};
    proxy_timeout 1800s;
    proxy_ssl on;
    proxy_ssl_certificate {files.internal_chain};
    proxy_ssl_certificate_key {files.internal_key};
    proxy_ssl_trusted_certificate {files.enterprise_root};
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_name {MEMBER_HOST};
    proxy_ssl_server_name on;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
  }}
}}
"""
    )
    argv = ["nginx", "-c", str(cfg), "-g", "daemon off;"]
    return Relay(name, workers, port, argv, folder)


# ----------------------------------------------------------------------
# What each relay links


def openssl_versions() -> dict[str, str]:
    """Which OpenSSL each relay uses (and the client, stdlib ssl)."""
    import ssl

    from cryptography.hazmat.backends.openssl.backend import backend as crypto_backend
    from OpenSSL import SSL

    out = {
        "edge": (
            f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} (bundled in the cryptography "
            f"wheel; cryptography reports {crypto_backend.openssl_version_text()})"
        ),
        "client": f"{ssl.OPENSSL_VERSION} (stdlib ssl)",
    }
    try:
        text = subprocess.run(["haproxy", "-vv"], capture_output=True, text=True, timeout=10).stdout
        ver = re.search(r"^HAProxy version (\S+)", text, re.M)
        built = re.search(r"Built with OpenSSL version : (.+)", text)
        running = re.search(r"Running on OpenSSL version : (.+)", text)
        out["haproxy"] = (
            f"HAProxy {ver.group(1) if ver else '?'}: running on "
            f"{running.group(1) if running else '?'} "
            f"(built with {built.group(1) if built else '?'})"
            f"{_ldd_ssl(shutil.which('haproxy'))}"
        )
    except (OSError, subprocess.SubprocessError):
        out["haproxy"] = "not found"
    try:
        text = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10).stderr
        ver = re.search(r"nginx version: nginx/(\S+)", text)
        built = re.search(r"built with (OpenSSL [^\n(]+)(?:\(running with ([^)]+)\))?", text)
        runs_on = built.group(2) if built and built.group(2) else (built.group(1) if built else "?")
        out["nginx"] = (
            f"nginx {ver.group(1) if ver else '?'}: running on {runs_on.strip()} "
            f"(built with {built.group(1).strip() if built else '?'})"
            f"{_ldd_ssl(shutil.which('nginx'))}"
        )
    except (OSError, subprocess.SubprocessError):
        out["nginx"] = "not found"
    return out


def _ldd_ssl(binary: str | None) -> str:
    if binary is None:
        return ""
    try:
        text = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    libs = [
        line.split("=>")[1].split("(")[0].strip() for line in text.splitlines() if "libssl" in line
    ]
    return f"; links {', '.join(libs)}" if libs else ""
