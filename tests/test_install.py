"""Installing: one version, the `zorro` command's requirements in the base install, and "bring your own torch" kept
by our extras (no extra pins torch; the README's constraint install leaves an installed torch alone)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import zorro_kernels
import zorro_models

ROOT = Path(__file__).resolve().parents[1]
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def _setup_kwargs() -> dict:
    """The literal keyword arguments of setup.py's ``setup(...)`` call (setup.py is not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            out[kw.arg] = ast.unparse(kw.value)
    return out


def test_one_version():
    text = (ROOT / "zorro_kernels" / "_version.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', text, re.M) == [zorro_kernels.__version__]
    assert zorro_models.__version__ == zorro_kernels.__version__
    assert _setup_kwargs()["version"] == "VERSION"  # read from _version.py, not written a second time
    written = [
        p for p in ("setup.py", "zorro_kernels/__init__.py") if zorro_kernels.__version__ in (ROOT / p).read_text()
    ]
    assert written == [], f"the version is written again in {written}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {zorro_kernels.__version__}" in changelog


def test_the_cli_needs_only_the_base_install():
    names = {Requirement(r).name.lower() for r in _setup_kwargs()["install_requires"]}
    assert "pyyaml" in names  # the `zorro` command reads its configs with it


def test_extras_never_pin_torch():
    """A pin (==, <, ~=) on torch in an extra would let pip swap the user's torch build; a floor is all we ask."""
    kw = _setup_kwargs()
    reqs = [("install_requires", r) for r in kw["install_requires"]]
    reqs += [(f"extras_require[{e}]", r) for e, rs in kw["extras_require"].items() for r in rs]
    for where, r in reqs:
        req = Requirement(r)
        if req.name.lower() in TORCH_FAMILY:
            assert req.url is None and all(s.operator == ">=" for s in req.specifier), f"{where}: {r}"


@pytest.mark.full
def test_integrations_install_keeps_an_installed_torch(tmp_path):
    """The README's install of the integrations extra, dry-run by pip against PyPI, into a venv whose torch is an
    older CPU build (its metadata only: pip reads what is installed from the dist-info). With the constraint pinning
    that torch, pip picks the torchvision made for it and installs no torch; without it, timm -> torchvision's newest
    release would pull torch's newest build (the bug this guards). Needs PyPI (a few minutes)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dist = Path(purelib) / "torch-2.13.0+cpu.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(py)]
    freeze = subprocess.run([*pip, "freeze"], check=True, capture_output=True, text=True).stdout
    pins = [line for line in freeze.splitlines() if re.match(r"^torch==", line)]  # the README's grep
    assert pins == ["torch==2.13.0+cpu"]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            *pip,
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(constraints),
            f"{ROOT}[integrations]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if run.returncode != 0 and re.search(r"(?i)network|connection|resolve host|timed out", run.stderr):
        pytest.skip(f"PyPI unreachable: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-2000:]
    install = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert "torch" not in install, f"pip would replace the installed torch 2.13.0+cpu with {install['torch']}"
    assert install.get("torchvision", "").startswith("0.28."), install.get("torchvision")
    assert not any(n.startswith("nvidia-") for n in install)
