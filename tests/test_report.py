"""`kd-ray report`: tuning folders whose searched names hold dots and whose values are not numbers; run folders
of one task or several (built without Ray: metrics.json, soft labels, histories as the stages write them)."""

from __future__ import annotations

import html
import json

import pandas as pd
import pytest

from kd_ray.stages.report import write_report


def _tune_folder(folder, space: dict[str, list]) -> None:
    """trials.csv, trial_epochs.csv and tune_summary.json as `kd-ray tune` writes them, for 3 trials."""
    metric = "val_macro_recall"
    trials, epochs = [], []
    for i in range(3):
        values = {name: options[i] for name, options in space.items()}
        stopped = i == 2
        scores = [0.5 + 0.1 * i, 0.55 + 0.1 * i][: 1 if stopped else 2]
        trials.append({"trial": f"trial_0000{i}", **values, "status": "stopped early" if stopped else "completed",
                       "epochs": len(scores), metric: scores[-1],
                       **{f"{metric}_epoch{e + 1}": s for e, s in enumerate(scores)}, "starts": 1, "error": None})
        epochs += [{"trial": f"trial_0000{i}", **values, "epoch": e + 1, metric: s} for e, s in enumerate(scores)]
    folder.mkdir()
    pd.DataFrame(trials).to_csv(folder / "trials.csv", index=False)
    pd.DataFrame(epochs).to_csv(folder / "trial_epochs.csv", index=False)
    (folder / "tune_summary.json").write_text(json.dumps({
        "metric": metric, "best_trial": "trial_00001", "best_value": 0.75,
        "best_values": {name: options[1] for name, options in space.items()}, "default_trial": "trial_00000",
        "default_value": 0.55, "default_status": "completed", "trials": 3, "stopped_early": 1, "errors": 0}))


@pytest.mark.parametrize("space, landscape", [
    ({"loss.kind": ["kl", "mse", "hard"], "train.weight_decay": [0.0, 0.01, 0.1]}, True),
    ({"loss.kind": ["kl", "mse", "hard"]}, False),
])
def test_report_of_searches_over_dotted_and_non_numeric_parameters(tmp_path, space, landscape):
    _tune_folder(tmp_path / "tune", space)
    page = write_report(tmp_path / "tune").read_text()
    pngs = {p.name for p in (tmp_path / "tune" / "report").glob("*.png")}
    assert ("tuning_landscape.png" in pngs) == landscape
    assert "trial_curves.png" in pngs
    assert ("No landscape: none of the searched parameters is a number." in page) != landscape
    assert "loss.kind = mse" in page and "Best of 3 trials" in page


def test_the_landscape_is_titled_by_the_epoch_whose_score_trials_csv_holds(tmp_path):
    """trials.csv holds each trial's kept epoch's score (train.keep), not its last epoch's: the plot says so."""
    from kd_ray.stages.report import plot_landscape

    _tune_folder(tmp_path / "tune", {"temperature": [1.0, 2.0, 4.0], "alpha": [0.1, 0.5, 0.9]})
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv")
    summary = json.loads((tmp_path / "tune" / "tune_summary.json").read_text())
    title = plot_landscape(trials, summary, "temperature", "alpha").axes[0].get_title()
    assert "kept epoch" in title and "last epoch" not in title


TASKS = {"sentiment": ["negative", "neutral", "positive"], "reason": ["delay", "crew", "bag", "other"]}


def _evaluated(tasks: dict[str, list[str]], rows: int = 40) -> dict:
    """What evaluate_models returns for a teacher per task and two students, from random logits."""
    import numpy as np

    from kd_ray.models.metrics import agreement, classification_metrics

    rng = np.random.default_rng(0)
    report = {"tasks": {}, "test": {"path": "test.jsonl", "rows": rows},
              "eval": {"threads": 2, "batch_size": 8, "max_length": 64, "timing_repeats": 3},
              "rows_per_s": {"teachers": 50.0, "student": 400.0, "student_alpha0": 410.0},
              "params": {"teachers": 4_000_000, "student": 1_000_000, "student_alpha0": 1_000_000},
              "size_mb": {"teachers": 16.0, "student": 4.0, "student_alpha0": 4.0}}
    report["speedup"] = {n: report["rows_per_s"][n] / 50.0 for n in ("student", "student_alpha0")}
    report["compression"] = {n: 4.0 for n in ("student", "student_alpha0")}
    for task, labels in tasks.items():
        gold = rng.integers(len(labels), size=rows)
        teacher = rng.normal(size=(rows, len(labels)))
        entry = {"rows": rows, "labels": labels, "teacher": classification_metrics(teacher, gold, labels)}
        for name in ("student", "student_alpha0"):
            logits = teacher + rng.normal(size=teacher.shape)
            entry[name] = {**classification_metrics(logits, gold, labels), "agreement": agreement(logits, teacher)}
            entry[name]["retention"] = {k: entry[name][k] / entry["teacher"][k] for k in ("macro_recall", "macro_f1",
                                                                                          "accuracy")}
        report["tasks"][task] = entry
    return report


def _run_folder(folder, tasks: dict[str, list[str]]):
    """A finished `kd-ray run` folder without its model weights: metrics.json, soft labels (a teacher per task),
    the training histories of the teacher(s) and students. Returns the evaluation report."""
    import numpy as np
    import pyarrow as pa

    from kd_ray.data.soft_labels import logits_column, parquet_writer, soft_label_schema
    from kd_ray.stages.evaluate import metrics_report

    report = _evaluated(tasks)
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics_report(report)))
    single = len(tasks) == 1
    (first, first_labels), *others = tasks.items()
    teachers = [{"name": "teacher" if single else task, "task": task, "model": f"teachers/{task}", "max_length": 64,
                 "id2label": {str(i): n for i, n in enumerate(labels)}} for task, labels in tasks.items()]
    meta = {"schema_version": 2, "teachers": teachers, "label_task": first, "label_names": first_labels,
            "task_labels": dict(others), "logits_dtype": "float16", "config_hash": "h"}
    rng, rows = np.random.default_rng(1), 30
    columns = {"id": [str(i) for i in range(rows)], "text": ["a post"] * rows, "label": [0] * rows,
               **{f"label_{task}": [None] * rows for task, _ in others},
               **{logits_column(t["name"]): rng.normal(size=(rows, len(t["id2label"]))).astype(np.float16).tolist()
                  for t in teachers}, "truncated": [False] * rows}
    (folder / "soft_labels").mkdir()
    schema = soft_label_schema(meta)
    with parquet_writer(folder / "soft_labels" / "part-00000.parquet", schema) as writer:
        writer.write_table(pa.table(columns, schema=schema))
    (folder / "soft_labels" / "_manifest.json").write_text(json.dumps({
        "rows": rows, "rows_per_s": 100.0, "seconds": 0.3, "files": ["part-00000.parquet"], "rejected": 0,
        "truncated": 0}))
    val = {"val_macro_recall": 0.5} if single else {f"val_{task}_macro_recall": 0.5 for task in tasks}
    for model in ["student", "student_alpha0", *(["teacher"] if single else [f"teachers/{task}" for task in tasks])]:
        history = [{"epoch": e, "train_loss": 1.0 / e, **({"val_macro_recall": 0.4 + 0.1 * e} if "teacher" in model
                                                          else {k: v + 0.1 * e for k, v in val.items()})}
                   for e in (1, 2)]
        (folder / model).mkdir(parents=True)
        (folder / model / "kd_ray_train.json").write_text(json.dumps({"history": history}))
    return report


PLOTS = ["confusion", "efficiency", "quality", "soft_labels", "training"]


@pytest.mark.parametrize("tasks", [{"sentiment": TASKS["sentiment"]}, TASKS], ids=["one task", "two tasks"])
def test_a_run_of_one_task_or_several_has_the_same_report(tmp_path, tasks):
    """Every plot of a single-task run, for a multi-task run too: its panels per task (teacher, task and model)."""
    from kd_ray.stages.evaluate import headline

    report = _run_folder(tmp_path / "run", tasks)
    page = write_report(tmp_path / "run").read_text()
    assert sorted(p.stem for p in (tmp_path / "run" / "report").glob("*.png")) == PLOTS
    assert page.count("src='data:image/png;base64,") == len(PLOTS)  # the page needs no other file
    assert html.escape(headline(report)) in page and "4.00x fewer parameters" in page
    for entry in report["tasks"].values():
        for name, m in entry.items():
            if isinstance(m, dict):
                assert f"<td>{name}</td><td>{entry['rows']}</td><td>{m['macro_recall']:,.4g}</td>" in page
    for name, speed in report["rows_per_s"].items():  # metrics.json of one task calls its teacher 'teacher'
        name = "teacher" if name == "teachers" and len(tasks) == 1 else name
        assert f"<td>{name}</td><td>{speed:,.4g}</td>" in page


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_a_multitask_run_has_a_panel_per_task_in_every_plot(tmp_path):
    from kd_ray.stages.report import (
        RunFolder,
        plot_confusions,
        plot_efficiency,
        plot_quality,
        plot_soft_labels,
        plot_training,
        teacher_confidences,
    )

    _run_folder(tmp_path / "run", TASKS)
    run = RunFolder.find(tmp_path / "run")
    r = run.metrics
    models = ["teacher", "student", "student_alpha0"]
    assert [t.split(":")[0] for t in _titles(plot_quality(r))] == list(TASKS)
    assert [t.split("\n")[0] for t in _titles(plot_confusions(r))] == [f"{t}: {m}" for t in TASKS for m in models]
    assert [t.split(":")[0] for t in _titles(plot_efficiency(r))[2:]] == list(TASKS)  # calibration per task
    assert [t.split(":")[0] for t in _titles(plot_soft_labels(teacher_confidences(run.soft_labels)))] == [
        task for task in TASKS for _ in range(2)]  # a teacher per task: its confidence and its classes
    training = plot_training(run.histories, list(TASKS))
    assert _titles(training)[1:] == [f"{t}: validation macro-recall" for t in TASKS]
    # each task's panel: both students (a head per task) and that task's own teacher
    assert [[line.get_label() for line in ax.lines] for ax in training.axes[1:]] == [
        ["student", "student_alpha0", f"teacher {t}"] for t in TASKS]


def test_a_single_task_report_keeps_its_one_panel_plots(tmp_path):
    """One task: no task names in the titles, one panel of each kind, and the quality figure's panel as before."""
    from kd_ray.stages.report import (
        RunFolder,
        plot_efficiency,
        plot_quality,
        plot_training,
    )

    _run_folder(tmp_path / "run", {"sentiment": TASKS["sentiment"]})
    run = RunFolder.find(tmp_path / "run")
    assert _titles(plot_quality(run.metrics)) == [
        "Quality: teacher vs student (agreement = same prediction as the teacher)"]
    assert _titles(plot_efficiency(run.metrics)) == ["CPU rows/s (higher is better)", "parameters, millions",
                                                     "calibration error, ECE (lower is better)"]
    training = plot_training(run.histories, list(run.metrics["tasks"]))
    assert _titles(training) == ["training loss (each model's own loss)", "validation macro-recall"]
    assert [line.get_label() for line in training.axes[1].lines] == ["teacher", "student", "student_alpha0"]
