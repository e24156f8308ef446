"""`kd-ray run`: the whole job from one YAML, each stage skipped when its output already matches.

  data.train --finetune--> teacher/ --label (train + transfer)--> soft_labels/
  soft_labels/ --distill--> student/   (and student_alpha0/: the same student without distillation)
               (or, with a `tune:` section, --tune--> tune/, whose best student is the run's student)
  teacher/, student/ --evaluate on data.test--> metrics.json --> report.html, report/*.png

With `tasks:` (multi-task), each task's teacher is fine-tuned into teachers/<task>/ on the rows
that carry its gold label, all teachers label the corpus in one pass, one student with a head per
task learns from them all, and each task is scored on the test rows that carry its gold label.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from kd_ray.config import (CorpusConfig, DistillConfig, EvaluateConfig, FinetuneConfig, LabelConfig,
                           LabelOutputConfig, PipelineConfig, TeacherConfig, TuneConfig)
from kd_ray.evaluate import evaluate_multitask, multitask_table, run_evaluate, summary_table
from kd_ray.label import run_label
from kd_ray.report import write_report
from kd_ray.storage import absolute_if_local
from kd_ray.train import distill_job, read_run_info, run_distill, run_finetune
from kd_ray.tune import run_tune


def _timed(timings: dict[str, float], name: str, fn, *args, **kwargs):
    """Run one stage, print and record its seconds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"kd-ray run: stage {name} done in {timings[name]} s", flush=True)
    return result


def _distill_stages(stages: dict, timed) -> None:
    """The student and its alpha=0 twin, each skipped when its folder holds the same job's result."""
    for name in ("distill", "distill_alpha0"):
        if name not in stages or (name == "distill" and "tune" in stages):
            continue
        dc = stages[name]
        job, _ = distill_job(dc)
        if _up_to_date(Path(dc.output), lambda old: old == job):
            print(f"kd-ray run: {dc.output} is up to date; skipping {name}", flush=True)
        else:
            timed(name, run_distill, dc)


def _finish_report(out: Path, report: dict, timings: dict, summary) -> None:
    report["timings_s"] = timings
    report["labeling"] = {"rows": summary.rows, "rows_per_s": summary.rows_per_s, "files": summary.files,
                          "rejected": summary.rejected, "truncated": summary.truncated}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))


def _up_to_date(folder: Path, job_matches) -> bool:
    info = read_run_info(str(folder))
    return info is not None and job_matches(info["job"])


def label_corpus(cfg: PipelineConfig, **update) -> CorpusConfig:
    """What the teacher labels: data.train, then data.transfer read without gold, whatever columns it has."""
    transfer = cfg.data.transfer.path if cfg.data.transfer else None
    return cfg.data.train.model_copy(update={"unlabeled_path": transfer, **update})


def stage_configs(cfg: PipelineConfig) -> dict:
    """The per-stage configs this run is made of (each could be run alone with its own command)."""
    out = Path(cfg.output)
    teacher_path = cfg.teacher.model or str(out / "teacher")
    stages: dict = {}
    if cfg.teacher.model is None:
        stages["finetune"] = FinetuneConfig(data=cfg.data.train, base_model=cfg.teacher.base_model, labels=cfg.labels,
                                            validation=cfg.data.validation, train=cfg.teacher.train,
                                            output=teacher_path, ray=cfg.ray)
    stages["label"] = LabelConfig(
        corpus=label_corpus(cfg),
        teachers=[TeacherConfig(model=teacher_path, max_length=cfg.teacher_max_length)],
        compute=cfg.label,
        augment=cfg.augment,
        # the run folder is the pipeline's own: labels of an older teacher are replaced, not refused
        output=LabelOutputConfig(path=str(out / "soft_labels"), logits_dtype=cfg.logits_dtype, overwrite=True),
        ray=cfg.ray)
    stages["distill"] = DistillConfig(soft_labels=str(out / "soft_labels"), student=cfg.student, loss=cfg.loss,
                                      validation=cfg.data.validation, train=cfg.distill,
                                      output=str(out / "student"), ray=cfg.ray)
    student = str(out / "student")
    if cfg.tune is not None:  # the search replaces the single distillation; its first trial is that one
        stages["tune"] = TuneConfig(distill=stages["distill"], search=cfg.tune, output=str(out / "tune"), ray=cfg.ray)
        student = str(out / "tune" / "student")
    others = {}
    if cfg.baseline_without_distillation:
        stages["distill_alpha0"] = stages["distill"].model_copy(
            update={"loss": cfg.loss.model_copy(update={"alpha": 0.0}), "output": str(out / "student_alpha0")})
        others["student_alpha0"] = str(out / "student_alpha0")
    stages["evaluate"] = EvaluateConfig(test=cfg.data.test, teacher=teacher_path, student=student,
                                        others=others, eval=cfg.eval, output=str(out))
    return stages


def multitask_stage_configs(cfg: PipelineConfig) -> dict:
    """The stages of a multi-task run: a teacher per task, one labeling pass, one student with a head per task."""
    out = Path(cfg.output)
    tasks = cfg.tasks
    first, *others = tasks
    task_columns = {t: tasks[t].label_column for t in others}
    stages: dict = {"finetune": {}, "teachers": {}}
    for task, tc in tasks.items():
        path = tc.teacher.model or str(out / "teachers" / task)
        stages["teachers"][task] = path
        if tc.teacher.model is None:
            validation = (cfg.data.validation.model_copy(update={"label_column": tc.label_column, "task_label_columns": {}})
                          if cfg.data.validation else None)
            stages["finetune"][task] = FinetuneConfig(
                data=cfg.data.train.model_copy(update={"label_column": tc.label_column, "partial_labels": False}),
                base_model=tc.teacher.base_model, labels=tc.labels, validation=validation, train=tc.teacher.train,
                output=path, ray=cfg.ray)
    stages["label"] = LabelConfig(
        corpus=label_corpus(cfg, partial_labels=True, label_column=tasks[first].label_column,
                            task_label_columns=task_columns),
        teachers=[TeacherConfig(model=stages["teachers"][t], name=t, task=t, max_length=cfg.teacher_max_length)
                  for t in tasks],
        compute=cfg.label,
        augment=cfg.augment,
        output=LabelOutputConfig(path=str(out / "soft_labels"), logits_dtype=cfg.logits_dtype, overwrite=True),
        ray=cfg.ray)
    per_task = lambda s: s.model_copy(update={"label_column": tasks[first].label_column,  # noqa: E731
                                              "task_label_columns": task_columns}) if s else None
    stages["distill"] = DistillConfig(soft_labels=str(out / "soft_labels"), student=cfg.student, loss=cfg.loss,
                                      tasks={t: tc.loss for t, tc in tasks.items()},
                                      validation=per_task(cfg.data.validation), train=cfg.distill,
                                      output=str(out / "student"), ray=cfg.ray)
    students = {"student": str(out / "student")}
    if cfg.baseline_without_distillation:
        stages["distill_alpha0"] = stages["distill"].model_copy(update={
            "tasks": {t: tc.loss.model_copy(update={"alpha": 0.0}) for t, tc in tasks.items()},
            "output": str(out / "student_alpha0")})
        students["student_alpha0"] = str(out / "student_alpha0")
    stages["evaluate"] = {"teachers": stages["teachers"], "students": students, "test": per_task(cfg.data.test),
                          "args": cfg.eval}
    return stages


def run_multitask_pipeline(cfg: PipelineConfig) -> dict:
    out = Path(cfg.output)
    stages = multitask_stage_configs(cfg)
    timings: dict[str, float] = {}
    timed = functools.partial(_timed, timings)

    for task, ft in stages["finetune"].items():
        if _up_to_date(Path(ft.output), lambda job: job["base_model"] == absolute_if_local(ft.base_model)
                       and job["train"] == ft.train.model_dump(mode="json") and job["labels"] == ft.labels
                       and job.get("data", {}).get("label_column") == ft.data.label_column):
            print(f"kd-ray run: teacher {ft.output} is up to date; skipping finetune", flush=True)
        else:
            timed(f"finetune_{task}", run_finetune, ft)
    summary = timed("label", run_label, stages["label"])
    print(summary.line(), flush=True)
    _distill_stages(stages, timed)
    report = timed("evaluate", evaluate_multitask, **stages["evaluate"])
    _finish_report(out, report, timings, summary)
    return report


def run_pipeline(cfg: PipelineConfig) -> dict:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    if cfg.tasks is not None:
        return run_multitask_pipeline(cfg)
    stages = stage_configs(cfg)
    timings: dict[str, float] = {}
    timed = functools.partial(_timed, timings)

    if "finetune" in stages:
        ft = stages["finetune"]
        if _up_to_date(Path(ft.output), lambda job: job["base_model"] == absolute_if_local(ft.base_model)
                       and job["train"] == ft.train.model_dump(mode="json") and job["labels"] == ft.labels):
            print(f"kd-ray run: teacher {ft.output} is up to date; skipping finetune", flush=True)
        else:
            timed("finetune", run_finetune, ft)
    summary = timed("label", run_label, stages["label"])
    print(summary.line(), flush=True)
    if "tune" in stages:
        timed("tune", run_tune, stages["tune"])
    _distill_stages(stages, timed)
    report = timed("evaluate", run_evaluate, stages["evaluate"])
    _finish_report(out, report, timings, summary)
    report["report_html"] = str(write_report(out))
    return report


def main(cfg: PipelineConfig) -> dict:
    report = run_pipeline(cfg)
    if cfg.tasks is not None:
        print(multitask_table(report))
        kept = ", ".join(f"{task} {entry['student']['retention']['macro_recall']:.1%}"
                         for task, entry in report["tasks"].items())
        print(f"kd-ray run: the multi-task student keeps {kept} of its teachers' macro-recall and runs at "
              f"{report['speedup']['student']:.2f}x the rows/s of the {len(cfg.tasks)} teachers run one after another. "
              f"Outputs: {cfg.output} (metrics: {Path(cfg.output) / 'metrics.json'})", flush=True)
        return report
    print(summary_table(report))
    print(f"kd-ray run: student keeps {report['retention']['macro_recall']:.1%} of the teacher's macro-recall at "
          f"{report['speedup']:.2f}x its CPU rows/s. Outputs: {cfg.output} (metrics: {Path(cfg.output) / 'metrics.json'})",
          flush=True)
    print(f"kd-ray run: report: {report['report_html']} (plots as PNG in {Path(cfg.output) / 'report'})", flush=True)
    return report


CONFIGS = {"run": PipelineConfig}
ENTRY_POINTS = {"run": main}
