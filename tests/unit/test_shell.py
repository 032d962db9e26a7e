"""The command shell stays light, and the documentation the code cites is in the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from demuon import __version__
from demuon.app import cli
from demuon.config import ALGORITHM_NAMES
from demuon.node import algorithms

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "matplotlib")


def imported_packages(*argv: str) -> set[str]:
    """Top-level packages imported by ``python -m demuon ARGV`` (from ``-X importtime``)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "demuon", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "demuon" in names  # the measurement saw the package itself
    return names


@pytest.mark.parametrize(
    "argv", [("--help",), ("--version",), ("keys", "--help"), ("launch", "--help"), ("watch", "--help")]
)
def test_help_version_and_keys_never_import_torch_or_matplotlib(argv: tuple[str, ...]) -> None:
    assert [name for name in HEAVY if name in imported_packages(*argv)] == []


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"demuon {__version__}"


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["launch", "--help"])
    assert "(default: 10)" in capsys.readouterr().out


def test_the_parser_the_config_and_the_registry_name_the_same_algorithms() -> None:
    assert set(cli.ALGORITHMS) == set(ALGORITHM_NAMES) == set(algorithms.NAMES)


def test_an_unknown_algorithm_is_refused_by_the_registry_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown algorithm 'adam'.*demuon"):
        algorithms.get("adam")


SECTION_REF = re.compile(r"(?:([\w./-]+\.md)\s+)?§\s*(\d+(?:\.\d+)?)")


def headings(doc: Path) -> set[str]:
    """Section numbers of a markdown file's ``## 2. Title`` / ``### 2.1 Title`` headings."""
    found = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{2,4}\s+(\d+(?:\.\d+)?)\.?\s", line)
        if m:
            found.add(m.group(1))
    return found


def section_references() -> list[tuple[str, int, str | None, str]]:
    refs = []
    for folder in ("demuon", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "SECTION_REF" in line:
                    continue
                doc = None  # a bare section mark takes the file named before it on the same line
                for m in SECTION_REF.finditer(line):
                    doc = m.group(1) or doc
                    refs.append((str(path.relative_to(ROOT)), n, doc, m.group(2)))
    return refs


def test_every_section_reference_in_the_code_names_a_file_and_section_of_the_repository() -> None:
    refs = section_references()
    assert refs, "the scan found no references at all"
    bad = []
    for where, line, doc, section in refs:
        if doc is None or not (ROOT / doc).is_file() or section not in headings(ROOT / doc):
            bad.append(f"{where}:{line}: {doc or '(no file)'} §{section}")
    assert bad == []
