"""The README's and docs' relative links lead somewhere: each named file exists, and each #anchor is a heading of the
file it points into (as GitHub makes anchors), so that a reader who follows one does not land on nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "weights" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)")  # [text](target) or [text](target "title")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lowercase, punctuation dropped but for - and _, spaces to -, a repeated
    one numbered."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [link for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)]


def test_the_links_are_found():  # a pattern that stopped matching would pass every page below
    links = relative_links(ROOT / "README.md")
    assert len(links) > 10 and any("#" in link for link in links) and "docs/errors.md" in links
    assert LINK.findall('[a](docs/x.md "a title") [b](y.md#z)') == ["docs/x.md", "y.md#z"]


def test_anchors_follow_githubs_rules():
    page = "# Token trees (speculative_gpt2/trees.py)\n## Fast again: decoding\n## Fast again: decoding\n"
    assert anchors(page) == {"token-trees-speculative_gpt2treespy", "fast-again-decoding", "fast-again-decoding-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_a_heading(page):
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
