#!/usr/bin/env python3
"""Make a throwaway federation for the example configuration: certificates,
keys, a partner folder, a demo pool's certificates and partner clients.

    python deploy/example/make-certs.py deploy/example            # in place, for compose
    python deploy/example/make-certs.py /tmp/edge-run \\
        --listen 127.0.0.1:15061 --metrics 127.0.0.1:19464 \\
        --member fe1.corp.example=127.0.0.1:15062 --owner 10001:10001

Nothing secret is committed to the repository: every key is made here, at the
moment it is needed, by `edge.pki` (which never issues production certificates)
and written with mode 0600. The CA keys are never written at all, so nothing
made here can issue anything else.

OUT receives (the first three are what the container mounts at /etc/edge):
  edge.toml              the example configuration (deploy/example/edge.toml,
                         with --listen / --metrics / --member applied)
  certs/                 the edge's public and internal chains and keys, the
                         enterprise root that issues pool members
  federation_policies/   fabrikam.example/: a trusted partner's root + policy.toml
  pool/                  fe1/fe2.corp.example certificates for the demo pool
                         (deploy/example/echo-pool.py) and the root it trusts
  partners/              clients for checking the gateway from outside:
                         edge-ca.pem (to verify the edge), fabrikam.example and
                         stranger.example chains and keys, and northwind.example/,
                         a partner folder to drop into federation_policies/
                         (its client is northwind.example.pem/.key)

--owner UID:GID (needs root) hands the keys under certs/ and pool/ to the
container's user (the image runs as 10001:10001), since a 0600 key owned by
someone else cannot be read by it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from edge.pki import CA

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "edge.toml"
EDGE_PUBLIC_NAME = "edge.example"
DEFAULT_MEMBERS = ("fe1.corp.example", "fe2.corp.example")
GENERATED = ("certs", "federation_policies", "pool", "partners")


def _member(text: str) -> tuple[str, str, int]:
    host, sep, where = text.partition("=")
    address, _, port = where.rpartition(":")
    if not sep or not host or not address or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST=ADDRESS:PORT")
    return host, address.strip("[]"), int(port)


def _owner(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected UID[:GID] (numbers)")
    return int(uid), int(gid or uid)


def render_config(
    template: str,
    listen: str | None,
    metrics: str | None,
    members: list[tuple[str, str, int]],
) -> str:
    """The template with the listener/metrics addresses and pool members replaced.

    Line-based, by section: the template is ours and keeps one `address` per
    section and the members as one bracketed list.
    """
    out: list[str] = []
    section = ""
    in_members = False
    for line in template.splitlines():
        header = re.match(r"^\s*\[\[?([a-z_]+)\]\]?\s*(#.*)?$", line)
        if header:
            section = header.group(1)
        if in_members:  # skip the template's members, through the closing bracket
            in_members = line.strip() != "]"
            continue
        if section == "pools" and members and line.strip().startswith("members = ["):
            out.append("members = [")
            out += [f'  {{ host = "{h}", address = "{a}", port = {p} }},' for h, a, p in members]
            out.append("]")
            in_members = not line.split("#")[0].rstrip().endswith("]")
            continue
        new = {"listeners": listen, "metrics": metrics}.get(section)
        if new is not None and re.match(r'^address = "[^"]*"', line):
            line = re.sub(r'^address = "[^"]*"', f'address = "{new}"', line)
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write into (deploy/example for compose)")
    parser.add_argument("--listen", help="federation listener address, e.g. 127.0.0.1:15061")
    parser.add_argument("--metrics", help="metrics address, e.g. 127.0.0.1:19464")
    parser.add_argument(
        "--member",
        type=_member,
        action="append",
        default=[],
        metavar="HOST=ADDRESS:PORT",
        help="a pool member (repeatable); replaces the template's members",
    )
    parser.add_argument("--owner", type=_owner, help="chown the edge and pool keys (UID[:GID])")
    args = parser.parse_args(argv)

    out: Path = args.out.resolve()
    rewrite = args.listen or args.metrics or args.member
    if out == HERE and rewrite:
        parser.error(
            "--listen/--metrics/--member would rewrite the committed example: use another OUT"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in GENERATED:
        shutil.rmtree(out / name, ignore_errors=True)
    if out != HERE:
        text = render_config(TEMPLATE.read_text(), args.listen, args.metrics, args.member)
        (out / "edge.toml").write_text(text)

    certs, pool, partners = out / "certs", out / "pool", out / "partners"
    enterprise = CA.root("Example Enterprise Root CA")
    public_ca = CA.root("Example Public Issuing CA")
    public_ca.issue(dns=[EDGE_PUBLIC_NAME], eku=["server"]).write(certs, "edge-public")
    enterprise.issue(dns=["edge.corp.example"], eku=["client"]).write(certs, "edge-internal")
    (certs / "enterprise-root.pem").write_bytes(enterprise.cert_pem())

    hosts = list(dict.fromkeys(h for h, _, _ in args.member)) or list(DEFAULT_MEMBERS)
    for host in hosts:
        enterprise.issue(dns=[host], eku=["server"]).write(pool, host)
    (pool / "enterprise-root.pem").write_bytes(enterprise.cert_pem())

    partners.mkdir(parents=True, exist_ok=True)
    (partners / "edge-ca.pem").write_bytes(public_ca.cert_pem())
    for pid, folder in (
        ("fabrikam.example", out / "federation_policies" / "fabrikam.example"),
        ("northwind.example", partners / "northwind.example"),  # dropped in later
        ("stranger.example", None),  # nobody trusts it
    ):
        root = CA.root(f"{pid.split('.')[0].title()} Root CA")
        root.issue(dns=[f"sip.{pid}"], eku=["client", "server"]).write(partners, pid)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{pid.split('.')[0]}-root.pem").write_bytes(root.cert_pem())
            (folder / "policy.toml").write_text(f'domains = ["{pid}"]\n')

    if args.owner is not None:
        uid, gid = args.owner
        for key in [*certs.glob("*.key"), *pool.glob("*.key")]:
            os.chown(key, uid, gid)
    print(f"make-certs: wrote {', '.join(GENERATED)} under {out}")
    if out != HERE:
        print(f"make-certs: wrote {out / 'edge.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
