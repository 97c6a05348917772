"""Every ```python block of README.md runs as written, and every ```bash command runs as written from a fresh clone
after the set-up (the fast tier checks them; ``-m full`` runs them).

Blocks run section by section (a ``##``/``###`` heading starts a section; blocks of one section share a namespace, as
a reader pasting them in order would). The section "Drop it into your transformer" is run by
tests/test_docs_integrations.py, which also knows which third-party libraries each subsection needs.
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.helpers import check_shell_command

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
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


# ------------------------------------------------------------------------------------------------ shell commands
# Every command of the README's ```bash blocks, as a newcomer runs them from a fresh clone after the set-up. The fast
# tier checks that each one parses and names things that exist (programs, scripts, modules, configs, CLI arguments);
# the comprehensive tier (-m full) runs them, in order, in a copy of the checkout.
SETUP = "bash scripts/bootstrap.sh"
# commands that cannot run here, and why; checked in the fast tier all the same
NEEDS = {
    "download.pytorch.org": "PyTorch's wheel index (CI and this project's machines reach PyPI only)",
    "benchmarks/gpu_": "a CUDA GPU",
}
THE_SUITE = "the test suite itself (CI runs it directly)"


def without_comment(line: str) -> str:
    """``line`` up to its shell comment (a ``#`` outside quotes that starts a word), runs of blanks made one: the
    command itself, without the prose beside it."""
    quote, prev = None, " "
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and prev.isspace():
            line = line[:i]
            break
        prev = c
    return " ".join(line.split()) if "'" not in line and '"' not in line else line.strip()


def shell_commands() -> list[str]:
    """The commands of README.md's ```bash blocks in order, without their comments: continuation lines joined, blank
    and comment lines left out, a leading ``bash scripts/bootstrap.sh && `` (the set-up) taken off."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            cmd = without_comment(line)
            if cmd:
                out.append(cmd.removeprefix(SETUP + " && "))
    return out


COMMANDS = shell_commands()
IDS = [c[:80] for c in COMMANDS]


def why_not_here(cmd: str):
    """Why ``cmd`` is not run by the walk (None: it is)."""
    for needle, what in NEEDS.items():
        if needle in cmd and not (what == NEEDS["benchmarks/gpu_"] and torch_cuda()):
            return f"needs {what}"
    words = shlex.split(cmd, comments=True)
    if words[:3] == [".venv/bin/python", "-m", "pytest"] and "benchmarks/" not in words:
        return THE_SUITE
    return None


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_without_comment_keeps_commands_and_quoted_hashes():
    assert without_comment(".venv/bin/zorro demo --out d   # the main job: ~3-4 min") == ".venv/bin/zorro demo --out d"
    assert without_comment("echo 'a # b'  # prose") == "echo 'a # b'"
    assert without_comment("a#b  c") == "a#b c"
    assert without_comment("# only prose") == ""


def test_readme_shell_commands_are_found():
    assert len(COMMANDS) >= 15
    # the README's two commands, whatever prose stands beside them
    assert ".venv/bin/zorro demo --out zorro_demo" in COMMANDS
    assert ".venv/bin/python -m pytest" in COMMANDS
    assert not [c for c in COMMANDS if "#" in c], "a comment left in a command"
    assert not [c for c in COMMANDS if re.match(r"(python3?|zorro|torchrun|pip) ", c)], "use the venv's programs"


@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_readme_shell_command_is_well_formed(cmd, monkeypatch):
    """Parses as bash; every program, script, module and config it names exists; zorro commands parse as the CLI
    parses them, and their configs load with their settings."""
    check_shell_command(cmd, monkeypatch)


@pytest.mark.full
@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_readme_shell_command_runs(cmd, fresh_clone):
    """The command as written, in the README's order, in the fresh copy (the editable install's code is the copy's:
    PYTHONPATH points there, as the bootstrap's editable install would)."""
    reason = why_not_here(cmd)
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(fresh_clone)
    # generous: on a shared 2-core machine at load 10 the demo took 13 min and the benchmark suite over 25
    out = subprocess.run(["bash", "-c", cmd], cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, f"{cmd}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"


def test_readme_alibi_example_is_alibi():
    """The README's ALiBi key bias gives ALiBi's attention: -slope * (i - j), the nearest keys penalised least (the
    snippet had the sign reversed: -slope * j penalised the nearest keys most)."""
    import torch

    from zorro_kernels import ZorroMask, reference_attention, zorro_attention

    text = README.read_text(encoding="utf-8")
    line = re.search(r"^alibi = .*$", text, flags=re.M)
    assert line, "README.md has no 'alibi = ...' line"
    alibi = eval(line.group(0).split("=", 1)[1], {"torch": torch})
    mask = ZorroMask.from_segments([("text", 96)], {"text": "*"}, causal=True, window=(15, -1))
    q, k, v = (torch.randn(2, 4, 96, 32, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    i, j = torch.arange(96.0)[:, None], torch.arange(96.0)[None, :]
    want = reference_attention(q, k, v, mask, bias=-slopes[:, None, None] * (i - j).double())
    got = zorro_attention(q, k, v, mask, bias=alibi.double())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
