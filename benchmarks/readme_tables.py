"""The README's result tables, rendered from the committed results files.

    python benchmarks/readme_tables.py     # print them; paste each under README "Results" and in docs/performance.md

- the demo table from benchmarks/results/demo.json (a `make demo` run's metrics);
- the airline quality table from benchmarks/results/quality-airline-keep.json (benchmarks/quality.py);
- the airline student-recipe table from benchmarks/results/quality-airline-gradual.json (quality.py --variant).

tests/test_readme.py checks that the README holds exactly these tables (tests/test_docs.py: docs/performance.md
too), so a rerun that changes a figure also changes the README and the page, or the tests fail.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {"teacher": "teacher (MiniLM-L6, fine-tuned)", "student": "student, 2 layers, distilled",
        "student_alpha0": "same student, alpha = 0"}


def render_demo(results: dict) -> str:
    run = results["runs"][results["readme"]]
    teacher = run["teacher"]
    # quality to four decimals: a fresh clone's `make demo` gets these figures exactly; rows/s vary by machine
    lines = ["| model | macro-recall | accuracy | parameters | CPU rows/s (this machine's) |", "|---|---|---|---|---|"]
    for name, label in ROWS.items():
        m = run[name]
        kept = f" ({m['macro_recall'] / teacher['macro_recall']:.1%})" if name != "teacher" else ""
        speed = f" ({m['rows_per_s'] / teacher['rows_per_s']:.2f}x)" if name == "student" else ""
        lines.append(f"| {label} | {m['macro_recall']:.4f}{kept} | {m['accuracy']:.4f} | {m['params'] / 1e6:.1f} M | "
                     f"{m['rows_per_s']:.0f}{speed} |")
    stages = sum(run["timings_s"].values())
    lines.append(f"\n{run['test']['rows']} test posts; stages {int(stages // 60)} min {stages % 60:.0f} s "
                 f"({', '.join(f'{k} {v:.0f} s' for k, v in run['timings_s'].items())}), measured {results['date']}.")
    return "\n".join(lines)


QUALITY_ROWS = {"tfidf_lr": "TF-IDF + logistic regression", "teacher": "teacher: MiniLM-L6 fine-tuned on the labeled set",
                "student_alpha0": "half-width student, labeled set only (alpha = 0)",
                "student_kd": "half-width student distilled, default T / alpha",
                "student_tuned": "**half-width student distilled, T / alpha / lr from `kd-ray tune`**",
                "student_hard": "half-width student, teacher's argmax only"}


def render_quality(results: dict) -> str:
    """Test macro-recall, mean +- half the spread over seeds; kept and speed-up against the teacher's means."""
    table, lines = results["table"], ["| model | macro-recall | kept | CPU rows/s |", "|---|---|---|---|"]
    teacher = table["teacher"]
    for name, label in QUALITY_ROWS.items():
        recall, speed = table[name]["macro_recall"], table[name]["rows_per_s"]["mean"]
        bold = "**" if label.startswith("**") else ""
        score = f"{recall['mean']:.3f}" + (f" ± {recall['spread'] / 2:.3f}" if recall.get("values") else "")
        kept = f"{bold}{recall['mean'] / teacher['macro_recall']['mean']:.1%}{bold}".replace("%", " %") \
            if name.startswith("student") else ""
        ratio = f" ({bold}{speed / teacher['rows_per_s']['mean']:.2f}x{bold})" if name.startswith("student") else ""
        lines.append(f"| {label} | {bold}{score}{bold} | {kept} | {speed:,.0f}{ratio} |")
    return "\n".join(lines)


RECIPE_ROWS = {"teacher": "teacher: MiniLM-L6 fine-tuned on the labeled set",
               "student_kd": "half-width student: 3 layers, half their neurons, narrowed in one step",
               "f384_s3": "**default student: 3 layers, a quarter of their neurons, narrowed in 3 steps**"}


def render_variants(results: dict, labels: dict[str, str]) -> str:
    """A quality.py --variant run: test macro-recall per student, mean +- half the spread over seeds (each
    seed's value listed), kept and speed-up against the teacher's means."""
    per_seed = results["variants"]["per_seed"]
    lines = ["| model | test macro-recall (seeds " + ", ".join(per_seed) + ") | kept | CPU rows/s |",
             "|---|---|---|---|"]
    mean = {name: {m: sum(r[name]["test"][m] for r in per_seed.values()) / len(per_seed)
                   for m in ("macro_recall", "rows_per_s")} for name in labels}
    for name, label in labels.items():
        values = [r[name]["test"]["macro_recall"] for r in per_seed.values()]
        bold = "**" if label.startswith("**") else ""
        score = f"{mean[name]['macro_recall']:.4f} ± {(max(values) - min(values)) / 2:.4f} (" + \
            ", ".join(f"{v:.4f}" for v in values) + ")"
        student = name != "teacher"
        kept = f"{bold}{mean[name]['macro_recall'] / mean['teacher']['macro_recall']:.1%}{bold}".replace("%", " %")
        ratio = f" ({bold}{mean[name]['rows_per_s'] / mean['teacher']['rows_per_s']:.2f}x{bold})"
        lines.append(f"| {label} | {bold}{score}{bold} | {kept if student else ''} | "
                     f"{mean[name]['rows_per_s']:,.0f}{ratio if student else ''} |")
    return "\n".join(lines)


def tables() -> list[str]:
    return [render_demo(json.loads((RESULTS / "demo.json").read_text())),
            render_quality(json.loads((RESULTS / "quality-airline-keep.json").read_text())),
            render_variants(json.loads((RESULTS / "quality-airline-gradual.json").read_text()), RECIPE_ROWS)]


if __name__ == "__main__":
    print("\n\n".join(tables()))
