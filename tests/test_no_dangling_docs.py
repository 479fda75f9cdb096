"""No file in the repository refers to a document that is not in it.

Every relative Markdown link (inline `[text](target)` or reference
`[label]: target`, outside code blocks) must name a file or folder of the
checkout, and every anchor into a Markdown file must name one of its headings.
No file may point at the old design document that lived outside the
repository, or at the team's folder beside it (the words are in _FORBIDDEN):
users do not have them, and the contract is docs/ now.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from edge.docs import repo_root

ROOT = repo_root()
THIS = Path(__file__).resolve()

# Built from pieces so this file does not match itself.
_FORBIDDEN = ("DES" + "IGN.md", "sha" + "red folder", "../sha" + "red")

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_INLINE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", re.I)


def _files() -> list[Path]:
    """Tracked and new (not ignored) files of the checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if ".git" not in p.parts]
    return sorted(ROOT / n for n in names if (ROOT / n).is_file())


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:4096]:
        return None  # binary
    return data.decode("utf-8", "replace")


def _links(markdown: str) -> list[str]:
    body = _FENCE.sub("", markdown)
    body = re.sub(r"`[^`\n]*`", "", body)  # inline code is not a link
    return _INLINE.findall(body) + _REFERENCE.findall(body)


def test_every_relative_markdown_link_exists() -> None:
    broken = []
    checked = 0
    for path in _files():
        if path.suffix.lower() != ".md":
            continue
        text = _text(path)
        if text is None:
            continue
        for target in _links(text):
            if _EXTERNAL.match(target):
                continue
            checked += 1
            rel = target.split("#", 1)[0]
            if rel and not (path.parent / rel).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert checked >= 20  # the docs link to each other
    assert broken == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", _FENCE.sub("", markdown), re.M)}


def test_every_anchor_into_a_markdown_file_exists() -> None:
    broken = []
    checked = 0
    for path in _files():
        if path.suffix.lower() != ".md":
            continue
        for target in _links(_text(path) or ""):
            if _EXTERNAL.match(target) and not target.startswith("#"):
                continue
            rel, _, fragment = target.partition("#")
            dest = (path.parent / rel) if rel else path
            if not fragment or dest.suffix.lower() != ".md" or not dest.is_file():
                continue
            checked += 1
            if fragment not in _anchors(_text(dest) or ""):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert checked >= 10
    assert broken == []


def test_slugs_follow_github() -> None:
    assert _slug("Rotate the edge's certificates") == "rotate-the-edges-certificates"
    assert _slug("Several cores: `edge run --workers N`") == "several-cores-edge-run---workers-n"
    assert _slug("One file instead of a folder: `ID.toml`") == "one-file-instead-of-a-folder-idtoml"


def test_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    text = "see [a](missing.md) and [b](#anchor) and [c](https://x.example)\n\n[d]: gone.md\n"
    text += "```\n[not](a-link.md)\n```\n"
    assert _links(text) == ["missing.md", "#anchor", "https://x.example", "gone.md"]


def _mentions(path: Path) -> list[str]:
    text = _text(path) or ""
    return [word for word in _FORBIDDEN if word in text]


def test_no_file_mentions_an_outside_document() -> None:
    offenders = {
        str(p.relative_to(ROOT)): _mentions(p)
        for p in _files()
        if p.resolve() != THIS and _mentions(p)
    }
    assert offenders == {}


def test_the_mention_check_sees_each_forbidden_word(tmp_path: Path) -> None:
    for word in _FORBIDDEN:
        path = tmp_path / "note.md"
        path.write_text(f"see {word} for the rest\n")
        assert _mentions(path) == [word]
    (tmp_path / "clean.md").write_text("see docs/partners.md\n")
    assert _mentions(tmp_path / "clean.md") == []
