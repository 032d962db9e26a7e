"""The package as a user installs it: a wheel built from this checkout, installed into a fresh
virtual environment, runs its own demo from a folder outside the checkout (the experiment files
travel as package data).

To stay fast the fresh environment borrows the already-installed dependencies (torch, pyzmq, ...)
of the project's own environment through a ``.pth`` line; ``demuon`` itself comes only from the
wheel (the test checks where it was imported from).

The declared dependency ranges hold the pins of ``constraints.txt`` (a quick check of the files).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from demuon import __version__

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("DEMUON__")}
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, (
        f"{argv}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.mark.slow  # a wheel build and a venv install (about 20 s): make test-slow
def test_an_installed_wheel_runs_its_demo_from_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        dist,
        ROOT,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("demuon-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"demuon-{__version__}.dist-info/METADATA").decode()
    assert "demuon/py.typed" in names  # the package's type hints are usable by its users
    assert f"demuon-{__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata and "Classifier: Typing :: Typed" in metadata
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        "--target",
        site,
        wheel,
        cwd=tmp_path,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import demuon, sys; print(demuon.__file__)", cwd=elsewhere).stdout.strip()
    assert Path(where).is_relative_to(site), where
    run(python, "-m", "demuon", "demo", "--simulate", "--set", "rounds=5", "--out", "out", cwd=elsewhere)
    for algorithm in ("demuon", "dsgd", "gt_nsgdm"):
        summary = json.loads((elsewhere / "out" / algorithm / "summary.json").read_text())
        assert summary["rounds"] == 5 and summary["source"] == "simulate"
        assert all(p["final_round"] == 4 for p in summary["peers"])
    assert (elsewhere / "out" / "plot.png").stat().st_size > 0


def pins() -> dict[str, str]:
    """``constraints.txt`` as {canonical name: pinned version}."""
    out: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not a name==version pin"
            out[canonicalize_name(name)] = version.strip()
    return out


def test_every_pinned_version_satisfies_the_declared_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject's {req.name}{req.specifier}"
        )
    for req in declared[: len(project["dependencies"])]:  # every runtime dependency has a floor
        assert any(s.operator in (">=", "~=", "==") for s in req.specifier), f"{req.name}: no lower bound"


def test_the_version_license_and_changelog_agree() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__ and project["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(r"^## \[Unreleased\]$", changelog, re.MULTILINE)
    assert (ROOT / "demuon" / "py.typed").is_file()
