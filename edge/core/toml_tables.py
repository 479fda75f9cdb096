"""Reading TOML tables with every problem collected: the typed getters of `edge.toml`.

Owns `TableReader` (problems as "FILE: KEY: problem", unknown keys, strings,
tables, bounded integers, files read relative to the configuration) and the
small value checks several sections share (`parse_address`, `is_ip_address`,
`is_host`, `shown`). `edge.core.config` builds its loader on it, with
`edge.core.identity` and `edge.core.topology`.

Must never: stop at the first problem (collect them), put a secret's bytes
in a message (``shown`` repr's only what the TOML itself held), or do any I/O
but reading the files the configuration names.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["HOSTNAME", "TableReader", "is_host", "is_ip_address", "parse_address", "shown"]

HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


class TableReader:
    """Typed getters over TOML tables; every problem is collected in ``problems``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.problems: list[str] = []
        self.sip_outbound: list[str] = []  # outbound SIP listeners: [sip] domains required

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def unknown_keys(self, table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in known:
                self.problem(f"{where}{key}", f"unknown key (expected one of: {', '.join(known)})")

    def string(
        self, table: Mapping[str, Any], key: str, where: str, *, required: bool = True
    ) -> str | None:
        if key not in table:
            if required:
                self.problem(f"{where}{key}", "missing (required)")
            return None
        value = table[key]
        if not isinstance(value, str) or not value:
            self.problem(f"{where}{key}", f"must be a non-empty string, not {shown(value)}")
            return None
        return value

    def table(self, data: Mapping[str, Any], key: str, *, required: bool) -> dict[str, Any] | None:
        if key not in data:
            if required:
                self.problem(f"[{key}]", "missing table (required)")
            return None
        value = data[key]
        if not isinstance(value, dict):
            self.problem(key, f"must be a table ([{key}]), not {shown(value)}")
            return None
        return value

    def array_of_tables(self, data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
        if key not in data:
            self.problem(f"[[{key}]]", "missing (at least one entry is required)")
            return []
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, f"must be an array of tables ([[{key}]]), not {shown(value)}")
            return []
        if not value:
            self.problem(f"[[{key}]]", "at least one entry is required")
        return value

    def bounded_int(
        self, table: Mapping[str, Any], key: str, where: str, default: int, low: int, high: int
    ) -> int:
        value = table.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        self.problem(
            f"{where}{key}", f"must be an integer from {low} to {high}, not {shown(value)}"
        )
        return default

    def file(self, key: str, raw: str) -> tuple[Path, bytes | None]:
        path = self.base / raw
        try:
            return path, path.read_bytes()
        except FileNotFoundError:
            self.problem(key, f"{path}: file does not exist")
        except IsADirectoryError:
            self.problem(key, f"{path}: is a folder, expected a file")
        except OSError as exc:
            self.problem(key, f"{path}: cannot read: {exc.strerror or exc}")
        return path, None


def shown(value: object) -> str:
    """A short description of a wrong value for an error message."""
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 40 else kind


@functools.lru_cache(maxsize=1024)  # per connection (dial, SNI); pure and bounded
def is_ip_address(text: str) -> bool:
    """An IPv4 or IPv6 literal (without brackets or port)? The one IP check."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_host(text: str) -> bool:
    return is_ip_address(text) or bool(HOSTNAME.match(text))


def parse_address(text: str, *, allow_any_port: bool = True) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port). Raises ValueError saying why.

    Port 0 (a listening address only) asks the kernel for a free port; the
    bound address is logged in `gateway_started` (tests and `edge demo`).
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:5061)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:5061")
    elif not host:
        raise ValueError(f"{text!r} has an empty host")
    lowest = 0 if allow_any_port else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from {lowest} to 65535")
    return host, int(port_text)
