"""Where `kd-ray label`'s wall time goes: one run of kd-ray's labeling on a local Ray instance, with
Ray's own task timeline (``ray.timeline``) cut into phases.

    python benchmarks/label_throughput.py ... --rows 25000     # writes the corpus and teacher below
    python benchmarks/label_timeline.py --corpus runs/bench-label/corpus-tweets-25000.parquet \
        --teacher runs/bench-label/teacher --out benchmarks/results/label-cpu-timeline.json

Phases, in seconds from the start of ``ray.init``: Ray's start; the driver's checks before the
dataset starts (the teacher's config and weight digest, the output folder); each teacher actor's
``__init__`` (start, seconds: torch, transformers, the model); each actor's blocks (start, seconds);
and the end. The fixed cost (``fixed_s``) is the end less the mean of the actors' labeling seconds;
the tail (``tail_s``) is the time between the first and the last actor's last block.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def phases(events: list[dict], origin_us: float) -> dict:
    """The teacher actors' ``__init__`` and block spans from Ray's timeline, by worker, in seconds
    from ``origin_us``."""
    actors = defaultdict(lambda: {"init": None, "blocks": []})
    first_task = None
    for e in events:
        if e.get("ph") != "X":
            continue
        start, seconds = (e["ts"] - origin_us) / 1e6, e["dur"] / 1e6
        if e["cat"] == "submit_task":
            first_task = start if first_task is None else min(first_task, start)
        if "TeacherLabeler" not in e["cat"]:
            continue
        if e["name"] == "__init__":
            actors[e["tid"]]["init"] = [round(start, 2), round(seconds, 2)]
        elif e["name"] == "submit":
            actors[e["tid"]]["blocks"].append([round(start, 2), round(seconds, 2)])
    for a in actors.values():
        a["blocks"].sort()
        a["last_end"] = round(max(s + d for s, d in a["blocks"]), 2) if a["blocks"] else None
        a["busy_s"] = round(sum(d for _, d in a["blocks"]), 2)
    return {"dataset_first_task_s": round(first_task, 2) if first_task is not None else None,
            "actors": list(actors.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="Parquet with id, text (label_throughput's)")
    parser.add_argument("--teacher", type=Path, required=True, help="a sequence-classifier folder")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import ray

    from kd_ray.config import LabelConfig, load_config
    from kd_ray.stages.label import run_label

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(LabelConfig, overrides={
            "corpus": {"path": str(args.corpus), "id_column": "id"},
            "teachers": [{"model": str(args.teacher), "name": "teacher", "task": "sentiment", "max_length": 128}],
            "output": {"path": f"{tmp}/out"}, "ray": {"num_cpus": args.cores}})
        start = time.time()
        ray.init(num_cpus=args.cores, include_dashboard=False)
        ray_started = time.time() - start
        summary = run_label(cfg)
        end = time.time() - start
        trace = f"{tmp}/timeline.json"
        ray.timeline(trace)
        events = json.loads(Path(trace).read_text())
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "rows": summary.rows,
              "ray_init_s": round(ray_started, 2), "end_s": round(end, 2),
              **phases(events, start * 1e6)}
    actors = result["actors"]
    ends = [a["last_end"] for a in actors if a["last_end"] is not None]
    result["tail_s"] = round(max(ends) - min(ends), 2) if ends else None
    result["fixed_s"] = round(end - sum(a["busy_s"] for a in actors) / max(1, len(actors)), 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
