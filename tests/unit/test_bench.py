"""The benchmark modules import and `python -m bench --list` names every figure (no timing here)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from bench.__main__ import FIGURES

REPO = Path(__file__).resolve().parents[2]
NEW_FIGURES = ("audit_resnet20", "audit_tabular", "service_overhead", "scale_out")


def test_every_figure_module_imports_and_has_main() -> None:
    for module in FIGURES.values():
        assert callable(importlib.import_module(module).main), module


def test_list_names_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--list"], cwd=REPO, capture_output=True, text=True, check=True
    )
    listed = done.stdout.split()
    assert listed == list(FIGURES)
    assert set(NEW_FIGURES) <= set(listed)


def test_unknown_figure_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "no_such_figure"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown figure" in done.stderr
