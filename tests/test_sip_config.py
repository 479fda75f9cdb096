"""edge.toml for SIP listeners: `protocol` on a listener and the `[sip]` table."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.core.config import ConfigError, SipSettings, load_config
from tests.test_config import material, site  # noqa: F401 - fixtures


def with_tail(path: Path, listener_extra: str = "", tail: str = "") -> Path:
    text = path.read_text().replace(
        'policies = "federation_policies"\n',
        f'policies = "federation_policies"\n{listener_extra}',
        1,
    )
    path.write_text(text + tail)
    return path


def problems_of(path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_defaults_stream_and_sip_bounds(site: Path) -> None:  # noqa: F811
    config = load_config(site)
    assert [listener.protocol for listener in config.listeners] == ["stream", "stream"]
    assert config.sip == SipSettings(65535, 200, ())


def test_sip_listener_and_table_load(site: Path) -> None:  # noqa: F811
    path = with_tail(
        site,
        'protocol = "sip"\n',
        "\n[sip]\nmax_message_bytes = 8192\nmax_headers = 50\n"
        'domains = ["Contoso.COM.", "contoso.com", "fabrikam-internal.net"]\n',
    )
    config = load_config(path)
    assert config.listeners[0].protocol == "sip"
    assert config.sip == SipSettings(8192, 50, ("contoso.com", "fabrikam-internal.net"))


@pytest.mark.parametrize(
    ("listener_extra", "tail", "key", "words"),
    [
        (
            'protocol = "http"\n',
            "",
            "listeners[0] (federation).protocol",
            'must be "stream" or "sip"',
        ),
        ("protocol = 1\n", "", "listeners[0] (federation).protocol", "an integer 1"),
        ("", "\n[sip]\nmax_message_bytes = 10\n", "sip.max_message_bytes", "from 1024 to"),
        ("", '\n[sip]\nmax_message_bytes = "64k"\n', "sip.max_message_bytes", "an integer"),
        ("", "\n[sip]\nmax_headers = 0\n", "sip.max_headers", "from 10 to 10000"),
        ("", "\n[sip]\nmax_headers = true\n", "sip.max_headers", "a boolean"),
        ("", '\n[sip]\ndomains = "contoso.com"\n', "sip.domains", "must be a list"),
        ("", '\n[sip]\ndomains = ["com"]\n', "sip.domains", "single label"),
        ("", '\n[sip]\ndomains = ["*.contoso.com"]\n', "sip.domains", "wildcard"),
        ("", "\n[sip]\nmax_bytes = 1\n", "sip.max_bytes", "unknown key"),
    ],
)
def test_bad_values_name_the_key(
    site: Path,  # noqa: F811
    listener_extra: str,
    tail: str,
    key: str,
    words: str,
) -> None:
    (problem,) = problems_of(with_tail(site, listener_extra, tail))
    assert problem.startswith(f"{site}: {key}: "), problem
    assert words in problem, problem


def test_sip_on_a_tls_listener_is_refused(site: Path) -> None:  # noqa: F811
    text = site.read_text().replace('mode = "tls"\n', 'mode = "tls"\nprotocol = "sip"\n')
    site.write_text(text)
    (problem,) = problems_of(site)
    assert problem.startswith(f"{site}: listeners[1] (remote).protocol: "), problem
    assert 'needs mode = "mtls"' in problem


def test_sip_must_be_a_table(site: Path) -> None:  # noqa: F811
    site.write_text('sip = "yes"\n' + site.read_text())
    (problem,) = problems_of(site)
    assert problem.startswith(f"{site}: sip: must be a table"), problem
