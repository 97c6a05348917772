"""The "Drop it into your transformer" snippets run as written.

The section is read from README.md when README.md has it, else from docs/integrations.md. Its ```python blocks run in
order, each ``###`` subsection in a fresh namespace (a reader follows one subsection top to bottom). A subsection whose
imports are not available here is skipped, naming the module.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Drop it into your transformer"


def _section() -> tuple[Path, list[str]]:
    """The section's lines (from its ``##`` heading to the next heading of the same or a higher level)."""
    for path in (ROOT / "README.md", ROOT / "docs" / "integrations.md"):
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        fenced, start, level = False, None, 0
        for i, line in enumerate(lines):
            if line.lstrip().startswith("```"):
                fenced = not fenced  # a "# comment" inside a code block is not a heading
            m = None if fenced else re.match(r"^(#+)\s+(.*?)\s*$", line)
            if m and start is None and m.group(2) == SECTION:
                start, level = i, len(m.group(1))
            elif m and start is not None and len(m.group(1)) <= level:
                return path, lines[start:i]
        if start is not None:
            return path, lines[start:]
    raise AssertionError(f"no section {SECTION!r} in README.md or docs/integrations.md")


def _subsections() -> list[tuple[str, list[tuple[int, str]]]]:
    """``[(title, [(line number, code), ...]), ...]``: the python blocks grouped by subsection heading."""
    path, lines = _section()
    start = next(i for i, text in enumerate(path.read_text(encoding="utf-8").splitlines()) if text == lines[0])
    groups: list[tuple[str, list]] = [(SECTION, [])]
    block, block_line = None, 0
    for offset, line in enumerate(lines[1:], 1):
        if block is None and re.match(r"^#{3,}\s", line):
            groups.append((line.lstrip("#").strip(), []))
        elif block is None and line.strip() == "```python":
            block, block_line = [], start + offset + 2
        elif block is not None and line.strip() == "```":
            groups[-1][1].append((block_line, "\n".join(block)))
            block = None
        elif block is not None:
            block.append(line)
    assert block is None, f"{path.name}: unterminated ```python block at line {block_line}"
    return [(title, blocks) for title, blocks in groups if blocks]


SUBSECTIONS = _subsections()


def test_the_section_has_snippets_for_every_integration():
    titles = [t for t, _ in SUBSECTIONS]
    for needed in ("transformers", "timm", "xformers", "Packing"):
        assert any(needed in t for t in titles), f"no subsection with snippets about {needed}: {titles}"


@pytest.mark.parametrize("title,blocks", SUBSECTIONS, ids=[t for t, _ in SUBSECTIONS])
def test_snippets_run_as_written(title, blocks, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = "\n".join(c for _, c in blocks)
    for name in sorted(set(re.findall(r"^\s*(?:from|import)\s+(\w+)", code, re.M))):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure means the library is not usable here
            pytest.skip(f"subsection {title!r} needs {name}, which does not import here: {type(e).__name__}: {e}")
    path, _ = _section()
    namespace: dict = {"__name__": f"snippet:{title}"}
    for line, block in blocks:
        # leading newlines make a traceback point at the snippet's own line in the Markdown file
        exec(compile("\n" * (line - 1) + block, str(path), "exec"), namespace)  # noqa: S102 - the docs are the test
