"""The README's result tables are the committed result files, rendered (benchmarks/readme_tables.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import readme_tables  # noqa: E402


@pytest.mark.parametrize("index, name", [(0, "demo"), (1, "airline quality"), (2, "airline student recipe")])
def test_the_readme_holds_each_table_as_its_results_file_says(index, name):
    assert readme_tables.tables()[index] in (REPO / "README.md").read_text(), \
        f"README's {name} table differs from its results file; paste `python benchmarks/readme_tables.py`'s output"
