"""Every ```python block of README.md runs as written.

Blocks run section by section (a ``##``/``###`` heading starts a section; blocks of one section share a namespace, as
a reader pasting them in order would). The section "Drop it into your transformer" is run by
tests/test_docs_integrations.py, which also knows which third-party libraries each subsection needs.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
OWNED_ELSEWHERE = "Drop it into your transformer"


def sections() -> dict[str, list[str]]:
    out, title, skip = {}, None, False
    for part in re.split(r"^(#{2,3} .*)$", README.read_text(encoding="utf-8"), flags=re.M):
        if re.match(r"#{2,3} ", part):
            level, title = part.split(" ", 1)
            if level == "##":
                skip = title.strip() == OWNED_ELSEWHERE
            continue
        blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
        if blocks and title and not skip:
            out[title.strip()] = blocks
    return out


SECTIONS = sections()


def test_readme_has_python_examples():
    assert "Use it" in SECTIONS and len(SECTIONS["Use it"]) >= 2


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_readme_section_runs(title):
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(SECTIONS[title]):
        exec(compile(block, f"README.md[{title}][{i}]", "exec"), namespace)
