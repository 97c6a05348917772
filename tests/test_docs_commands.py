"""The commands of docs/*.md, as a newcomer runs them from a fresh clone after the set-up (README's set-up; see
tests/test_readme.py, whose checks these reuse).

Fast tier: every command uses the venv's programs, as the README writes them (multi-machine launches excepted: they
run on the reader's cluster), and each one parses and names things that exist. ``-m full``: the commands run, in
each page's order, in a fresh copy; the slow ones (minutes on a 2-core CPU: trainings of the tiny presets, demos, the
ablation grid, the benchmark suite) only with ``ZORRO_DOCS_SLOW=1``, and a command whose run folder an earlier,
skipped command was to make is skipped with it. Where a page states a command's printed table, the walk compares
the two.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import check_shell_command

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PROGRAMS = r"(\.venv/bin/\S+|zorro|python3?|torchrun|pytest|pip) "
#: commands that run elsewhere by design, and why
ELSEWHERE = {"--nnodes=": "a multi-machine launch (the reader's cluster and its environment)"}
#: stand-ins for the reader's own files
PLACEHOLDERS = {"run.yaml": "the reader's own configuration"}
#: commands that take minutes on a 2-core CPU (run with ZORRO_DOCS_SLOW=1)
SLOW = (
    "zorro train model.name=zorro_",
    "zorro train --config configs/demo.yaml",
    "zorro demo",
    "zorro ablate",
    "zorro bench",
    "zorro eval runs/",
    "-m zorro_models.train model.name=zorro_",
    "benchmarks/ --benchmark-only --benchmark-json",
    "benchmarks/ --benchmark-only   #",
)
#: files a command reads that an earlier (possibly skipped) command of its page writes
MADE_EARLIER = ("results.json", "gpu.json")
#: records of a past measurement, not instructions (their folders are the measurer's)
RECORDS = ("/tmp/ablate_lead/",)


def doc_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for each command line of a page's ```bash (or unlabelled) blocks, continuation lines
    joined, in page order."""
    out = []
    for page in DOCS:
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            if lang not in ("bash", "sh", ""):
                continue
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip()
                if re.match(PROGRAMS, line):
                    out.append((page.name, line))
    return out


COMMANDS = doc_commands()
IDS = [f"{p}:{c.split('  #')[0].strip()[:70]}" for p, c in COMMANDS]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _elsewhere(cmd: str):
    return next((why for needle, why in ELSEWHERE.items() if needle in cmd), None)


def test_docs_commands_are_found():
    pages = {p for p, _ in COMMANDS}
    assert {"models.md", "training.md", "ablate.md", "benchmarks.md"} <= pages, pages


def test_docs_commands_use_the_venv():
    bare = [f"{p}: {c}" for p, c in COMMANDS if not c.startswith(".venv/bin/") and not _elsewhere(c)]
    assert not bare, "write commands as the README does (.venv/bin/...):\n" + "\n".join(bare)


def test_each_torchrun_launch_has_its_own_run_folder():
    outs = [re.search(r"train\.out=(\S+)", c) for _, c in COMMANDS if "torchrun" in c]
    assert all(outs), "a torchrun example without train.out= writes into the default runs/zorro"
    folders = [m.group(1) for m in outs]
    assert len(set(folders)) == len(folders), folders


@pytest.mark.parametrize("page,cmd", COMMANDS, ids=IDS)
def test_docs_command_is_well_formed(page, cmd, monkeypatch):
    if _elsewhere(cmd) or any(p in cmd for p in PLACEHOLDERS) or not cmd.startswith(".venv/bin/"):
        pytest.skip(_elsewhere(cmd) or "names the reader's own files")
    if cmd.startswith(".venv/bin/pip "):
        return  # an install: nothing of ours to check
    check_shell_command(cmd, monkeypatch)


def stated_table(page: str, marker: str) -> dict:
    """The table a page shows as a command's output: ``{row: [numbers]}`` from the page's fenced block that holds
    ``marker`` (a line of that output)."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```\w*\n(.*?)```", text, flags=re.S) if marker in b)
    return printed_table(block)


def printed_table(output: str) -> dict:
    """``{row: [numbers]}`` of the lines that end in two or more cells, a cell a decimal number or a lone ``-`` (a
    column that does not apply: None)."""
    rows = {}
    for line in output.splitlines():
        m = re.match(r"(\S.*?)\s+((?:(?:\d+\.\d+|-(?=\s|$))\s*){2,})$", line)
        if m:
            rows[m.group(1).strip()] = [None if x == "-" else float(x) for x in m.group(2).split()]
    return rows


def test_the_demo_table_the_training_page_states_is_found():
    table = stated_table("training.md", "Linear-probe accuracy")
    assert set(table) >= {"untrained", "Zorro", "full attention"} and all(len(v) == 3 for v in table.values())


#: commands whose printed table a page states: (page, command prefix) -> (page, the text the table follows)
STATED = {
    ("training.md", ".venv/bin/zorro demo --out zorro_demo"): ("training.md", "Linear-probe accuracy"),
    ("models.md", ".venv/bin/zorro demo --model zorro_hip_demo"): ("models.md", "untrained            0.557"),
    ("models.md", ".venv/bin/zorro demo --model zorro_swin_demo"): ("models.md", "untrained            0.687"),
    ("models.md", ".venv/bin/zorro eval runs/swin"): ("models.md", "linear probes (accuracy)"),
    ("models.md", ".venv/bin/zorro eval runs/hip_sup"): ("models.md", "supervised heads (accuracy)"),
}
#: the rows a stated table holds: a demo's models, or zorro eval's input regimes
DEMO_ROWS, EVAL_ROWS = {"untrained", "Zorro", "full attention"}, {"audio-visual", "audio-only", "video-only"}


@pytest.mark.parametrize("command,where", list(STATED.items()), ids=[c for _, c in STATED])
def test_each_stated_table_and_its_command_are_found(command, where):
    (page, prefix), (doc, marker) = command, where
    table = stated_table(doc, marker)
    rows = EVAL_ROWS if "zorro eval" in prefix else DEMO_ROWS
    assert set(table) >= rows and len({len(v) for v in table.values()}) == 1, table
    assert any(p == page and c.startswith(prefix) for p, c in doc_commands())


@pytest.mark.full
@pytest.mark.parametrize("page,cmd", COMMANDS, ids=IDS)
def test_docs_command_runs(page, cmd, fresh_clone):
    if _elsewhere(cmd) or any(p in cmd for p in PLACEHOLDERS) or any(r in cmd for r in RECORDS):
        pytest.skip(_elsewhere(cmd) or "names the reader's own files or records a past run")
    if cmd.startswith(".venv/bin/pip "):
        pytest.skip("an install (the set-up did it)")
    slow = any(s in cmd for s in SLOW)
    if slow and os.environ.get("ZORRO_DOCS_SLOW", "") in ("", "0"):
        pytest.skip("takes minutes on a 2-core CPU: ZORRO_DOCS_SLOW=1 runs it")
    if "gpu.json" in cmd and not _cuda():
        pytest.skip("the GPU goal layouts (a CUDA GPU)")
    made = next(
        (f for f in MADE_EARLIER if f in cmd.split("--benchmark-json=")[0] and not (fresh_clone / f).exists()), None
    )
    if made:
        pytest.skip(f"{made} comes from an earlier command of {page} that did not run")
    needs = re.search(r"(?:zorro eval |train\.out=)(runs/\w+).*--resume|zorro eval (runs/\w+)", cmd)
    folder = needs and (needs.group(1) or needs.group(2))
    if folder and not (fresh_clone / folder).exists():
        pytest.skip(f"{folder} comes from an earlier command of {page} that did not run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(fresh_clone)
    out = subprocess.run(["bash", "-c", cmd], cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, f"{cmd}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
    for (p, prefix), (doc, marker) in STATED.items():
        if p == page and cmd.startswith(prefix):
            stated, printed = stated_table(doc, marker), printed_table(out.stdout)
            assert printed == {k: printed.get(k) for k in stated} and {k: printed[k] for k in stated} == stated, (
                f"{doc} states {stated}, the command printed {printed}"
            )
