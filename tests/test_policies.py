"""Loading federation_policies/: what loads, what is broken, what is only a warning."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edge.core.policies import (
    PolicyFolderError,
    PolicySnapshot,
    Revocation,
    load_policies,
    normalize_domain,
)
from edge.pki import CA, certs_pem

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.root("Policy Test Root")


def _partner(base: Path, pid: str, files: dict[str, bytes | str]) -> Path:
    folder = base / pid
    folder.mkdir(parents=True)
    for name, data in files.items():
        path = folder / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
    return folder


def _only_problem(snapshot: PolicySnapshot, pid: str) -> str:
    problems = snapshot.problems_of(pid)
    assert len(problems) == 1, [str(p) for p in problems]
    return str(problems[0])


def test_full_partner_loads(tmp_path: Path, root: CA) -> None:
    other = CA.root("Second Root")
    crl = root.crl()
    folder = _partner(
        tmp_path,
        "fabrikam.com",
        {
            "roots.pem": certs_pem([root.cert, other.cert]),
            "third.CER": CA.root("Third").cert.public_bytes(serialization.Encoding.DER),
            "fabrikam.crl": crl.public_bytes(serialization.Encoding.DER),
            "policy.toml": (
                'domains = ["Fabrikam.com", "fabrikam.net.", "bücher.example"]\n'
                'enabled = true\npool = "frontend"\nmax_connections = 100\n'
                'revocation = "require-crl"\n'
            ),
            "README.md": "notes",
            ".hidden.pem": "junk",
        },
    )
    snapshot = load_policies(tmp_path)
    assert snapshot.problems == ()
    policy = snapshot.partners["fabrikam.com"]
    assert policy.domains == ("fabrikam.com", "fabrikam.net", "xn--bcher-kva.example")
    assert (policy.enabled, policy.pool, policy.max_connections) == (True, "frontend", 100)
    assert policy.revocation is Revocation.REQUIRE_CRL
    assert len(policy.roots) == 3
    assert policy.root_files == (folder / "roots.pem", folder / "roots.pem", folder / "third.CER")
    assert policy.crls == (crl,) and policy.crl_files == (folder / "fabrikam.crl",)
    assert snapshot.state_counts() == {"enabled": 1, "disabled": 0, "broken": 0}
    with pytest.raises(TypeError):
        snapshot.partners["x"] = policy  # type: ignore[index]


def test_defaults_without_policy_file(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "contoso.com", {"root.crt": root.cert_pem()})
    policy = load_policies(tmp_path).partners["contoso.com"]
    assert policy.domains == ("contoso.com",)
    assert policy.enabled and policy.pool is None and policy.max_connections is None
    assert policy.revocation is Revocation.CRL_IF_PRESENT


# (files of the partner folder, text the single problem must contain)
BROKEN = [
    pytest.param(
        {"policy.toml": "colour = 1\n"}, "policy.toml: colour: unknown key", id="unknown-key"
    ),
    pytest.param(
        {"policy.toml": 'enabled = "yes"\n'},
        "policy.toml: enabled: must be true or false",
        id="wrong-type-enabled",
    ),
    pytest.param(
        {"policy.toml": 'domains = "a.example"\n'},
        "policy.toml: domains: must be a list of strings",
        id="domains-not-list",
    ),
    pytest.param(
        {"policy.toml": "domains = []\n"},
        "policy.toml: domains: must not be empty",
        id="domains-empty",
    ),
    pytest.param(
        {"policy.toml": 'domains = ["*.a.example"]\n'}, "has a wildcard", id="domains-wildcard"
    ),
    pytest.param({"policy.toml": 'domains = ["com"]\n'}, "has a single label", id="domains-tld"),
    pytest.param(
        {"policy.toml": 'domains = ["a b.example"]\n'},
        "is not a valid DNS name",
        id="domains-invalid",
    ),
    pytest.param(
        {"policy.toml": "max_connections = 0\n"},
        "max_connections: must be an integer >= 1",
        id="max-zero",
    ),
    pytest.param(
        {"policy.toml": "max_connections = true\n"},
        "max_connections: must be an integer >= 1",
        id="max-bool",
    ),
    pytest.param(
        {"policy.toml": 'revocation = "ocsp"\n'},
        "revocation: must be one of",
        id="revocation-value",
    ),
    pytest.param(
        {"policy.toml": 'pool = ""\n'}, "pool: must be a non-empty string", id="pool-empty"
    ),
    pytest.param(
        {"policy.toml": "domains = [\n"}, "policy.toml: not valid TOML", id="toml-unparsable"
    ),
    pytest.param(
        {"garbage.pem": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"},
        "garbage.pem: not a readable PEM certificate file",
        id="pem-unparsable",
    ),
    pytest.param(
        {"garbage.cer": b"\x30\x03\x02\x01\x01"},
        "garbage.cer: neither PEM nor a DER certificate",
        id="der-unparsable",
    ),
    pytest.param({"bad.crl": b"not a crl"}, "bad.crl: not a readable CRL", id="crl-unparsable"),
]


@pytest.mark.parametrize(("files", "expected"), BROKEN)
def test_broken_partner(
    tmp_path: Path, root: CA, files: dict[str, bytes | str], expected: str
) -> None:
    _partner(tmp_path, "broken.example", {"root.pem": root.cert_pem(), **files})
    _partner(tmp_path, "fine.example", {"root.pem": root.cert_pem()})
    snapshot = load_policies(tmp_path)
    assert snapshot.broken == {"broken.example"}
    assert "broken.example" not in snapshot.partners
    assert "fine.example" in snapshot.partners  # others load normally
    message = _only_problem(snapshot, "broken.example")
    assert message.startswith(str(tmp_path / "broken.example")), message
    assert expected in message
    assert snapshot.state_counts() == {"enabled": 1, "disabled": 0, "broken": 1}


def test_root_that_is_not_a_ca(tmp_path: Path, root: CA) -> None:
    leaf = root.issue(dns=["sip.leafy.example"])
    _partner(tmp_path, "leafy.example", {"leaf.pem": leaf.chain_pem()})
    snapshot = load_policies(tmp_path)
    problems = [str(p) for p in snapshot.problems_of("leafy.example")]
    assert any(
        "leaf.pem: certificate CN=sip.leafy.example" in p and "not a CA" in p for p in problems
    )
    assert any("no trusted root certificate found" in p for p in problems)
    assert snapshot.broken == {"leafy.example"}


def test_private_key_in_root_file(tmp_path: Path, root: CA) -> None:
    leaf = root.issue(dns=["x.keyed.example"])
    _partner(tmp_path, "keyed.example", {"root.pem": root.cert_pem() + leaf.key_pem()})
    snapshot = load_policies(tmp_path)
    problems = [str(p) for p in snapshot.problems_of("keyed.example")]
    assert any("root.pem: contains a private key" in p for p in problems)
    assert snapshot.broken == {"keyed.example"}
    assert all("PRIVATE KEY" not in p for p in problems)


def test_no_root(tmp_path: Path) -> None:
    _partner(tmp_path, "empty.example", {"policy.toml": "enabled = true\n"})
    snapshot = load_policies(tmp_path)
    assert "empty.example: no trusted root certificate found" in _only_problem(
        snapshot, "empty.example"
    )
    assert snapshot.broken == {"empty.example"}


def test_unknown_extension_alone_is_broken_with_hint(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "typo.example", {"root.pem.txt": root.cert_pem()})
    snapshot = load_policies(tmp_path)
    problems = snapshot.problems_of("typo.example")
    assert [p.fatal for p in problems] == [False, True]
    assert "root.pem.txt: ignored: unknown file type" in str(problems[0])
    assert "no trusted root certificate found (not read: root.pem.txt)" in str(problems[1])
    assert snapshot.broken == {"typo.example"}


def test_unknown_extension_beside_a_root_is_a_warning(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "typo.example", {"root.pem": root.cert_pem(), "new-root.pem.txt": "x"})
    snapshot = load_policies(tmp_path)
    assert "new-root.pem.txt: ignored: unknown file type" in _only_problem(snapshot, "typo.example")
    assert not snapshot.problems[0].fatal
    assert snapshot.broken == frozenset() and "typo.example" in snapshot.partners


def test_warnings_expired_root_stale_crl_require_without_crl_subfolder(tmp_path: Path) -> None:
    old = CA.root(
        "Old Root", not_before=NOW - dt.timedelta(days=400), not_after=NOW - dt.timedelta(days=1)
    )
    stale = old.crl(last_update=NOW - dt.timedelta(days=9), next_update=NOW - dt.timedelta(days=2))
    folder = _partner(
        tmp_path,
        "warned.example",
        {"root.pem": old.cert_pem(), "old.crl": stale.public_bytes(serialization.Encoding.PEM)},
    )
    (folder / "archive").mkdir()
    _partner(
        tmp_path,
        "strict.example",
        {"root.pem": CA.root("S").cert_pem(), "policy.toml": 'revocation = "require-crl"\n'},
    )
    snapshot = load_policies(tmp_path)
    assert not snapshot.broken
    messages = sorted(str(p) for p in snapshot.problems)
    assert all(not p.fatal for p in snapshot.problems)
    assert any("root.pem: certificate CN=Old Root" in m and "expired on" in m for m in messages)
    assert any("old.crl: CRL of" in m and "stale" in m for m in messages)
    assert any(m.endswith("crl_unavailable") and "strict.example" in m for m in messages)
    assert any("archive: sub-folders are not read" in m for m in messages)


def test_crl_with_bad_signature_from_root(tmp_path: Path, root: CA) -> None:
    impostor = CA.root("Policy Test Root")  # same name, other key
    crl = impostor.crl()
    _partner(
        tmp_path,
        "forged.example",
        {"root.pem": root.cert_pem(), "root.crl": crl.public_bytes(serialization.Encoding.PEM)},
    )
    snapshot = load_policies(tmp_path)
    assert "root.crl: CRL of" in _only_problem(snapshot, "forged.example")
    assert "signature does not verify" in _only_problem(snapshot, "forged.example")
    # Issue 15: a warning, the partner loads; chains the CRL covers fail closed.
    assert not snapshot.problems_of("forged.example")[0].fatal
    assert snapshot.broken == set()


def test_folder_name_not_a_domain(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "contoso", {"root.pem": root.cert_pem()})
    _partner(
        tmp_path,
        "litware",
        {"root.pem": root.cert_pem(), "policy.toml": 'domains = ["litware.com"]\n'},
    )
    snapshot = load_policies(tmp_path)
    assert "is not a domain name" in _only_problem(snapshot, "contoso")
    assert snapshot.partners["litware"].domains == ("litware.com",)


def test_reserved_partner_id(tmp_path: Path, root: CA) -> None:
    _partner(
        tmp_path,
        "unknown",
        {"root.pem": root.cert_pem(), "policy.toml": 'domains = ["u.example"]\n'},
    )
    snapshot = load_policies(tmp_path)
    assert "reserved" in _only_problem(snapshot, "unknown")
    assert snapshot.broken == {"unknown"}


def test_disabled_and_stray_top_level_files(tmp_path: Path, root: CA) -> None:
    _partner(
        tmp_path, "off.example", {"root.pem": root.cert_pem(), "policy.toml": "enabled = false\n"}
    )
    (tmp_path / "README.md").write_text("layout notes")
    (tmp_path / ".DS_Store").write_text("x")
    (tmp_path / "stray-root.pem").write_bytes(root.cert_pem())
    snapshot = load_policies(tmp_path)
    assert snapshot.state_counts() == {"enabled": 0, "disabled": 1, "broken": 0}
    (problem,) = snapshot.problems
    assert problem.partner == "" and not problem.fatal
    assert str(problem).startswith(str(tmp_path / "stray-root.pem") + ": ignored")


def test_previous_snapshot_keeps_partner_when_a_new_root_is_half_copied(
    tmp_path: Path, root: CA
) -> None:
    folder = _partner(tmp_path, "keep.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    (folder / "new-root.pem").write_bytes(root.cert_pem()[:200])
    second = load_policies(tmp_path, previous=first)
    assert second.broken == {"keep.example"}
    assert second.partners["keep.example"] == first.partners["keep.example"]
    assert second.state_counts() == {"enabled": 0, "disabled": 0, "broken": 1}
    assert "keep.example" not in load_policies(tmp_path).partners


def test_previous_snapshot_does_not_keep_a_partner_with_a_broken_policy(
    tmp_path: Path, root: CA
) -> None:
    folder = _partner(tmp_path, "keep.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    (folder / "policy.toml").write_text("bogus = 1\n")  # could have said enabled = false
    second = load_policies(tmp_path, previous=first)
    assert second.broken == {"keep.example"}
    assert "keep.example" not in second.partners


def test_missing_policies_folder(tmp_path: Path) -> None:
    with pytest.raises(PolicyFolderError, match="does not exist"):
        load_policies(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PolicyFolderError, match="not a folder"):
        load_policies(tmp_path / "file")


def test_normalize_domain() -> None:
    assert normalize_domain(" Fabrikam.COM. ") == "fabrikam.com"
    for bad in ("", ".", "*.x.com", "com", "a..b", "-a.com"):
        with pytest.raises(ValueError):
            normalize_domain(bad)


# ----------------------------------------------------------------------
# Single-file partners (`ID.toml`): one ConfigMap key per partner on Kubernetes


def _single(base: Path, pid: str, text: str) -> Path:
    path = base / f"{pid}.toml"
    path.write_text(text)
    return path


def test_single_file_partner_loads_roots_crls_and_settings(tmp_path: Path, root: CA) -> None:
    crl = root.crl().public_bytes(serialization.Encoding.PEM).decode()
    _single(
        tmp_path,
        "contoso.example",
        f'domains = ["contoso.example", "contoso.net"]\npool = "frontend"\n'
        f'revocation = "require-crl"\nroots = """\n{root.cert_pem().decode()}"""\n'
        f'crls = """\n{crl}"""\n',
    )
    snapshot = load_policies(tmp_path)
    assert snapshot.problems == ()
    policy = snapshot.partners["contoso.example"]
    assert policy.roots == (root.cert,)
    assert len(policy.crls) == 1
    assert policy.domains == ("contoso.example", "contoso.net")
    assert policy.pool == "frontend"
    assert policy.revocation is Revocation.REQUIRE_CRL


def test_single_file_partner_defaults_domain_to_its_id(tmp_path: Path, root: CA) -> None:
    _single(tmp_path, "litware.example", f'roots = """\n{root.cert_pem().decode()}"""\n')
    assert load_policies(tmp_path).partners["litware.example"].domains == ("litware.example",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('domains = ["x.example"]\n', "roots: missing"),
        ('roots = """\nnot a certificate\n"""\n', "roots: no PEM certificate"),
        (
            'roots = """\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"""\n',
            "not a readable PEM",
        ),
        ("roots = 42\n", "roots: must be PEM text"),
        ('rooots = "typo"\n', "rooots: unknown key"),
        ("roots = [\n", "not valid TOML"),
    ],
)
def test_single_file_partner_problems_name_the_file(
    tmp_path: Path, root: CA, text: str, expected: str
) -> None:
    path = _single(tmp_path, "bad.example", text)
    snapshot = load_policies(tmp_path)
    assert snapshot.broken == {"bad.example"}
    assert "bad.example" not in snapshot.partners
    messages = [str(p) for p in snapshot.problems_of("bad.example")]
    assert any(m.startswith(f"{path}: ") and expected in m for m in messages), messages


def test_partner_defined_by_folder_and_file_is_broken(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "twice.example", {"root.pem": root.cert_pem()})
    _single(tmp_path, "twice.example", f'roots = """\n{root.cert_pem().decode()}"""\n')
    snapshot = load_policies(tmp_path)
    assert snapshot.broken == {"twice.example"}
    assert all("defined twice" in str(p) for p in snapshot.problems_of("twice.example"))
