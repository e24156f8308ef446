"""The README's demo table, rendered from benchmarks/results/demo.json (a `make demo` run's metrics).

    python benchmarks/demo_table.py            # print the table; paste it under README "Results"

tests/test_readme.py checks that the README holds exactly this table, so a rerun of the demo
that changes a figure also changes the README, or the test fails.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "demo.json"
ROWS = {"teacher": "teacher (MiniLM-L6, fine-tuned)", "student": "student, 2 layers, distilled",
        "student_alpha0": "same student, alpha = 0"}


def render(results: dict) -> str:
    run = results["runs"][results["readme"]]
    teacher = run["teacher"]
    lines = ["| model | macro-recall | accuracy | parameters | CPU rows/s |", "|---|---|---|---|---|"]
    for name, label in ROWS.items():
        m = run[name]
        kept = f" ({m['macro_recall'] / teacher['macro_recall']:.1%})" if name != "teacher" else ""
        speed = f" ({m['rows_per_s'] / teacher['rows_per_s']:.2f}x)" if name == "student" else ""
        lines.append(f"| {label} | {m['macro_recall']:.3f}{kept} | {m['accuracy']:.3f} | {m['params'] / 1e6:.1f} M | "
                     f"{m['rows_per_s']:.0f}{speed} |")
    stages = sum(run["timings_s"].values())
    lines.append(f"\n{run['test']['rows']} test posts; stages {int(stages // 60)} min {stages % 60:.0f} s "
                 f"({', '.join(f'{k} {v:.0f} s' for k, v in run['timings_s'].items())}), measured {results['date']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(json.loads(RESULTS.read_text())))
