"""Several teachers in one labeling pass against one `kd-ray label` run per teacher.

    python benchmarks/multitask_labeling.py --corpus data/airline/labeled.csv data/airline/transfer.csv \
        --teacher sentiment=runs/multitask-airline/teachers/sentiment \
        --teacher reason=runs/multitask-airline/teachers/reason \
        --repeats 3 --out benchmarks/results/multitask-labeling.json

Each variant is a whole `kd-ray label` command (its own process, its own local Ray, reading the
CSVs, writing and checking the Parquet), timed from outside, A/B alternating over --repeats,
medians reported:
  one pass   one run with every teacher: the corpus is read once, each block goes through every
             teacher in the same actor, one Parquet with a logits column per teacher
  separate   one run per teacher, one after another (what K single-task pipelines do)

    python benchmarks/multitask_labeling.py labeler --texts <CSVs> --model <teacher folder> \
        --teachers 2 --rows 50000 --out benchmarks/results/multitask-labeling-h100.json

times the labeling actor's core alone (no Ray; for a GPU machine): one TeacherLabeler with
both teachers against one per teacher, over the same blocks in one process. Teachers fine-tuned
from one base share its tokenizer, so the one-pass labeler tokenizes each block once.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

KD_RAY = str(Path(sys.executable).parent / "kd-ray")


def label_command(corpus: list[str], teachers: dict[str, str], out: Path, work: Path, max_length: int) -> list[str]:
    config = {"corpus": {"path": corpus, "id_column": "id"},
              "teachers": [{"model": path, "name": name, "task": name, "max_length": max_length}
                           for name, path in teachers.items()],
              "compute": {"batch_size": 64, "block_rows": 1024},
              "output": {"path": str(out)}}
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [KD_RAY, "label", "--config", str(path)]


def timed(commands: list[list[str]]) -> float:
    start = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def labeler_main(argv: list[str]) -> None:
    """`labeler`: the labeling actor's core (kd_ray.models.teacher.TeacherLabeler, no Ray), one labeler with K
    teachers against K labelers with one each, over the same blocks in one process (for a GPU machine
    without Ray)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from kd_ray.config import TeacherConfig
    from kd_ray.models.teacher import TeacherLabeler

    parser = argparse.ArgumentParser(prog="multitask_labeling.py labeler")
    parser.add_argument("--texts", nargs="+", required=True, help="CSV files with a text column")
    parser.add_argument("--model", required=True, help="teacher folder; every teacher is a copy of it")
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--block-rows", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-gpus", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    texts = [t for f in args.texts for t in pd.read_csv(f, keep_default_na=False)["text"]]
    texts = (texts * (args.rows // len(texts) + 1))[: args.rows]
    blocks = [pa.table({"id": [str(i) for i in range(start, start + len(chunk))], "text": chunk,
                        "label": pa.nulls(len(chunk), pa.int32()), "reject_reason": pa.nulls(len(chunk), pa.string())})
              for start in range(0, len(texts), args.block_rows) for chunk in [texts[start:start + args.block_rows]]]
    teachers = [TeacherConfig(model=args.model, name=f"teacher{i}", max_length=64) for i in range(args.teachers)]
    options = {"batch_size": args.batch_size, "num_gpus": args.num_gpus, "threads": args.threads}
    variants = {"one pass": [TeacherLabeler(teachers, **options)],
                "separate": [TeacherLabeler([t], **options) for t in teachers]}
    for labelers in variants.values():  # warm-up: kernels, allocator
        for labeler in labelers:
            labeler(blocks[0])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant, labelers in variants.items():
            start = time.perf_counter()
            for labeler in labelers:
                for block in blocks:
                    labeler(block)
            times[variant].append(time.perf_counter() - start)
    medians = {v: statistics.median(t) for v, t in times.items()}
    import torch

    result = {"rows": len(texts), "teachers": args.teachers, "seconds": times, "median_s": medians,
              "rows_per_s": {v: len(texts) / s for v, s in medians.items()},
              "separate_over_one_pass": medians["separate"] / medians["one pass"],
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.num_gpus else "cpu",
              "mean_tokens": float(np.mean([len(t.split()) for t in texts])), "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("rows", "median_s", "separate_over_one_pass", "device")}, indent=2))


def main() -> None:
    if sys.argv[1:2] == ["labeler"]:
        return labeler_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", required=True)
    parser.add_argument("--teacher", action="append", required=True, help="name=model folder")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    teachers = dict(t.split("=", 1) for t in args.teacher)
    rows = sum(sum(1 for _ in open(f)) - 1 for f in args.corpus)  # CSVs with a header, one row per line
    times: dict[str, list[float]] = {"one pass": [], "separate": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for repeat in range(args.repeats):
            for variant in times:
                outs = [work / f"{variant.replace(' ', '-')}-{repeat}"]
                if variant == "one pass":
                    commands = [label_command(args.corpus, teachers, outs[0], work, args.max_length)]
                else:
                    outs = [work / f"separate-{repeat}-{name}" for name in teachers]
                    commands = [label_command(args.corpus, {name: path}, out, work, args.max_length)
                                for (name, path), out in zip(teachers.items(), outs)]
                times[variant].append(timed(commands))
                print(f"{variant} (repeat {repeat + 1}): {times[variant][-1]:.1f} s", flush=True)
                for out in outs:
                    shutil.rmtree(out)
    medians = {v: statistics.median(t) for v, t in times.items()}
    result = {"rows": rows, "teachers": teachers, "seconds": times, "median_s": medians,
              "rows_per_s": {v: rows / s for v, s in medians.items()},
              "separate_over_one_pass": medians["separate"] / medians["one pass"],
              "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("rows", "median_s", "separate_over_one_pass")}, indent=2))


if __name__ == "__main__":
    main()
