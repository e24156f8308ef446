"""The README's figures come from committed result files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_demo_table_is_the_committed_demo_results():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import demo_table

    table = demo_table.render(json.loads(demo_table.RESULTS.read_text()))
    assert table in (REPO / "README.md").read_text(), "README's demo table differs from benchmarks/results/demo.json; " \
        "paste the output of `python benchmarks/demo_table.py` under README 'Results'"
