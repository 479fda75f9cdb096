"""The generated reference in docs/reference/ is current, complete and deterministic.

Checks, on the real tree: `python -m edge.docs --check` finds nothing stale;
every schema key, registered metric, reason code, log event and CLI subcommand
appears in the generated files; every metric constructor and every
`.event("name", field=...)` call in edge/ is registered (walking the source
with `ast`, so an event or metric added anywhere without documentation fails
here); the schema agrees with what the loaders accept and with their defaults;
and the generated example configuration loads.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import edge
from edge import docs, events
from edge.core import reason_docs, schema
from edge.core.config import (
    Limits,
    Member,
    PolicySettings,
    Pool,
    RevocationSettings,
    load_config,
)
from edge.core.policies import Revocation, load_policies
from edge.core.reasons import Reason
from edge.pki import CA

PACKAGE = Path(edge.__file__).parent
ROOT = docs.repo_root()


def _read(rel: str) -> str:
    return (ROOT / rel).read_text(encoding="utf-8")


# ----------------------------------------------------------------------
# Stale, deterministic


def test_generated_files_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    status = docs.main(["--check"])
    assert status == 0, capsys.readouterr().err


def test_rendering_is_deterministic() -> None:
    first = docs.render_all()
    second = docs.render_all()
    assert first == second
    for text in first.values():
        # No timestamps, no path of this machine.
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text)
        assert str(ROOT) not in text


def test_check_names_stale_files_and_regenerating_fixes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    for rel in docs.GENERATED:
        assert f"stale: {rel}" in err
    assert not (tmp_path / "docs").exists()  # --check writes nothing
    assert docs.main(["--root", str(tmp_path)]) == 0
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0
    # A hand edit of a generated file is stale again.
    target = tmp_path / "docs/reference/metrics.md"
    target.write_text(target.read_text() + "hand edit\n")
    capsys.readouterr()
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert "stale: docs/reference/metrics.md" in capsys.readouterr().err
    # Regenerating into a clean copy gives the committed bytes.
    for rel in docs.GENERATED:
        if rel != "docs/reference/metrics.md":
            assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), rel


# ----------------------------------------------------------------------
# 100 % coverage of the sources of truth


def test_every_schema_key_is_in_the_reference_and_the_example() -> None:
    reference = _read("docs/reference/configuration.md")
    example = _read("docs/reference/edge.toml.example")
    for table in schema.TABLES:
        assert f"`{table.header}`" in reference or table.file == schema.POLICY_TOML
        for key in schema.keys_of(table.name, table.file):
            assert key.meaning and key.type, key
            assert f"| `{key.name}` |" in reference, key
            if table.file == schema.EDGE_TOML and table.name != "pools.members":
                assert re.search(rf"^(# )?{key.name} =", example, re.M), key
            elif table.name == "pools.members":
                assert f"#   {key.name} (" in example, key


def test_every_registered_metric_is_in_the_reference() -> None:
    reference = _read("docs/reference/metrics.md")
    families = docs.metric_families()
    assert len(families) >= 13
    for name, kind, labels, doc, _bounds in families:
        assert f"| `{name}` | {kind} |" in reference, name
        assert doc, name
        for label in labels:
            assert label in docs.LABELS, f"{name}: label {label!r} has no description"


def _metric_names_in_source() -> set[str]:
    """First argument of every Counter/Gauge/Histogram/... call in edge/."""
    kinds = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
    found: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if name in kinds and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.add(first.value)
    return found


def test_every_metric_constructed_in_the_code_is_documented() -> None:
    """A module that registers a metric outside `Metrics` must add its registrar to
    edge/docs.py `_registrars`, or this fails."""
    documented = {name for name, *_ in docs.metric_families()}
    in_source = _metric_names_in_source()
    assert "edge_handshakes_total" in in_source and "edge_dns_failures_total" in in_source
    missing = {n for n in in_source if n not in documented and f"{n}_total" not in documented}
    assert missing == set()


def test_every_reason_code_is_described_and_in_the_reference() -> None:
    reference = _read("docs/reference/reason-codes.md")
    for reason in Reason:
        doc = reason_docs.DESCRIPTIONS.get(reason)
        assert doc is not None, f"{reason.value}: no description in edge/core/reason_docs.py"
        assert doc.meaning and doc.action and doc.where
        assert set(doc.where) <= set(reason_docs.PLACES)
        assert f"| `{reason.value}` |" in reference
    for code in reason_docs.UPSTREAM_ATTEMPT_REASONS:
        assert f"| `{code}` |" in reference
    assert set(reason_docs.DESCRIPTIONS) == set(Reason)


def test_every_log_event_is_in_the_reference() -> None:
    reference = _read("docs/reference/log-events.md")
    for name, event in events.EVENTS.items():
        assert f"\n### {name}\n" in reference
        assert event.level in ("info", "warning", "error")
        for field in event.fields:
            assert f"| `{field}` |" in reference


def test_every_subcommand_is_in_the_cli_reference() -> None:
    reference = _read("docs/reference/cli.md")
    for command in ("run", "check", "verify", "demo"):
        assert f"## edge {command}\n" in reference
        assert f"usage: edge {command}" in reference
    assert "--workers" in reference and "--purpose" in reference


# ----------------------------------------------------------------------
# Every event the code emits is registered, with every field


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _enclosing_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.AST | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node
    return None


def _dict_keys_of(variable: str, scope: ast.AST) -> set[str] | None:
    """Constant keys a function puts in the dict `variable` (literal and `v["k"] = ...`)."""
    keys: set[str] | None = None
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Name)
                    and target.id == variable
                    and isinstance(node.value, ast.Dict)
                ):
                    keys = (keys or set()) | {
                        k.value
                        for k in node.value.keys
                        if isinstance(k, ast.Constant) and isinstance(k.value, str)
                    }
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == variable
                    and isinstance(target.slice, ast.Constant)
                    and isinstance(target.slice.value, str)
                ):
                    keys = (keys or set()) | {target.slice.value}
    return keys


def _emissions() -> tuple[list[tuple[str, str, set[str]]], list[str]]:
    """(where, event name, fields) of every event written in edge/, and problems."""
    found: list[tuple[str, str, set[str]]] = []
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "events.py" and path.parent == PACKAGE:
            continue  # the registry itself, not an emitter
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = _parents(tree)
        rel = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "event"
                and node.args
            ):
                first = node.args[0]
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    problems.append(f"{where}: event name is not a literal")
                    continue
                fields = {k.arg for k in node.keywords if k.arg is not None}
                for splat in (k for k in node.keywords if k.arg is None):
                    scope = _enclosing_function(node, parents)
                    keys = (
                        _dict_keys_of(splat.value.id, scope)
                        if isinstance(splat.value, ast.Name) and scope is not None
                        else None
                    )
                    if keys is None:
                        problems.append(f"{where}: cannot see the fields passed with **")
                    else:
                        fields |= keys
                found.append((where, first.value, fields))
            elif isinstance(node, ast.Dict):
                pairs = {
                    k.value: v
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and isinstance(k.value, str)
                }
                value = pairs.get("event")
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    found.append((where, value.value, set(pairs) - {"event"}))
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Subscript)
                        and isinstance(target.slice, ast.Constant)
                        and target.slice.value == "event"
                        and isinstance(node.value, ast.Constant)
                        and isinstance(node.value.value, str)
                    ):
                        found.append((where, node.value.value, set()))
    return found, problems


def test_every_emitted_event_and_field_is_registered() -> None:
    found, problems = _emissions()
    assert len(found) >= 30
    for where, name, fields in found:
        problems += [f"{where}: {p}" for p in events.check(name, fields)]
    assert problems == []


def test_every_registered_event_is_emitted_somewhere() -> None:
    emitted = {name for _where, name, _fields in _emissions()[0]}
    assert set(events.EVENTS) - emitted == set()


def test_check_refuses_unregistered_names_and_fields() -> None:
    assert events.check("connection_closed", ["listener", "end", "worker", "ts"]) == []
    assert events.check("connection_closed", ["payload"]) == [
        "log event 'connection_closed': unregistered field 'payload' (add it to edge/events.py)"
    ]
    assert events.check("no_such_event", []) != []
    assert events.level_of("startup_failed") == "error"
    assert events.level_of("no_such_event") == "error"


# ----------------------------------------------------------------------
# The schema agrees with the loaders


@pytest.fixture(scope="module")
def material() -> dict[str, bytes]:
    public = CA.root("Public Root").issue(dns=["edge.contoso.com"])
    enterprise = CA.root("Enterprise Root")
    internal = enterprise.issue(dns=["edge.corp.example"])
    return {
        "edge-public.pem": public.chain_pem(),
        "edge-public.key": public.key_pem(),
        "edge-internal.pem": internal.chain_pem(),
        "edge-internal.key": internal.key_pem(),
        "enterprise-root.pem": enterprise.cert_pem(),
    }


@pytest.fixture
def site(tmp_path: Path, material: dict[str, bytes]) -> Path:
    """The generated example configuration, with its certificates and policies folder."""
    (tmp_path / "certs").mkdir()
    for name, data in material.items():
        (tmp_path / "certs" / name).write_bytes(data)
    (tmp_path / "federation_policies").mkdir()
    path = tmp_path / "edge.toml"
    path.write_text(_read("docs/reference/edge.toml.example"))
    return path


def test_the_generated_example_loads_with_the_schema_defaults(site: Path) -> None:
    config = load_config(site)
    assert config.limits == Limits()
    assert config.policies == PolicySettings()
    assert config.revocation == RevocationSettings(cache_dir=site.parent / "crl-cache")
    assert [m.host for m in config.pools["frontend"].members] == ["fe1.corp.example"]


def _defaults(cls: type) -> dict[str, object]:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


@pytest.mark.parametrize(
    ("table", "cls"),
    [
        ("limits", Limits),
        ("policies", PolicySettings),
        ("revocation", RevocationSettings),
        ("pools", Pool),
        ("pools.members", Member),
    ],
)
def test_schema_defaults_match_the_loader(table: str, cls: type) -> None:
    defaults = _defaults(cls)
    compared = 0
    for key in schema.keys_of(table):
        if key.default is not None and key.name in defaults and key.name != "cache_dir":
            assert defaults[key.name] == key.default, f"{table}.{key.name}"
            compared += 1
    assert compared >= 1


def _expected_keys(problems: tuple[str, ...], marker: str) -> set[str]:
    for line in problems:
        if marker in line:
            listed = line.split(marker, 1)[1].rstrip(")")
            return {k.strip() for k in listed.split(",")}
    raise AssertionError(f"no {marker!r} in {problems}")


# (table, text inserted after its header line in the example, or at the top)
_UNKNOWN = [
    ("", "zz_unknown = 1\n"),
    ("identity", "[identity]\n"),
    ("listeners", "[[listeners]]\n"),
    ("pools", "[[pools]]\n"),
    ("metrics", "[metrics]\n"),
    ("limits", "[limits]\n"),
    ("policies", "[policies]\n"),
    ("dns", "[dns]\n"),
    ("revocation", "[revocation]\n"),
]


@pytest.mark.parametrize(("table", "header"), _UNKNOWN, ids=[t or "top" for t, _ in _UNKNOWN])
def test_the_loader_accepts_exactly_the_schema_keys(site: Path, table: str, header: str) -> None:
    """An unknown key's error lists what the loader knows: it must be the schema's keys
    (a key added to the loader without a schema entry, or the reverse, fails here)."""
    from edge.core.config import ConfigError

    text = site.read_text()
    text = text.replace(header, header + "zz_unknown = 1\n", 1) if table else header + text
    site.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(site)
    known = _expected_keys(caught.value.problems, "expected one of: ")
    wanted = set(schema.top_tables()) if not table else set(schema.key_names(table))
    assert known == wanted


def test_the_loader_accepts_exactly_the_schema_member_keys(site: Path) -> None:
    from edge.core.config import ConfigError

    text = site.read_text().replace("port = 5061 }", "port = 5061, zz_unknown = 1 }", 1)
    site.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(site)
    known = _expected_keys(caught.value.problems, "expected one of: ")
    assert known == set(schema.key_names("pools.members"))


def test_policy_loader_accepts_exactly_the_schema_keys(tmp_path: Path) -> None:
    root = CA.root("Fabrikam Root")
    folder = tmp_path / "fabrikam.com"
    folder.mkdir()
    (folder / "root.pem").write_bytes(root.cert_pem())
    (folder / "policy.toml").write_text("zz_unknown = 1\n")
    (tmp_path / "northwind.example.toml").write_text(
        f'zz_unknown = 1\nroots = """\n{root.cert_pem().decode()}"""\n'
    )
    snapshot = load_policies(tmp_path)
    by_partner = {p.partner: p.message for p in snapshot.problems}
    folder_known = _expected_keys((by_partner["fabrikam.com"],), "known keys: ")
    file_known = _expected_keys((by_partner["northwind.example"],), "known keys: ")
    policy_keys = schema.keys_of("", schema.POLICY_TOML)
    assert folder_known == {k.name for k in policy_keys if not k.only_in}
    assert file_known == {k.name for k in policy_keys}


def test_policy_defaults_match_the_schema(tmp_path: Path) -> None:
    folder = tmp_path / "fabrikam.com"
    folder.mkdir()
    (folder / "root.pem").write_bytes(CA.root("Fabrikam Root").cert_pem())
    policy = load_policies(tmp_path).partners["fabrikam.com"]
    defaults = {k.name: k.default for k in schema.keys_of("", schema.POLICY_TOML)}
    assert policy.enabled is defaults["enabled"]
    assert policy.revocation == Revocation(str(defaults["revocation"]))
    assert policy.domains == ("fabrikam.com",)


# ----------------------------------------------------------------------
# The hand-written operations page covers every alert and dashboard panel


def test_operations_lists_every_alert_and_panel() -> None:
    import json

    import yaml

    page = _read("docs/operations.md")
    rules = yaml.safe_load(_read("deploy/prometheus/edge.rules.yml"))
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    records = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
    assert len(alerts) >= 10
    for name in alerts:
        assert f"| `{name}` |" in page, f"alert {name} has no row in docs/operations.md"
    for name in records:
        assert name in page, f"recording rule {name} not described in docs/operations.md"

    def titles(panels: list[dict[str, object]]) -> list[tuple[str, str]]:
        found = []
        for panel in panels:
            found.append((str(panel.get("type")), str(panel.get("title"))))
            found += titles(panel.get("panels", []))  # type: ignore[arg-type]
        return found

    dashboard = json.loads(_read("deploy/grafana/dashboards/edge.json"))
    panels = titles(dashboard["panels"])
    assert len(panels) >= 15
    for kind, title in panels:
        cell = f"**{title}**" if kind == "row" else f"| {title} |"
        assert cell in page, f"dashboard {kind} {title!r} not described in docs/operations.md"
