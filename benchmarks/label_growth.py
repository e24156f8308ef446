"""A corpus of 1,000 files gains one: the rerun's driver memory and start-up must not grow with the rows.

    python benchmarks/label_growth.py --tokenizer data/models/all-MiniLM-L6-v2 \
        --sizes 100000 1000000 --out benchmarks/results/label-growth.json

Per size: --files Parquet files of synthetic posts (label_memory.write_corpus) labeled once by a tiny random
BERT (label_scale.tiny_teacher: the run is about the driver, not the model); then one file of --new-rows rows
is added and the same `kd-ray label` command runs again in a fresh process. Measured on that rerun: seconds
from its start to the line that says what it found ("corpus grew: ..."), seconds in all, and the driver's
peak resident memory (ru_maxrss of the driver process alone; Ray's workers are other processes). Resumable:
a size whose first labeling finished is not labeled again (the added file is removed and the folder's
manifest restored before each repeat).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# a script's own folder (benchmarks/) is on sys.path when it runs
from label_memory import write_corpus
from label_scale import tiny_teacher


def label_command(corpus: Path, teacher: Path, out: Path, cores: int) -> list[str]:
    return [sys.executable, __file__, "--label", str(corpus), str(teacher), str(out), str(cores)]


def label_in_this_process(corpus: str, teacher: str, out: str, cores: str) -> None:
    """The driver of one `kd-ray label` run; prints its peak RSS last, as JSON."""
    from kd_ray.config import LabelConfig, load_config
    from kd_ray.stages.label import run_label

    cfg = load_config(LabelConfig, overrides={
        "corpus.path": corpus, "teachers.0.model": teacher, "output.path": out,
        "teachers.0.max_length": 64, "compute.block_rows": 4096, "output.rows_per_file": 100_000,
        "ray.num_cpus": int(cores)})
    summary = run_label(cfg)
    print(summary.line(), flush=True)
    print(json.dumps({"driver_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rows": summary.rows, "kept_rows": summary.kept_rows}), flush=True)


def timed_run(command: list[str]) -> dict:
    """Run ``command``; seconds to its 'corpus grew' line and in all, and its last line's JSON."""
    start, found, lines = time.perf_counter(), None, []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        lines.append(line.rstrip())
        if found is None and "corpus grew" in line:
            found = time.perf_counter() - start
    if proc.wait() != 0:
        raise RuntimeError("\n".join(lines[-40:]))
    stats = next(json.loads(line) for line in reversed(lines) if line.startswith('{"driver_max_rss_mb"'))
    return {"seconds_to_growth_line": found, "seconds": time.perf_counter() - start, **stats,
            "growth_line": next((line for line in lines if "corpus grew" in line), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--new-rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-growth"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    teacher = tiny_teacher(args.work_dir / "teacher", args.tokenizer)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    for rows in args.sizes:
        root = args.work_dir / str(rows)
        corpus, out, extra = root / "corpus", root / "labels", root / "new"
        if not (out / "_manifest.json").exists():
            shutil.rmtree(root, ignore_errors=True)
            write_corpus(corpus, rows, rows // args.files)
            write_corpus(extra, args.new_rows, args.new_rows)
            first = timed_run(label_command(corpus, teacher, out, args.cores))
            results["runs"].setdefault(str(rows), {})["first"] = first
        if not (root / "manifest-first.json").exists():  # the first labeling's: each repeat starts from it
            shutil.copy(out / "_manifest.json", root / "manifest-first.json")
        results["runs"].setdefault(str(rows), {})
        repeats = []
        for _ in range(args.repeats):
            first_files = set(json.loads((root / "manifest-first.json").read_text())["files"])
            for part in out.glob("part-*.parquet"):
                if part.name not in first_files:
                    part.unlink()  # the added file's labels, from the repeat before
            shutil.copy(root / "manifest-first.json", out / "_manifest.json")
            (extra / "posts-0000.parquet").replace(corpus / "posts-new.parquet") if (
                extra / "posts-0000.parquet").exists() else None
            repeats.append(timed_run(label_command(corpus, teacher, out, args.cores)))
            (corpus / "posts-new.parquet").replace(extra / "posts-0000.parquet")
        results["runs"][str(rows)]["rerun"] = repeats
        results.update(machine=platform.processor() or platform.machine(), files=args.files, new_rows=args.new_rows)
        args.out.write_text(json.dumps(results, indent=2))
        print(json.dumps({rows: repeats}, indent=1), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--label":
        label_in_this_process(*sys.argv[2:6])
    else:
        main()
