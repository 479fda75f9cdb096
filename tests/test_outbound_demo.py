"""`edge demo` plays both directions, and its DNS responder survives junk.

The demo runs in process (the same `_run_demo` that `edge demo` runs, on a
temporary folder): every scenario, inbound and outbound, must match, and the
outbound rows must show a relay through the SRV-found partner edge and a
`partner_untrusted` refusal for the edge whose certificate comes from another
partner's root.
"""

from __future__ import annotations

import io
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype

from edge.demo import DemoDns, _run_demo


async def test_demo_plays_both_directions(tmp_path: Path) -> None:
    out = io.StringIO()
    status = await _run_demo(tmp_path, out)
    text = out.getvalue()
    assert status == 0, text
    rows = {line.split("  ")[0]: line for line in text.splitlines() if line.startswith("outbound:")}
    relayed = rows["outbound: fe1 -> fabrikam.com (edge found by SRV)"]
    assert "relayed relayed yes" in " ".join(relayed.split())
    assert "via sip.fabrikam.com:" in relayed
    refused = rows["outbound: fe1 -> litware.com (edge cert from fabrikam's root)"]
    assert "partner_untrusted partner_untrusted yes" in " ".join(refused.split())
    assert "(unknown_ca: " in refused
    assert 'direction="outbound",listener="to-partners",partner="litware.com",' in text
    assert "edge demo: all 8 scenarios matched" in text


def test_demo_dns_answers_srv_and_ignores_junk() -> None:
    server = DemoDns(
        {("_sipfederationtls._tcp.fabrikam.com", "SRV"): ["10 10 5061 sip.fabrikam.com."]}
    )
    query = dns.message.make_query("_sipfederationtls._tcp.fabrikam.com", "SRV")
    reply = server.answer(query.to_wire())
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert [r.to_text() for r in answer.answer[0]] == ["10 10 5061 sip.fabrikam.com."]
    missing = dns.message.from_wire(
        server.answer(dns.message.make_query("nowhere.example", "A").to_wire()) or b""
    )
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert server.answer(b"\x00\x01 not dns") is None
    assert answer.answer[0].rdtype == dns.rdatatype.SRV
