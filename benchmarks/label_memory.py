"""Peak memory of `kd-ray label` at two corpus sizes: it must not grow with the corpus.

    python benchmarks/label_memory.py --tokenizer data/models/all-MiniLM-L6-v2 \
        --sizes 100000 1000000 --out benchmarks/results/label-memory.json

Synthetic short posts (8-30 words) in Parquet files of --file-rows rows, labeled by a tiny
random BERT (2 layers, hidden 64, MiniLM-L6's tokenizer) so that the run is about data
movement, not compute. Each size runs `kd-ray label` in a fresh process with its own local
Ray; a sampler reads every --interval seconds the resident memory (RSS) of the driver and of
each Ray worker process (teacher actors, read and write tasks) and of Ray's own daemons.
RSS counts pages of Ray's shared-memory object store that a process has touched, so worker
figures include the blocks they were reading at that moment.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

# a script's own folder (benchmarks/) is on sys.path when it runs
from label_scale import tiny_teacher

WORDS = ("the flight was late again and my bag is lost great crew thanks for the upgrade worst service ever "
         "seat food delayed gate agent helpful rude customer phone hold hours cancelled refund miles boarding "
         "love this airline never again on time smooth landing").split()


def write_corpus(folder: Path, rows: int, file_rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    for f, start in enumerate(range(0, rows, file_rows)):
        n = min(file_rows, rows - start)
        sizes = rng.integers(8, 31, n)
        flat = words[rng.integers(0, len(words), int(sizes.sum()))]
        ends = np.cumsum(sizes)
        texts = [" ".join(flat[e - k:e]) for e, k in zip(ends, sizes)]
        pq.write_table(pa.table({"id": [f"p{start + i}" for i in range(n)], "text": texts}),
                       folder / f"posts-{f:04d}.parquet")


def role(proc: psutil.Process) -> str | None:
    """What a process of this run is, from its title (Ray sets ray::<task or actor>)."""
    try:
        name = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if "TeacherLabeler" in name or "MapWorker" in name:
        return "teacher_actor"
    if name.startswith("ray::"):
        return "other_worker" if "IDLE" not in name else "idle_worker"
    if any(d in name for d in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env")):
        return "ray_daemons"
    return None


def sample(driver: psutil.Process, stop: threading.Event, interval: float, peaks: dict) -> None:
    while not stop.is_set():
        try:
            procs = [driver, *driver.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        daemons = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            what = "driver" if p.pid == driver.pid else role(p)
            if what == "ray_daemons":
                daemons += rss
            elif what:
                peaks[what] = max(peaks.get(what, 0), rss)
        peaks["ray_daemons_total"] = max(peaks.get("ray_daemons_total", 0), daemons)
        stop.wait(interval)


def run(size: int, args, work: Path, teacher: Path) -> dict:
    corpus = work / f"corpus-{size}"
    if not corpus.exists():
        write_corpus(corpus, size, args.file_rows)
    out = work / f"labels-{size}"
    config = {"corpus": {"path": str(corpus), "id_column": "id"},
              "teachers": [{"model": str(teacher), "name": "teacher", "task": "sentiment", "max_length": 64}],
              "compute": {"batch_size": 256, "block_rows": args.block_rows},
              "output": {"path": str(out), "overwrite": True, "rows_per_file": args.rows_per_file},
              "ray": {"num_cpus": args.cores}}
    (work / "label.json").write_text(json.dumps(config))
    log = open(work / f"label-{size}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "kd-ray"), "label", "--config", str(work / "label.json")],
                            stdout=log, stderr=subprocess.STDOUT)
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(psutil.Process(proc.pid), stop, args.interval, peaks))
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    if code:
        raise SystemExit(f"kd-ray label failed for {size} rows; see {work / f'label-{size}.log'}")
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"rows": manifest["rows"], "files": len(manifest["files"]), "wall_s": time.perf_counter() - start,
            "rows_per_s": manifest["rows_per_s"], "peak_rss_mb": {k: v / 2**20 for k, v in sorted(peaks.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--file-rows", type=int, default=100_000)
    parser.add_argument("--block-rows", type=int, default=2048)
    parser.add_argument("--rows-per-file", type=int, default=100_000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-memory"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    teacher = tiny_teacher(work / "tiny-teacher", args.tokenizer, hidden=64, layers=2)
    results = [run(size, args, work, teacher) for size in args.sizes]
    keys = sorted({k for r in results for k in r["peak_rss_mb"]})
    print(f"{'rows':>10}{'rows/s':>9}" + "".join(f"{k:>20}" for k in keys) + "   (peak RSS, MiB)")
    for r in results:
        print(f"{r['rows']:>10}{r['rows_per_s']:>9.0f}" + "".join(f"{r['peak_rss_mb'].get(k, 0):>20.0f}" for k in keys))
    report = {"machine": f"{platform.machine()}, {args.cores} cores", "date": time.strftime("%Y-%m-%d"),
              "results": results, "command": " ".join(sys.argv)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
