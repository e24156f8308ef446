"""`kd-ray evaluate`: what the student kept of the teacher, and how much faster and smaller it is.

Runs in one process: the test set is small, and timing every model on the same cores,
batch size and max length, alternating between them, is what makes the speed-up fair.
One path for one task or several: each task's teacher is scored against the student(s) on the
test rows with that task's gold label; a single-task report is the one task's entry, flattened.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from kd_ray.config import EvalArgs, EvalSetConfig, EvaluateConfig, TeacherConfig
from kd_ray.console import say
from kd_ray.data.corpus import list_shards, read_shard, task_label_column
from kd_ray.errors import KdRayUserError
from kd_ray.models.losses import NO_GOLD
from kd_ray.models.metrics import agreement, classification_metrics
from kd_ray.models.multitask import MultiTaskClassifier
from kd_ray.models.students import count_parameters
from kd_ray.models.teacher import describe_model, make_teacher

SINGLE_TASK = "task"  # the one task of `kd-ray evaluate` (its name appears nowhere in the report)


def read_eval_set(test: EvalSetConfig, tasks: dict[str, list[str]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The texts of the rows with a gold label for some task and, per task, each row's gold index (NO_GOLD
    where it has none). The first task's gold is in test.label_column, the others' in test.task_label_columns."""
    first, *others = tasks
    missing = [t for t in others if t not in test.task_label_columns]
    if missing:
        raise KdRayUserError(f"test.task_label_columns needs the gold column of tasks {missing}")
    to_index = {task: {n: i for i, n in enumerate(labels)} for task, labels in tasks.items()}
    columns = {first: "label", **{t: task_label_column(t) for t in others}}
    texts, gold = [], {t: [] for t in tasks}
    for shard in list_shards(test):
        for table in read_shard(shard, test, to_index[first], {t: to_index[t] for t in others} or None):
            texts += table.column("text").to_pylist()
            for task, column in columns.items():
                gold[task] += [NO_GOLD if g is None else g for g in table.column(column).to_pylist()]
    gold_arrays = {t: np.array(g, dtype=np.int64) for t, g in gold.items()}
    keep = np.flatnonzero(np.any([g >= 0 for g in gold_arrays.values()], axis=0))
    if not len(keep):
        raise KdRayUserError(f"test set {test.path} has no rows with a gold label in column {test.label_column!r}")
    return [texts[i] for i in keep], {t: g[keep] for t, g in gold_arrays.items()}


def folder_size_mb(model: str) -> float | None:
    """Size of a model's weights: a folder's safetensors, or an exported .onnx file; None for a hub id."""
    path = Path(model)
    files = list(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    return sum(p.stat().st_size for p in files) / 1e6 if files else None


def _load(path: str | TeacherConfig, what: str, task: str | None, args: EvalArgs):
    """A model of ``task`` (a multi-task folder: of its tasks), checked first so that errors name ``what``;
    a teacher given as a TeacherConfig is scored as it labels (kd_ray.models.teacher)."""
    if isinstance(path, TeacherConfig):
        teacher = make_teacher(path.model_copy(update={"task": task or path.task, "max_length": args.max_length}))
        return teacher.classifier(task, args.batch_size)
    if not path.endswith(".onnx"):  # an exported file (kd-ray export) has no PyTorch weights to check
        describe_model(path, what=what, hash_weights=False)
    return MultiTaskClassifier.from_pretrained(path, task=task, max_length=args.max_length)


def evaluate_models(teachers: dict[str, str | TeacherConfig], students: dict[str, str], test: EvalSetConfig,
                    args: EvalArgs) -> dict:
    """Per task, its teacher against every student on the test rows with that task's gold label; and the
    rows/s of the teachers (run one after another) against each student's, timed alternately."""
    import torch

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    single = next(iter(teachers)) if len(teachers) == 1 else None
    refs = {task: _load(path, "teacher" if single else f"teacher of task {task!r}", task, args)
            for task, path in teachers.items()}
    models = {name: _load(path, name, single, args) for name, path in students.items()}
    tasks = {task: ref.layout[0].labels for task, ref in refs.items()}
    for name, model in models.items():
        for task, labels in tasks.items():
            if model.task(task).labels != labels:
                raise KdRayUserError(f"{name} {model.path} predicts {list(model.task(task).labels)} for task "
                                     f"{task!r}, but its teacher predicts {list(labels)}")
    texts, gold = read_eval_set(test, {task: list(labels) for task, labels in tasks.items()})
    teacher_logits = {task: ref.logits(texts, args.batch_size) for task, ref in refs.items()}
    student_logits = {name: model.logits(texts, args.batch_size) for name, model in models.items()}
    report: dict = {"tasks": {}, "test": {"path": test.path, "rows": len(texts)}, "eval": {**args.model_dump(), "threads": threads}}
    for task, labels in tasks.items():
        rows = gold[task] >= 0
        entry = {"rows": int(rows.sum()), "labels": list(labels),
                 "teacher": classification_metrics(teacher_logits[task][rows], gold[task][rows], list(labels))}
        for name, model in models.items():
            logits = model.task(task).of(student_logits[name])[rows]
            m = classification_metrics(logits, gold[task][rows], list(labels))
            m["agreement"] = agreement(logits, teacher_logits[task][rows])
            m["retention"] = {k: m[k] / entry["teacher"][k] if entry["teacher"][k] else None
                              for k in ("macro_recall", "macro_f1", "accuracy")}
            entry[name] = m
        report["tasks"][task] = entry
    report.update(_speed(refs, models, texts, args))
    return report


def _speed(refs: dict, models: dict, texts: list[str], args: EvalArgs) -> dict:
    """rows/s, parameters and size of the teachers together and of each student; speed-up and compression."""
    timing_texts = (texts * (args.timing_rows // len(texts) + 1))[: args.timing_rows]
    runs = {"teachers": lambda: [ref.logits(timing_texts, args.batch_size) for ref in refs.values()],
            **{name: (lambda m=m: m.logits(timing_texts, args.batch_size)) for name, m in models.items()}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.timing_repeats):  # alternate, so that machine noise hits all of them alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rows_per_s = {name: len(timing_texts) / statistics.median(t) for name, t in times.items()}
    params = {"teachers": sum(count_parameters(r.model) for r in refs.values()),
              **{name: count_parameters(s.model) for name, s in models.items()}}
    sizes = [folder_size_mb(r.path) for r in refs.values()]
    size_mb = {"teachers": None if None in sizes else sum(sizes),
               **{name: folder_size_mb(s.path) for name, s in models.items()}}
    return {"rows_per_s": rows_per_s, "params": params, "size_mb": size_mb,
            "speedup": {name: rows_per_s[name] / rows_per_s["teachers"] for name in models},
            "compression": {name: params["teachers"] / params[name] for name in models}}


def metrics_report(report: dict) -> dict:
    """What metrics.json holds: the report as it is for several tasks; for one task, `kd-ray evaluate`'s
    layout, one entry per model (metrics, params, size_mb, rows_per_s, speedup, compression)."""
    if len(report["tasks"]) > 1:
        return report
    (entry,) = report["tasks"].values()
    out = {"labels": entry["labels"], "test": report["test"], "eval": report["eval"]}
    for name in [n for n in entry if isinstance(entry[n], dict)]:
        key = "teachers" if name == "teacher" else name
        out[name] = {**entry[name], **{k: report[k][key] for k in ("params", "size_mb", "rows_per_s")}}
        if name != "teacher":
            out[name].update(speedup=report["speedup"][name], compression=report["compression"][name])
    if "student" in out:  # kd-ray evaluate's and run's student, also at the top
        out["retention"], out["speedup"] = out["student"]["retention"], out["student"]["speedup"]
    return out


SUMMARY_HEADER = ["task", "model", "rows", "macro_recall", "macro_f1", "accuracy", "agree", "kept"]


def summary_rows(report: dict) -> list[list]:
    """Per task and model: test rows, quality, agreement with the teacher, share of its macro-recall kept."""
    return [[task if len(report["tasks"]) > 1 else "", name, entry["rows"], m["macro_recall"], m["macro_f1"],
             m["accuracy"], m.get("agreement", 1.0), f"{m['retention']['macro_recall']:.1%}" if "retention" in m else ""]
            for task, entry in report["tasks"].items() for name, m in entry.items() if isinstance(m, dict)]


def summary_table(report: dict) -> str:
    """``summary_rows`` as text, then each model's rows/s."""
    lines = ["{:<12}{:<16}{:>6}{:>13}{:>10}{:>10}{:>7}{:>8}".format(*SUMMARY_HEADER)]
    lines += ["{:<12}{:<16}{:>6}{:>13.4f}{:>10.4f}{:>10.4f}{:>7.3f}{:>8}".format(*row) for row in summary_rows(report)]
    whom = "the teacher" if len(report["tasks"]) == 1 else "the teachers"
    for name, value in report["rows_per_s"].items():
        speed = f" ({report['speedup'][name]:.2f}x {whom})" if name in report["speedup"] else ""
        lines.append(f"rows/s {name}: {value:.1f}{speed}, {report['params'][name]:,} parameters")
    return "\n".join(lines)


def headline(report: dict) -> str:
    """One line: what the student kept, and how much faster it runs."""
    tasks = report["tasks"]
    kept = ", ".join(f"{task + ' ' if len(tasks) > 1 else ''}{entry['student']['retention']['macro_recall']:.1%}"
                     for task, entry in tasks.items())
    whose = "the teacher's" if len(tasks) == 1 else "its teachers'"
    than = "its CPU rows/s" if len(tasks) == 1 else f"the CPU rows/s of the {len(tasks)} teachers run one after another"
    return f"student keeps {kept} of {whose} macro-recall at {report['speedup']['student']:.2f}x {than}"


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate, write metrics.json (see ``metrics_report``) and return the whole report."""
    report = evaluate_models({SINGLE_TASK: cfg.teacher}, {"student": cfg.student, **cfg.others},
                             cfg.test, cfg.eval)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics_report(report), indent=2))
    return report


def main(cfg: EvaluateConfig) -> dict:
    report = run_evaluate(cfg)
    say(summary_table(report))
    say(f"kd-ray evaluate: {headline(report)} -> {Path(cfg.output) / 'metrics.json'}")
    return report


ENTRY_POINTS = {"evaluate": main}
