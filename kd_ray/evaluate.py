"""`kd-ray evaluate`: what the student kept of the teacher, and how much faster and smaller it is.

Runs in one process: the test set is small, and timing every model on the same cores,
batch size and max length, alternating between them, is what makes the speed-up fair.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from kd_ray.config import EvalArgs, EvaluateConfig, EvalSetConfig
from kd_ray.corpus import list_shards, read_shard
from kd_ray.errors import KdRayUserError
from kd_ray.metrics import agreement, classification_metrics


def read_eval_set(cfg: EvalSetConfig, labels: list[str]) -> tuple[list[str], np.ndarray]:
    corpus = cfg.as_corpus()
    to_index = {n: i for i, n in enumerate(labels)}
    texts, gold = [], []
    for shard in list_shards(corpus):
        for table in read_shard(shard, corpus, to_index):
            texts += table.column("text").to_pylist()
            gold += table.column("label").to_pylist()
    keep = [i for i, g in enumerate(gold) if g is not None]
    if not keep:
        raise KdRayUserError(f"test set {cfg.path} has no rows with a gold label in column {cfg.label_column!r}")
    return [texts[i] for i in keep], np.array([gold[i] for i in keep])


def folder_size_mb(model: str) -> float | None:
    folder = Path(model)
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def evaluate_models(models: dict[str, str], test: EvalSetConfig, args: EvalArgs) -> dict:
    """Score every model on ``test`` and time it; the first model is the reference (teacher)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_ray.students import count_parameters
    from kd_ray.teacher import describe_model
    from kd_ray.train import predict_logits

    torch.set_num_threads(args.threads)
    loaded = {}
    labels = None
    for name, path in models.items():
        info = describe_model(path, what=name, hash_weights=False)  # checks it, reads its labels
        names = [info["id2label"][str(i)] for i in range(len(info["id2label"]))]
        if labels is not None and names != labels:
            raise KdRayUserError(f"{name} {path} predicts {names}, but the teacher predicts {labels}")
        labels = names
        loaded[name] = (AutoModelForSequenceClassification.from_pretrained(path).eval(),
                        AutoTokenizer.from_pretrained(path))
    texts, gold = read_eval_set(test, labels)
    report: dict = {"labels": labels, "test": {"path": test.path, "rows": len(texts)}, "eval": args.model_dump()}
    logits = {}
    for name, (model, tok) in loaded.items():
        logits[name] = predict_logits(model, tok, texts, max_length=args.max_length, batch_size=args.batch_size,
                                      device="cpu")
        report[name] = {**classification_metrics(logits[name], gold, labels),
                        "params": count_parameters(model), "size_mb": folder_size_mb(models[name])}
    timing_texts = (texts * (args.timing_rows // len(texts) + 1))[: args.timing_rows]
    times: dict[str, list[float]] = {name: [] for name in loaded}
    for _ in range(args.timing_repeats):  # alternate models so that machine noise hits all of them alike
        for name, (model, tok) in loaded.items():
            start = time.perf_counter()
            predict_logits(model, tok, timing_texts, max_length=args.max_length, batch_size=args.batch_size,
                           device="cpu")
            times[name].append(time.perf_counter() - start)
    teacher = next(iter(loaded))
    for name in loaded:
        report[name]["rows_per_s"] = len(timing_texts) / statistics.median(times[name])
        if name != teacher:
            report[name]["agreement"] = agreement(logits[name], logits[teacher])
            report[name]["retention"] = {m: report[name][m] / report[teacher][m] if report[teacher][m] else None
                                         for m in ("macro_recall", "macro_f1", "accuracy")}
            report[name]["speedup"] = report[name]["rows_per_s"] / report[teacher]["rows_per_s"]
            report[name]["compression"] = report[teacher]["params"] / report[name]["params"]
    return report


def run_evaluate(cfg: EvaluateConfig) -> dict:
    models = {"teacher": cfg.teacher, "student": cfg.student, **cfg.others}
    report = evaluate_models(models, cfg.test, cfg.eval)
    report["retention"] = report["student"]["retention"]
    report["speedup"] = report["student"]["speedup"]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def summary_table(report: dict) -> str:
    names = [k for k, v in report.items() if isinstance(v, dict) and "params" in v]
    head = f"{'model':<16}{'macro_recall':>13}{'macro_f1':>10}{'accuracy':>10}{'agree':>8}{'params':>12}{'rows/s':>9}"
    rows = [head]
    for n in names:
        m = report[n]
        rows.append(f"{n:<16}{m['macro_recall']:>13.4f}{m['macro_f1']:>10.4f}{m['accuracy']:>10.4f}"
                    f"{m.get('agreement', 1.0):>8.3f}{m['params']:>12,}{m['rows_per_s']:>9.1f}")
    return "\n".join(rows)


def main(cfg: EvaluateConfig) -> dict:
    report = run_evaluate(cfg)
    print(summary_table(report))
    print(f"kd-ray evaluate: student keeps {report['retention']['macro_recall']:.1%} of the teacher's macro-recall "
          f"at {report['speedup']:.2f}x its rows/s -> {Path(cfg.output) / 'metrics.json'}", flush=True)
    return report


CONFIGS = {"evaluate": EvaluateConfig}
ENTRY_POINTS = {"evaluate": main}
