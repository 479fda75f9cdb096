"""Odd things in a policies folder: FIFOs, sockets, symlinks, backups, keys, BOMs.

And the fail-closed rule for reloads (docs/partners.md, "What the edge does with odd
files"): a change that could withdraw trust and cannot be read withdraws it; a
change that could add trust and cannot be read adds nothing.

Nothing here may hang: a FIFO is always paired with `_unblock_fifo`, which
opens the write end once a reader is waiting (and closes it at once, giving
the reader EOF), so code that wrongly opens the FIFO fails an assertion
instead of blocking the suite. `edge check` runs as a subprocess with a timeout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import edge.watch
from edge.core.policies import (
    PolicySnapshot,
    is_ignored_name,
    load_policies,
    resolve_domain_conflicts,
)
from edge.pki import CA, certs_pem
from edge.watch import fingerprint
from tests.gateway_harness import (
    Pki,
    echo_roundtrip,
    partner_stream,
    start_edge,
    start_pool,
    stop_edge,
    write_federation,
)

REPO = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC)
KEY_PROBLEM = "a private key does not belong in a partner folder: remove it"


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.root("Odd Files Root")


def _partner(base: Path, pid: str, files: dict[str, bytes | str]) -> Path:
    folder = base / pid
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = folder / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
    return folder


def _messages(snapshot: PolicySnapshot, pid: str) -> list[str]:
    return [str(p) for p in snapshot.problems_of(pid)]


@contextlib.contextmanager
def _unblock_fifo(path: Path) -> Iterator[None]:
    """Give EOF to anyone who opens the FIFO ``path`` for reading (bounded: 30 s)."""
    stop = threading.Event()

    def writer() -> None:
        for _ in range(300):
            if stop.is_set():
                return
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.1)
                continue
            os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _edge_check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", "check", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


# ----------------------------------------------------------------------
# 1. Only regular files are read


def test_fifo_root_is_a_problem_and_does_not_block(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "fabrikam.example", {"root.pem": root.cert_pem()})
    os.mkfifo(folder / "pipe.pem")
    with _unblock_fifo(folder / "pipe.pem"):
        snapshot = load_policies(tmp_path)
    messages = _messages(snapshot, "fabrikam.example")
    assert any(
        m.startswith(f"{folder / 'pipe.pem'}: not a regular file (a FIFO)") for m in messages
    ), messages
    assert snapshot.broken == {"fabrikam.example"}


def test_fifo_policy_toml_withdraws_the_partner(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "fabrikam.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    os.mkfifo(folder / "policy.toml")
    with _unblock_fifo(folder / "policy.toml"):
        second = load_policies(tmp_path, previous=first)
    assert any(
        "policy.toml: not a regular file" in m for m in _messages(second, "fabrikam.example")
    )
    assert second.broken == {"fabrikam.example"}
    assert "fabrikam.example" not in second.partners  # cannot read: trust withdrawn


def test_socket_in_partner_folder_is_named(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "s.example", {"root.pem": root.cert_pem()})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(folder / "s.crt"))
        snapshot = load_policies(tmp_path)
    assert any(
        "s.crt: not a regular file (a socket)" in m for m in _messages(snapshot, "s.example")
    )


def test_edge_check_finishes_and_names_the_fifo(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "fabrikam.example", {"root.pem": root.cert_pem()})
    os.mkfifo(folder / "pipe.pem")
    os.mkfifo(folder / "policy.toml")
    try:
        result = _edge_check("--policies", tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("edge check hung on a FIFO")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{folder / 'pipe.pem'}: not a regular file (a FIFO)" in result.stdout
    assert f"{folder / 'policy.toml'}: not a regular file (a FIFO)" in result.stdout


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "big.example", {"root.pem": root.cert_pem()})
    with (folder / "huge.crt").open("wb") as f:
        f.truncate(65 * 1024 * 1024)  # sparse: costs no disk
    snapshot = load_policies(tmp_path)
    assert any("huge.crt: too large" in m for m in _messages(snapshot, "big.example"))


def test_symlink_out_of_the_policies_folder_is_refused(tmp_path: Path, root: CA) -> None:
    outside = tmp_path / "etc-ssl"
    outside.mkdir()
    bundle = certs_pem([CA.root(f"Public {i}").cert for i in range(3)])
    (outside / "ca-certificates.crt").write_bytes(bundle)
    policies = tmp_path / "policies"
    folder = _partner(policies, "linked.example", {"root.pem": root.cert_pem()})
    first = load_policies(policies)
    os.symlink(outside / "ca-certificates.crt", folder / "system.pem")
    os.symlink(outside, policies / "elsewhere.example")
    snapshot = load_policies(policies, previous=first)
    # A root file that cannot be read adds nothing: the partner keeps its own root.
    assert snapshot.partners["linked.example"].roots == (root.cert,)  # not 1 + 3 roots
    assert "linked.example" in snapshot.broken  # and is reported until the link goes
    assert any(
        m.startswith(f"{folder / 'system.pem'}: a symbolic link leading outside the policies")
        for m in _messages(snapshot, "linked.example")
    )
    assert "elsewhere.example" in snapshot.broken
    assert "elsewhere.example" not in snapshot.partners
    assert any("leading outside" in m for m in _messages(snapshot, "elsewhere.example"))


def test_symlinks_inside_the_folder_and_a_linked_policies_folder_work(
    tmp_path: Path, root: CA
) -> None:
    """The Kubernetes layout: `..data -> ..2026_x`, every name a link through `..data`."""
    real = tmp_path / "real"
    version = real / "..2026_11_29_v1"
    _partner(version, "fabrikam.example", {"root.pem": root.cert_pem()})
    (version / "litware.example.toml").write_text(f'roots = """\n{root.cert_pem().decode()}"""\n')
    os.symlink(version.name, real / "..data")
    os.symlink("..data/fabrikam.example", real / "fabrikam.example")
    os.symlink("..data/litware.example.toml", real / "litware.example.toml")
    # A ConfigMap mounted as one partner folder: files linked through its own ..data.
    inner = real / "contoso.example"
    _partner(inner, "..2026_11_29_v1", {"root.pem": root.cert_pem()})
    os.symlink("..2026_11_29_v1", inner / "..data")
    os.symlink("..data/root.pem", inner / "root.pem")
    os.symlink(real, tmp_path / "linked")  # the policies folder itself may be a link
    snapshot = load_policies(tmp_path / "linked")
    assert snapshot.problems == (), [str(p) for p in snapshot.problems]
    assert snapshot.notices == ()  # kubelet's own ..entries are not news
    assert set(snapshot.partners) == {"fabrikam.example", "litware.example", "contoso.example"}


# ----------------------------------------------------------------------
# 2. Hidden and backup-looking entries


def test_backup_copy_of_a_partner_is_ignored_with_a_notice(tmp_path: Path, root: CA) -> None:
    folder = _partner(
        tmp_path,
        "fabrikam.example",
        {"root.pem": root.cert_pem(), "policy.toml": 'domains = ["fabrikam.example"]\n'},
    )
    shutil.copytree(folder, tmp_path / "fabrikam.example.bak")
    shutil.copytree(folder, tmp_path / "fabrikam.example.old")
    shutil.copytree(folder, tmp_path / ".fabrikam.example.orig")
    for name in ("root.pem~", ".#root.pem", "root.pem.swp", "root.pem.bak", "root.pem.orig"):
        (folder / name).write_bytes(b"junk")
    (folder / "archive.old").mkdir()
    snapshot = load_policies(tmp_path)
    assert snapshot.problems == (), [str(p) for p in snapshot.problems]
    assert set(snapshot.partners) == {"fabrikam.example"}
    noticed = {p.path.name for p in snapshot.notices}
    assert noticed == {
        "fabrikam.example.bak",
        "fabrikam.example.old",
        ".fabrikam.example.orig",
        "root.pem~",
        ".#root.pem",
        "root.pem.swp",
        "root.pem.bak",
        "root.pem.orig",
        "archive.old",
    }
    assert all("ignored" in str(p) for p in snapshot.notices)
    result = _edge_check("--policies", tmp_path)
    assert result.returncode == 0, result.stdout
    assert f"notice: {tmp_path / 'fabrikam.example.bak'}: ignored" in result.stdout


def test_ignored_names() -> None:
    for name in ("x.bak", "x~", ".#x", "x.swp", ".x", "README.md", "x.old", "x.orig"):
        assert is_ignored_name(name), name
    for name in ("root.pem", "policy.toml", "fabrikam.example", "bakery.example"):
        assert not is_ignored_name(name), name


def test_new_notices_are_reported_once(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "f.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    shutil.copytree(folder, tmp_path / "f.example.bak")
    second = load_policies(tmp_path, previous=first)
    assert [p.path.name for p in second.new_notices(first)] == ["f.example.bak"]
    third = load_policies(tmp_path, previous=second)
    assert third.new_notices(second) == ()


# ----------------------------------------------------------------------
# 3. Two folders claiming one domain


def test_domain_claimed_twice_at_first_load(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "fabrikam.example", {"root.pem": root.cert_pem()})
    copy = _partner(
        tmp_path,
        "fabrikam-copy",
        {"root.pem": root.cert_pem(), "policy.toml": 'domains = ["Fabrikam.example"]\n'},
    )
    assert not load_policies(tmp_path).broken  # a cross-check, not a per-folder load
    snapshot = resolve_domain_conflicts(load_policies(tmp_path))
    # Alphabetically first keeps it: "fabrikam-copy" < "fabrikam.example".
    assert set(snapshot.partners) == {"fabrikam-copy"}
    assert snapshot.broken == {"fabrikam.example"}
    (problem,) = snapshot.problems_of("fabrikam.example")
    assert problem.fatal
    assert "fabrikam.example" in str(problem) and str(copy) in str(problem)
    warning = snapshot.problems_of("fabrikam-copy")
    assert len(warning) == 1 and not warning[0].fatal
    result = _edge_check("--policies", tmp_path)
    assert result.returncode == 1
    assert "claimed by" in result.stdout


def test_domain_claimed_twice_on_reload_first_holder_keeps_it(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "fabrikam.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    _partner(
        tmp_path,
        "a-copy",
        {"root.pem": root.cert_pem(), "policy.toml": 'domains = ["fabrikam.example"]\n'},
    )
    second = resolve_domain_conflicts(load_policies(tmp_path, previous=first), first)
    assert set(second.partners) == {"fabrikam.example"}
    assert second.broken == {"a-copy"}
    (problem,) = second.problems_of("a-copy")
    assert str(tmp_path / "fabrikam.example") in problem.message


def test_shared_root_with_distinct_domains_is_legitimate(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "one.example", {"root.pem": root.cert_pem()})
    _partner(tmp_path, "two.example", {"root.pem": root.cert_pem()})
    snapshot = resolve_domain_conflicts(load_policies(tmp_path))
    assert snapshot.problems == () and set(snapshot.partners) == {"one.example", "two.example"}


def test_disabled_partner_claims_nothing(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "fabrikam.example", {"root.pem": root.cert_pem()})
    _partner(
        tmp_path,
        "a-old",
        {
            "root.pem": root.cert_pem(),
            "policy.toml": 'domains = ["fabrikam.example"]\nenabled = false\n',
        },
    )
    snapshot = resolve_domain_conflicts(load_policies(tmp_path))
    assert snapshot.problems == () and not snapshot.broken


def test_resolve_domain_conflicts_is_pure_and_idempotent(tmp_path: Path, root: CA) -> None:
    _partner(tmp_path, "b.example", {"root.pem": root.cert_pem()})
    _partner(
        tmp_path,
        "a",
        {"root.pem": root.cert_pem(), "policy.toml": 'domains = ["b.example"]\n'},
    )
    resolved = resolve_domain_conflicts(load_policies(tmp_path))
    assert resolved.broken == {"b.example"}  # "a" < "b.example"
    assert resolve_domain_conflicts(resolved) == resolved
    # Against a previous snapshot where b.example held the domain, b.example wins.
    _partner(tmp_path / "prev", "b.example", {"root.pem": root.cert_pem()})
    previous = load_policies(tmp_path / "prev")
    raw = PolicySnapshot(
        folder=tmp_path,
        partners={**resolved.partners, "b.example": previous.partners["b.example"]},
        problems=(),
        broken=frozenset(),
    )
    after = resolve_domain_conflicts(raw, previous)
    assert set(after.partners) == {"b.example"} and after.broken == {"a"}
    assert raw.broken == frozenset()  # the input is untouched


# ----------------------------------------------------------------------
# 4. Keys, BOMs, not-yet-valid roots, world-writable folders


def test_private_key_files_are_named_and_never_loaded(tmp_path: Path, root: CA) -> None:
    leaf = root.issue(dns=["x.keyed.example"])
    folder = _partner(
        tmp_path,
        "keyed.example",
        {
            "root.pem": root.cert_pem(),
            "edge.key": leaf.key_pem(),
            "notes.txt": leaf.key_pem(),
            "only-key.pem": leaf.key_pem(),
        },
    )
    snapshot = load_policies(tmp_path)
    messages = _messages(snapshot, "keyed.example")
    for name in ("edge.key", "notes.txt", "only-key.pem"):
        assert any(m.startswith(f"{folder / name}: ") and KEY_PROBLEM in m for m in messages), (
            name,
            messages,
        )
    assert all("PRIVATE KEY" not in m and "unknown file type" not in m for m in messages)
    assert snapshot.broken == {"keyed.example"}


def test_pem_and_toml_with_utf8_bom_load(tmp_path: Path, root: CA) -> None:
    bom = b"\xef\xbb\xbf"
    _partner(
        tmp_path,
        "bom.example",
        {"root.pem": bom + root.cert_pem(), "policy.toml": bom + b"max_connections = 3\n"},
    )
    snapshot = load_policies(tmp_path)
    assert snapshot.problems == (), [str(p) for p in snapshot.problems]
    policy = snapshot.partners["bom.example"]
    assert policy.roots == (root.cert,) and policy.max_connections == 3


def test_not_yet_valid_root_is_a_warning(tmp_path: Path) -> None:
    future = CA.root(
        "Future Root", not_before=NOW + dt.timedelta(days=3), not_after=NOW + dt.timedelta(days=900)
    )
    folder = _partner(tmp_path, "future.example", {"root.pem": future.cert_pem()})
    snapshot = load_policies(tmp_path)
    (problem,) = snapshot.problems_of("future.example")
    assert not problem.fatal and "future.example" in snapshot.partners
    assert str(problem).startswith(f"{folder / 'root.pem'}: certificate CN=Future Root")
    assert "not valid before" in problem.message and "not_yet_valid" in problem.message
    result = _edge_check("--policies", tmp_path)
    assert result.returncode == 1 and "not valid before" in result.stdout


def test_world_writable_folders_are_reported(tmp_path: Path, root: CA) -> None:
    policies = tmp_path / "policies"
    folder = _partner(policies, "open.example", {"root.pem": root.cert_pem()})
    _partner(policies, "closed.example", {"root.pem": root.cert_pem()})
    os.chmod(policies, 0o777)
    os.chmod(folder, 0o1777)
    snapshot = load_policies(policies)
    (top,) = snapshot.problems_of("")
    assert not top.fatal and str(top).startswith(f"{policies}: world-writable")
    (mine,) = snapshot.problems_of("open.example")
    assert not mine.fatal and str(mine).startswith(f"{folder}: world-writable")
    assert snapshot.problems_of("closed.example") == ()
    assert set(snapshot.partners) == {"open.example", "closed.example"}


# ----------------------------------------------------------------------
# 5. The fail-closed rule on reload


def test_enabled_as_a_string_withdraws_the_partner(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "f.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    (folder / "policy.toml").write_text('enabled = "false"\n')
    second = load_policies(tmp_path, previous=first)
    assert "f.example" not in second.partners and second.broken == {"f.example"}
    assert any("enabled: must be true or false" in m for m in _messages(second, "f.example"))


def test_unparsable_policy_toml_withdraws_the_partner(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "f.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    (folder / "policy.toml").write_text('domains = ["f.example"\n')
    second = load_policies(tmp_path, previous=first)
    assert "f.example" not in second.partners and second.broken == {"f.example"}


def test_emptied_folder_removes_the_partner(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "f.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    (folder / "root.pem").unlink()
    second = load_policies(tmp_path, previous=first)
    assert "f.example" not in second.partners
    assert any("no trusted root certificate" in m for m in _messages(second, "f.example"))


def test_unreadable_crl_withdraws_the_partner(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "f.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    (folder / "f.crl").write_bytes(b"-----BEGIN X509 CRL-----\nhalf")
    second = load_policies(tmp_path, previous=first)
    assert "f.example" not in second.partners and second.broken == {"f.example"}


def test_half_copied_new_root_adds_nothing_and_keeps_the_rest(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "f.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    new_root = CA.root("New Root").cert_pem()
    (folder / "new-root.pem").write_bytes(new_root[: len(new_root) // 2])
    (folder / "policy.toml").write_text("max_connections = 5\n")
    second = load_policies(tmp_path, previous=first)
    assert second.broken == {"f.example"}  # reported: the file must be fixed
    policy = second.partners["f.example"]  # still trusted, through its readable root
    assert policy.roots == (root.cert,)
    assert policy.max_connections == 5  # the readable settings apply
    # The same half-copied file at first load: a new partner is all or nothing.
    assert "f.example" not in load_policies(tmp_path).partners


def test_half_copied_root_with_a_disable_applies_the_disable(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "f.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    (folder / "new-root.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")
    (folder / "policy.toml").write_text("enabled = false\n")
    second = load_policies(tmp_path, previous=first)
    assert second.partners["f.example"].enabled is False


def test_only_root_overwritten_in_place_withdraws(tmp_path: Path, root: CA) -> None:
    folder = _partner(tmp_path, "f.example", {"root.pem": root.cert_pem()})
    first = load_policies(tmp_path)
    (folder / "root.pem").write_bytes(root.cert_pem()[:100])
    second = load_policies(tmp_path, previous=first)
    assert "f.example" not in second.partners and second.broken == {"f.example"}


# ----------------------------------------------------------------------
# 6. The watcher


def test_watcher_hashes_an_unchanged_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real_digest = edge.watch._digest

    def counting(fd: int, size: int) -> str:
        hashed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_digest(fd, size)

    monkeypatch.setattr(edge.watch, "_digest", counting)
    folder = tmp_path / "policies" / "p.example"
    folder.mkdir(parents=True)
    big = folder / "big.crl"
    big.write_bytes(os.urandom(4 * 1024 * 1024))
    (folder / "root.pem").write_bytes(b"x")
    prints = [fingerprint([tmp_path / "policies"]) for _ in range(3)]
    assert prints[0] == prints[1] == prints[2]
    assert hashed.count(str(big)) == 1
    # Same size, new mtime: hashed again, and the content change is seen.
    with big.open("r+b") as f:
        f.write(b"changed!")
    st = big.stat()
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert fingerprint([tmp_path / "policies"]) != prints[0]
    assert hashed.count(str(big)) == 2


def test_watcher_sees_a_fifo_without_blocking(tmp_path: Path) -> None:
    folder = tmp_path / "policies" / "p.example"
    folder.mkdir(parents=True)
    (folder / "root.pem").write_bytes(b"x")
    before = fingerprint([tmp_path / "policies"])
    os.mkfifo(folder / "pipe.pem")
    with _unblock_fifo(folder / "pipe.pem"):
        after = fingerprint([tmp_path / "policies"])
    assert after != before  # its arrival triggers the reload that reports it
    (entry,) = [e for e in after if e[0].endswith("pipe.pem")]
    assert entry[3] == "not-a-regular-file"


def test_watcher_does_not_walk_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.pem").write_bytes(b"x")
    policies = tmp_path / "policies"
    policies.mkdir()
    os.symlink(outside, policies / "linked.example")
    entries = fingerprint([policies])
    assert [e[3] for e in entries] == ["outside-the-folder"]
    assert all(stat.S_ISLNK(os.lstat(e[0]).st_mode) for e in entries)


# ----------------------------------------------------------------------
# 7. Through a running `edge run`: a FIFO no longer freezes reload or shutdown


async def test_running_edge_survives_a_fifo_and_withdraws_on_a_bad_enabled(
    tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, pki, ("fe1.corp.test",))
            config = write_federation(
                tmp_path,
                pki,
                [(h, p) for h, p, _ in pool],
                extra="[policies]\npoll_interval_s = 0.2\n",
                policies={"fabrikam.com": 'domains = ["fabrikam.com"]\n'},
            )
            edge = await start_edge(nursery, config)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            live, port = await partner_stream(edge, pki, leaf)
            assert await echo_roundtrip(live, b"before") == b"before"
            folder = tmp_path / "federation_policies" / "fabrikam.com"
            os.mkfifo(folder / "pipe.pem")
            problem = await edge.wait_for(
                lambda e: e["event"] == "partner_problem" and e["file"].endswith("pipe.pem")
            )
            assert "not a regular file (a FIFO)" in problem["problem"]
            # The FIFO adds nothing and takes nothing: fabrikam is still relayed.
            assert await echo_roundtrip(live, b"after fifo") == b"after fifo"
            # A later edit is still seen (reloads are not frozen), and a policy that
            # cannot be read withdraws the partner, live connection included.
            (folder / "policy.toml").write_text('enabled = "false"\n')
            closed = await edge.event_for_port(port, "connection_closed", timeout=10)
            assert closed["end"] == "trust_withdrawn"
            await live.aclose()
            assert await stop_edge(edge) == 0  # SIGTERM still exits
            nursery.cancel_scope.cancel()
