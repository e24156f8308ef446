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


def read_multitask_eval_set(test: EvalSetConfig, tasks: dict[str, list[str]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every row's text and, per task, its gold index (-100 where the row has none). The first task's
    gold is in test.label_column, the others' in test.task_label_columns."""
    from kd_ray.corpus import task_label_column

    first, *others = tasks
    missing = [t for t in others if t not in test.task_label_columns]
    if missing:
        raise KdRayUserError(f"test.task_label_columns needs the gold column of tasks {missing}")
    corpus = test.as_corpus()
    to_index = {task: {n: i for i, n in enumerate(labels)} for task, labels in tasks.items()}
    columns = {first: "label", **{t: task_label_column(t) for t in others}}
    texts, gold = [], {t: [] for t in tasks}
    for shard in list_shards(corpus):
        for table in read_shard(shard, corpus, to_index[first], {t: to_index[t] for t in others}):
            texts += table.column("text").to_pylist()
            for task, column in columns.items():
                gold[task] += [-100 if g is None else g for g in table.column(column).to_pylist()]
    return texts, {t: np.array(g) for t, g in gold.items()}


def evaluate_multitask(teachers: dict[str, str], students: dict[str, str], test: EvalSetConfig,
                       args: EvalArgs) -> dict:
    """Per task, each task's teacher against each multi-task student, on the rows with that task's gold;
    and rows/s of all the teachers run one after another against one student pass."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_ray.multitask import MultiTaskClassifier
    from kd_ray.students import count_parameters
    from kd_ray.teacher import describe_model
    from kd_ray.train import predict_logits

    torch.set_num_threads(args.threads)
    tasks, loaded = {}, {}
    for task, path in teachers.items():
        info = describe_model(path, what=f"teacher of task {task!r}", hash_weights=False)
        tasks[task] = [info["id2label"][str(i)] for i in range(len(info["id2label"]))]
        loaded[task] = (AutoModelForSequenceClassification.from_pretrained(path).eval(),
                        AutoTokenizer.from_pretrained(path))
    multi = {name: MultiTaskClassifier.from_pretrained(path, max_length=args.max_length)
             for name, path in students.items()}
    for name, student in multi.items():
        if student.tasks != tasks:
            raise KdRayUserError(f"{name} {students[name]} has tasks {student.tasks}, but the teachers are for {tasks}")
    texts, gold = read_multitask_eval_set(test, tasks)
    predict = lambda model, tok, rows: predict_logits(model, tok, rows, max_length=args.max_length,  # noqa: E731
                                                      batch_size=args.batch_size, device="cpu")
    teacher_logits = {task: predict(*loaded[task], texts) for task in tasks}
    student_logits = {name: s.logits(texts, args.batch_size) for name, s in multi.items()}
    report: dict = {"tasks": {}, "test": {"path": test.path, "rows": len(texts)}, "eval": args.model_dump()}
    for task, labels in tasks.items():
        rows = gold[task] >= 0
        entry = {"rows": int(rows.sum()), "labels": labels,
                 "teacher": {**classification_metrics(teacher_logits[task][rows], gold[task][rows], labels),
                             "params": count_parameters(loaded[task][0])}}
        for name, student in multi.items():
            spec = next(t for t in student.layout if t.name == task)
            logits = student_logits[name][:, spec.start:spec.stop][rows]
            m = classification_metrics(logits, gold[task][rows], labels)
            m["agreement"] = agreement(logits, teacher_logits[task][rows])
            m["retention"] = {k: m[k] / entry["teacher"][k] if entry["teacher"][k] else None
                              for k in ("macro_recall", "macro_f1", "accuracy")}
            entry[name] = m
        report["tasks"][task] = entry
    timing_texts = (texts * (args.timing_rows // len(texts) + 1))[: args.timing_rows]
    runs = {"teachers": lambda: [predict(*loaded[t], timing_texts) for t in tasks],
            **{name: (lambda s=s: s.logits(timing_texts, args.batch_size)) for name, s in multi.items()}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.timing_repeats):  # alternate, so that machine noise hits all of them alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    report["rows_per_s"] = {name: len(timing_texts) / statistics.median(t) for name, t in times.items()}
    report["params"] = {"teachers": sum(count_parameters(m) for m, _ in loaded.values()),
                        **{name: count_parameters(s.model) for name, s in multi.items()}}
    report["speedup"] = {name: report["rows_per_s"][name] / report["rows_per_s"]["teachers"] for name in multi}
    return report


def multitask_table(report: dict) -> str:
    head = f"{'task':<12}{'model':<16}{'rows':>6}{'macro_recall':>13}{'macro_f1':>10}{'accuracy':>10}{'agree':>7}{'kept':>8}"
    lines = [head]
    for task, entry in report["tasks"].items():
        for name, m in entry.items():
            if not isinstance(m, dict) or "macro_recall" not in m:
                continue
            kept = f"{m['retention']['macro_recall']:.1%}" if "retention" in m else ""
            lines.append(f"{task:<12}{name:<16}{entry['rows']:>6}{m['macro_recall']:>13.4f}{m['macro_f1']:>10.4f}"
                         f"{m['accuracy']:>10.4f}{m.get('agreement', 1.0):>7.3f}{kept:>8}")
    for name, value in report["rows_per_s"].items():
        speed = f" ({report['speedup'][name]:.2f}x the teachers)" if name in report["speedup"] else ""
        lines.append(f"rows/s {name}: {value:.1f}{speed}, {report['params'][name]:,} parameters")
    return "\n".join(lines)


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
