"""The package as a user installs it: a wheel built from this checkout, installed into a fresh
virtual environment, runs its own demo from a folder outside the checkout (the experiment files
travel as package data).

To stay fast the fresh environment borrows the already-installed dependencies (torch, pyzmq, ...)
of the project's own environment through a ``.pth`` line; ``demuon`` itself comes only from the
wheel (the test checks where it was imported from).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

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
