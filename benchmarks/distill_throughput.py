"""Student training samples/s: `kd-ray distill` with 1 and 2 Ray Train workers against a
plain single-process Accelerate loop over the same soft labels, on the same cores.

    python benchmarks/distill_throughput.py --config jobs/configs/distill-demo.yaml --repeats 2 \
        --out benchmarks/results/distill-throughput.json

Every variant trains the same student (the config's) for one epoch with the same loss,
optimizer, learning-rate schedule, max length and rows per optimizer step (--batch-size in
total: 1 x 32 or 2 x 16), without validation, each in its own fresh process, A/B alternating
over --repeats; medians reported.
  plain            a single-process Accelerate loop: pyarrow reads the Parquet, rows shuffled,
                   tokenizer(batch, padding=True), torch.set_num_threads(cores), torch's
                   default AdamW
  plain, fused     the same with AdamW(fused=True), as kd-ray uses: what is left is Ray's
                   cost and the batching
  kd-ray 1 worker  `kd-ray distill`, 1 worker with `cores` threads
  kd-ray 2 workers `kd-ray distill`, 2 workers with cores / 2 threads each (gradients all-reduced)
  ... no grouping  the same with train.group_by_length=false: what batching rows of alike
                   lengths buys
samples/s is rows / seconds of the epoch's training loop (kd-ray: from its per-epoch history,
summed over workers; it excludes Ray start-up and checkpointing, which `wall_s` includes).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kd_ray.config import DistillConfig, load_config
from kd_ray.stages.train import read_run_info

VARIANTS = {"plain": None, "plain, fused AdamW": "fused", "kd-ray 1 worker": (1, True), "kd-ray 2 workers": (2, True),
            "kd-ray 1 worker, no grouping": (1, False), "kd-ray 2 workers, no grouping": (2, False)}


def plain_main(argv: list[str]) -> None:
    """The baseline: what one writes with Accelerate and no kd-ray."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--cores", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--fused", action="store_true")
    args = parser.parse_args(argv)
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from accelerate import Accelerator
    from transformers import get_scheduler

    from kd_ray.data.soft_labels import read_soft_label_info
    from kd_ray.models.loading import build_student
    from kd_ray.models.losses import compute_loss

    cfg = load_config(DistillConfig, args.config)
    torch.set_num_threads(args.cores)
    torch.manual_seed(cfg.train.seed)
    info = read_soft_label_info(cfg.soft_labels)
    teacher = info.teacher()
    labels = teacher.labels
    model, tokenizer = build_student(cfg.student, teacher.model, labels)
    column = teacher.column
    table = pq.read_table(info.files, columns=["text", "label", column])
    texts = table.column("text").to_pylist()
    gold = np.array([-100 if g is None else g for g in table.column("label").to_pylist()])
    logits = np.array(table.column(column).to_pylist(), dtype=np.float32)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                                  fused=args.fused or None)
    steps = -(-len(texts) // args.batch_size)
    scheduler = get_scheduler(cfg.train.schedule, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * steps),
                              num_training_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    order = np.random.default_rng(cfg.train.seed).permutation(len(texts))
    start = time.perf_counter()
    for s in range(0, len(order), args.batch_size):
        idx = order[s:s + args.batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=cfg.train.max_length, padding=True,
                        return_tensors="pt")
        student = model(**enc).logits.float()
        loss = compute_loss(cfg.loss.kind, student, torch.from_numpy(logits[idx]), torch.from_numpy(gold[idx]),
                            temperature=cfg.loss.temperature, alpha=cfg.loss.alpha)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    print(json.dumps({"samples_per_s": len(order) / seconds, "rows": len(order)}))


def run_variant(name: str, args, base: DistillConfig, work: Path, run: int) -> dict:
    start = time.perf_counter()
    if VARIANTS[name] in (None, "fused"):
        cfg = base.model_copy(update={"train": base.train.model_copy(update={"epochs": 1})})
        path = work / "plain.json"
        path.write_text(json.dumps(cfg.model_dump(mode="json")))
        done = subprocess.run([sys.executable, __file__, "plain", "--config", str(path), "--cores", str(args.cores),
                               "--batch-size", str(args.batch_size), *(["--fused"] if VARIANTS[name] else [])],
                              check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return {"samples_per_s": result["samples_per_s"], "wall_s": time.perf_counter() - start}
    workers, group = VARIANTS[name]
    out = work / f"{name.replace(' ', '-').replace(',', '')}-{run}"
    train = base.train.model_copy(update={
        "epochs": 1, "num_workers": workers, "batch_size": args.batch_size // workers,
        "threads_per_worker": max(1, args.cores // workers), "num_cpus_per_worker": 0.75 * args.cores / workers,
        "group_by_length": group})
    storage = work / "ray_train" / out.name
    for stale in (out, storage):  # a run of the same name would resume from its checkpoint instead of training
        shutil.rmtree(stale, ignore_errors=True)
    cfg = base.model_copy(update={"train": train, "output": str(out), "validation": None,
                                  "storage_path": str(storage),
                                  "ray": base.ray.model_copy(update={"num_cpus": args.cores})})
    path = work / "distill.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    with open(work / f"{out.name}.log", "w") as log:
        subprocess.run([str(Path(sys.executable).parent / "kd-ray"), "distill", "--config", str(path)], check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    history = read_run_info(str(out))["history"]
    # every worker reports its own rows/s; rank 0's history entry times the same epoch as the others
    return {"samples_per_s": history[-1]["samples_per_s"] * workers, "wall_s": time.perf_counter() - start,
            "output": str(out)}


def test_quality(runs: dict, base: DistillConfig, test: str) -> dict:
    """Test macro-recall of each kd-ray variant's last student (one epoch): grouping must not cost quality."""
    from kd_ray.config import EvalArgs, EvalSetConfig
    from kd_ray.stages.evaluate import SINGLE_TASK, evaluate_models, metrics_report

    students = {name: rs[-1]["output"] for name, rs in runs.items() if "output" in rs[-1]}
    teacher = read_run_info(next(iter(students.values())))["plan"]["tasks"][0]["teacher_model"]
    normalize = base.validation.normalize if base.validation else False
    report = metrics_report(evaluate_models({SINGLE_TASK: teacher}, students,
                                            EvalSetConfig(path=test, normalize=normalize),
                                            EvalArgs(max_length=base.train.max_length, timing_rows=10,
                                                     timing_repeats=1)))
    return {name: {k: report[name][k] for k in ("macro_recall", "macro_f1", "accuracy")}
            for name in ["teacher", *students]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        return plain_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="A distill config whose soft labels exist")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per optimizer step, over all workers")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--test", help="labeled test file: also score each kd-ray variant's student")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-distill-throughput"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    base = load_config(DistillConfig, args.config)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for r in range(args.repeats):
        for name in args.variants:
            runs[name].append(run_variant(name, args, base, work, r))
            print(f"repeat {r}: {name:<30} {runs[name][-1]['samples_per_s']:.1f} samples/s, "
                  f"wall {runs[name][-1]['wall_s']:.0f} s", flush=True)
    plain = statistics.median(r["samples_per_s"] for r in runs["plain"]) if "plain" in runs else None
    results = {}
    for name, rs in runs.items():
        median = statistics.median(r["samples_per_s"] for r in rs)
        results[name] = {"samples_per_s": [r["samples_per_s"] for r in rs], "wall_s": [r["wall_s"] for r in rs],
                         "samples_per_s_median": median, "vs_plain": median / plain if plain else None}
    print(f"{'variant':<32}{'samples/s':>10}{'vs plain':>10}{'wall s':>8}")
    for name, m in results.items():
        vs = f"{m['vs_plain']:.2f}x" if m["vs_plain"] else "-"
        print(f"{name:<32}{m['samples_per_s_median']:>10.1f}{vs:>10}{statistics.median(m['wall_s']):>8.0f}")
    quality = test_quality(runs, base, args.test) if args.test else None
    for name, m in (quality or {}).items():
        print(f"{name:<32} test macro-recall {m['macro_recall']:.4f}, accuracy {m['accuracy']:.4f} (1 epoch)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": f"{platform.machine()}, {args.cores} cores",
                                        "date": time.strftime("%Y-%m-%d"), "config": args.config,
                                        "batch_size": args.batch_size, "results": results, "test_quality": quality,
                                        "command": " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main()
