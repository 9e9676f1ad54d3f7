"""The documentation's relative links resolve: every `[text](path#anchor)` in README.md,
CONTRIBUTING.md and docs/*.md names a file that exists and, for a Markdown file, a heading
of it (GitHub's anchors), and the README links every page under docs/."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def outside_fences(text: str) -> list[str]:
    kept, fence = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            kept.append(line)
    return kept


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    return re.sub(r"`[^`]*`", "", "\n".join(outside_fences(text)))


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: the rendered text lower-cased, punctuation but `-` and `_`
    dropped, spaces as hyphens; a repeated id gets -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in outside_fences(path.read_text()):
        m = re.match(r"#{1,6} (.*)", line)
        if not m:
            continue
        text = LINK.sub(r"\1", m.group(1).replace("`", "")).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(2) for m in LINK.finditer(prose(path.read_text()))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with id '{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}: add them to its Documentation list"


def test_anchor_ids_follow_github():
    assert anchors(ROOT / "docs" / "training.md") >= {
        "training",
        "parallelism-strategies",
        "real-evaluation-a-character-level-lm-on-tiny-shakespeare-benchbench_lmpy",
    }
