"""The copy-paste examples of docs/integrations/ run as written: every fenced python block that follows a
``<!-- tested example -->`` comment is executed (in a temporary working folder), so the pages cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations"
PAGES = ("monai.md", "torchmetrics.md", "lightning.md")
MARKER = "<!-- tested example -->"
_BLOCK = re.compile(re.escape(MARKER) + r"\s*\n```python\n(.*?)\n```", re.S)


def examples(page: str) -> list[str]:
    """The marked python blocks of ``page``; a marker not followed by a python block is an error."""
    text = (DOCS / page).read_text()
    blocks = _BLOCK.findall(text)
    assert len(blocks) == text.count(MARKER), f"{page}: a {MARKER} is not followed by a ```python block"
    return blocks


def test_the_extractor_finds_marked_blocks_only():
    text = f"x\n{MARKER}\n```python\nprint(1)\n```\n\n```python\nprint(2)\n```\n"
    assert _BLOCK.findall(text) == ["print(1)"]


CASES = [(page, i) for page in PAGES for i in range(len(examples(page)))]


def test_every_page_has_an_example():
    assert {page for page, _ in CASES} == set(PAGES)


@pytest.mark.parametrize(("page", "index"), CASES, ids=[f"{p}-{i}" for p, i in CASES])
def test_example_runs(page, index, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    code = compile(examples(page)[index], f"{DOCS / page}[example {index}]", "exec")
    exec(code, {"__name__": "__main__"})
