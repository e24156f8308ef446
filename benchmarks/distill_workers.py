"""Distillation with 1 and 2 Ray Train workers on the same soft labels: quality and samples/s.

    python benchmarks/distill_workers.py --config jobs/configs/distill-demo.yaml \
        --test data/vader/test.csv --seeds 0 1 --out benchmarks/results/distill_workers.json

Runs `kd-ray distill` for each (workers, seed), alternating worker counts, then scores every
student on the test set with `kd_ray.stages.evaluate`. Data parallelism should not change quality
beyond seed noise; the table shows both.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kd_ray.config import DistillConfig, EvalArgs, EvalSetConfig, load_config
from kd_ray.stages.evaluate import SINGLE_TASK, evaluate_models, metrics_report
from kd_ray.stages.train import read_run_info, run_distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="A distill config (its soft labels must exist).")
    parser.add_argument("--test", required=True, help="Labeled test CSV/Parquet.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, help="Override the config's epochs.")
    parser.add_argument("--work-dir", default="runs/bench-distill-workers")
    parser.add_argument("--out", default="benchmarks/results/distill_workers.json")
    args = parser.parse_args()

    base = load_config(DistillConfig, args.config)
    runs = []
    for seed in args.seeds:
        for workers in args.workers:
            # same total batch per step: each of n workers takes batch/n
            train = base.train.model_copy(update={
                "num_workers": workers, "seed": seed, "epochs": args.epochs or base.train.epochs, "batch_size": base.train.batch_size // workers,
                "threads_per_worker": max(1, (base.train.threads_per_worker or 2) // workers),
                "num_cpus_per_worker": (base.train.num_cpus_per_worker or 1.5) / workers})
            out = Path(args.work_dir) / f"w{workers}-s{seed}"
            cfg = base.model_copy(update={"train": train, "output": str(out)})
            run_distill(cfg)
            history = read_run_info(str(out))["history"]
            runs.append({"workers": workers, "seed": seed, "output": str(out),
                         "samples_per_s": statistics.median(h["samples_per_s"] * workers for h in history)})
    test = EvalSetConfig(path=args.test, normalize=base.validation.normalize if base.validation else False)
    teacher = read_run_info(runs[0]["output"])["plan"]["tasks"][0]["teacher_model"]
    students = {Path(r["output"]).name: r["output"] for r in runs}
    report = metrics_report(evaluate_models({SINGLE_TASK: teacher}, students, test,
                                            EvalArgs(max_length=base.train.max_length, timing_rows=10,
                                                     timing_repeats=1)))
    for r in runs:
        m = report[Path(r["output"]).name]
        r.update(macro_recall=m["macro_recall"], accuracy=m["accuracy"], macro_f1=m["macro_f1"],
                 agreement=m["agreement"])
    print(f"{'workers':>8}{'seed':>6}{'macro_recall':>14}{'macro_f1':>10}{'accuracy':>10}{'samples/s':>11}")
    for r in runs:
        print(f"{r['workers']:>8}{r['seed']:>6}{r['macro_recall']:>14.4f}{r['macro_f1']:>10.4f}"
              f"{r['accuracy']:>10.4f}{r['samples_per_s']:>11.1f}")
    for w in args.workers:
        recalls = [r["macro_recall"] for r in runs if r["workers"] == w]
        print(f"workers={w}: macro_recall median {statistics.median(recalls):.4f} "
              f"(min {min(recalls):.4f}, max {max(recalls):.4f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "teacher_macro_recall": report["teacher"]["macro_recall"]},
                                         indent=2))


if __name__ == "__main__":
    main()
