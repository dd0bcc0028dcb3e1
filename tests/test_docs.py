"""The docs match the code: docs/architecture.md lists every module and every C++/CUDA source, and no other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# An entry of the rooms tree: indented by two spaces per level, then a file or folder name; descriptions and their
# continuation lines start further right, in the description column.
ENTRY = re.compile(r"^(?P<indent>(?:  )*)(?P<name>[\w.]+/?)(?:\s|$)")
DESCRIPTION_COLUMN = 20


def rooms_listing(text: str) -> set[str]:
    """The paths the fenced tree under "## 1. Rooms" names, as ``es_kernels/train/hf.py`` or ``csrc/cpu/``."""
    section = text.split("## 1. Rooms", 1)[1]
    block = section.split("```", 2)[1]
    paths: set[str] = set()
    folders: list[str] = []  # the folder at each depth
    for line in block.splitlines()[1:]:
        match = ENTRY.match(line)
        if not match or len(match["indent"]) >= DESCRIPTION_COLUMN:
            continue
        depth = len(match["indent"]) // 2
        if depth > len(folders):
            raise ValueError(f"{line!r} is indented deeper than the folder above it")
        del folders[depth:]
        path = "".join(folders) + match["name"]
        paths.add(path)
        if path.endswith("/"):
            folders.append(match["name"])
    return paths


def source_files() -> set[str]:
    """Every Python module of the package and every file under csrc/ (build outputs and caches left out)."""
    modules = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "es_kernels").rglob("*.py")
        if "__pycache__" not in path.parts and "_csrc" not in path.parts
    }
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "csrc").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    return modules | sources


def test_every_module_and_csrc_file_is_named_in_the_architecture_doc():
    named = {path for path in rooms_listing(ARCHITECTURE.read_text()) if not path.endswith("/")}
    files = source_files()
    missing = sorted(files - named)
    stale = sorted(named - files)
    assert not missing, f"docs/architecture.md §1 does not name: {missing}"
    assert not stale, f"docs/architecture.md §1 names files that do not exist: {stale}"


def test_the_listing_parser_builds_paths_from_indentation():
    text = """## 1. Rooms

```
es_kernels/
  a.py                 one
  sub/                 a folder
    b.py               two
                       continued.py (a description line, not an entry)
  c.py
csrc/
  d.cpp                three
```
"""
    assert rooms_listing(text) == {
        "es_kernels/",
        "es_kernels/a.py",
        "es_kernels/sub/",
        "es_kernels/sub/b.py",
        "es_kernels/c.py",
        "csrc/",
        "csrc/d.cpp",
    }
    with pytest.raises(ValueError, match="deeper"):
        rooms_listing("## 1. Rooms\n```\nes_kernels/\n      e.py\n```\n")


def test_no_tracker_numbers_in_docs_code_or_tests():
    # A reader has no tracker: text names the feature ("language-model sequence losses"), never its tracker number.
    pattern = re.compile(r"\bissues? #?\d+", re.IGNORECASE)
    roots = ["README.md", "docs", "es_kernels", "csrc", "tests", "benchmarks", ".ci", "setup.py", "pyproject.toml"]
    suffixes = {".md", ".py", ".cpp", ".h", ".cu", ".cuh", ".toml", ""}
    found = []
    for root in roots:
        base = ROOT / root
        candidates = [base] if base.is_file() else base.rglob("*") if base.is_dir() else []
        for path in candidates:
            if not path.is_file() or path.suffix not in suffixes or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
