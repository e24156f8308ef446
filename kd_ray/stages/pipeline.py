"""`kd-ray run`: the whole job from one YAML, each stage skipped when its output already matches.

  data.train --finetune--> teacher/ --label (train + transfer)--> soft_labels/
  soft_labels/ --distill--> student/   (and student_alpha0/: the same student without distillation)
               (or, with a `tune:` section, --tune--> tune/, whose best student is the run's student)
  teacher/, student/ --evaluate on data.test--> metrics.json --> report.html, report/*.png

With `tasks:` (multi-task), each task's teacher is fine-tuned into teachers/<task>/ on the rows
that carry its gold label, all teachers label the corpus in one pass, one student with a head per
task learns from them all, and each task is scored on the test rows that carry its gold label.
One run of one task is the same stages with one teacher.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

from kd_ray.config import (
    CorpusConfig,
    DistillConfig,
    EvalSetConfig,
    ExportConfig,
    FinetuneConfig,
    LabelConfig,
    LabelOutputConfig,
    PipelineConfig,
    PipelineTeacherConfig,
    TuneConfig,
)
from kd_ray.console import say
from kd_ray.stages.evaluate import (
    SINGLE_TASK,
    evaluate_models,
    headline,
    metrics_report,
    summary_table,
)
from kd_ray.stages.export import run_export
from kd_ray.stages.label import run_label
from kd_ray.stages.plan import distill_plan, finetune_plan
from kd_ray.stages.report import write_report
from kd_ray.stages.train import read_run_info, run_distill, run_finetune
from kd_ray.stages.tune import run_tune


class TaskTeacher(NamedTuple):
    """One task's teacher in a run: what it predicts, the task's gold column in data.train, how it is
    made, and where it is (or will be fine-tuned to)."""

    task: str
    labels: list[str]
    label_column: str | None
    teacher: PipelineTeacherConfig
    path: str


def task_teachers(cfg: PipelineConfig) -> list[TaskTeacher]:
    out = Path(cfg.output)
    if cfg.tasks is None:
        return [TaskTeacher(SINGLE_TASK, cfg.labels, cfg.data.train.label_column, cfg.teacher,
                            cfg.teacher.model or str(out / "teacher"))]
    return [TaskTeacher(task, tc.labels, tc.label_column, tc.teacher, tc.teacher.model or str(out / "teachers" / task))
            for task, tc in cfg.tasks.items()]


def _eval_set(cfg: PipelineConfig, data: EvalSetConfig | None, task: str | None = None) -> EvalSetConfig | None:
    """An eval set as a stage reads it: with `tasks:`, its gold columns are the tasks' (all of them, or
    only ``task``'s for that task's teacher); without, as configured."""
    if data is None or cfg.tasks is None:
        return data
    first, *others = cfg.tasks
    if task is not None:
        return data.model_copy(update={"label_column": cfg.tasks[task].label_column, "task_label_columns": {}})
    return data.model_copy(update={"label_column": cfg.tasks[first].label_column,
                                   "task_label_columns": {t: cfg.tasks[t].label_column for t in others}})


def label_corpus(cfg: PipelineConfig) -> CorpusConfig:
    """What the teachers label: data.train, then data.transfer read without gold, whatever columns it has;
    with `tasks:`, each task's gold column beside the first's."""
    update = {"unlabeled_path": cfg.data.transfer.path if cfg.data.transfer else None}
    if cfg.tasks is not None:
        first, *others = cfg.tasks
        update.update(partial_labels=True, label_column=cfg.tasks[first].label_column,
                      task_label_columns={t: cfg.tasks[t].label_column for t in others})
    return cfg.data.train.model_copy(update=update)


def _finetune_stages(cfg: PipelineConfig, teachers: list[TaskTeacher]) -> dict[str, FinetuneConfig]:
    """Task -> the fine-tuning of its teacher, for teachers given as a base model."""
    return {t.task: FinetuneConfig(
        data=cfg.data.train.model_copy(update={"label_column": t.label_column, "task_label_columns": {}}),
        base_model=t.teacher.base_model, labels=t.labels, validation=_eval_set(cfg, cfg.data.validation, t.task),
        train=t.teacher.train, output=t.path, ray=cfg.ray) for t in teachers if t.teacher.model is None}


def _label_stage(cfg: PipelineConfig, teachers: list[TaskTeacher]) -> LabelConfig:
    named = cfg.tasks is not None  # one teacher keeps the default name and task: its column is teacher_logits
    return LabelConfig(
        corpus=label_corpus(cfg),
        teachers=[t.teacher.labeling(t.labels, model=t.path, max_length=cfg.teacher_max_length,
                                     representation=cfg.teacher_representation,
                                     **({"name": t.task, "task": t.task} if named else {})) for t in teachers],
        compute=cfg.label, augment=cfg.augment,
        # the run folder is the pipeline's own: labels of an older teacher are replaced, not refused
        output=LabelOutputConfig(path=str(Path(cfg.output) / "soft_labels"), logits_dtype=cfg.logits_dtype,
                                 overwrite=True),
        ray=cfg.ray)


def stage_configs(cfg: PipelineConfig) -> dict:
    """The per-stage configs this run is made of (each could be run alone with its own command)."""
    out = Path(cfg.output)
    teachers = task_teachers(cfg)
    stages: dict = {"finetune": _finetune_stages(cfg, teachers), "label": _label_stage(cfg, teachers)}
    stages["distill"] = DistillConfig(
        soft_labels=str(out / "soft_labels"), student=cfg.student, loss=cfg.loss, validation=_eval_set(
            cfg, cfg.data.validation), train=cfg.distill, output=str(out / "student"), ray=cfg.ray,
        tasks={t: tc.loss for t, tc in cfg.tasks.items()} if cfg.tasks else None)
    students = {"student": str(out / "student")}
    if cfg.tune is not None:  # the search replaces the single distillation; its first trial is that one
        stages["tune"] = TuneConfig(distill=stages["distill"], search=cfg.tune, output=str(out / "tune"), ray=cfg.ray)
        students["student"] = str(out / "tune" / "student")
    if cfg.baseline_without_distillation and any(t.label_column for t in teachers):  # alpha=0 learns from gold
        distill = stages["distill"]
        stages["distill_alpha0"] = distill.model_copy(update={
            "loss": cfg.loss.model_copy(update={"alpha": 0.0}), "output": str(out / "student_alpha0"),
            "tasks": {t: tc.model_copy(update={"alpha": 0.0}) for t, tc in distill.tasks.items()}
            if distill.tasks else None})
        students["student_alpha0"] = str(out / "student_alpha0")
    if cfg.export:  # the served student, in the same evaluation
        # no parity bar here: the evaluation reports the int8 file's quality and agreement beside the student's
        # its parity check reads the test texts only (with tasks, data.test has no column 'label')
        parity = CorpusConfig(**cfg.data.test.model_dump(exclude={"label_column", "task_label_columns"}))
        stages["export"] = ExportConfig(model=students["student"], output=str(out / "student_onnx"),
                                        parity=parity, max_length=cfg.eval.max_length, min_agreement=0.0)
        students["student_int8"] = str(out / "student_onnx" / "model.int8.onnx")
    # an LLM teacher is scored through its prompt, as it labeled
    stages["evaluate"] = {"teachers": {t.task: t.teacher.labeling(t.labels, model=t.path, task=t.task)
                                       if t.teacher.kind == "llm" else t.path for t in teachers}, "students": students,
                          "test": _eval_set(cfg, cfg.data.test), "args": cfg.eval}
    return stages


def _timed(timings: dict[str, float], name: str, fn, *args, **kwargs):
    """Run one stage, print when it starts and ends, record its seconds."""
    say(f"kd-ray run: stage {name} started")
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - start, 1)
    say(f"kd-ray run: stage {name} done in {timings[name]} s")
    return result


def up_to_date(folder: str, plan) -> bool:
    """Whether ``folder`` holds the model of this plan (its row count aside: a fine-tune counts its rows
    only once it reads its data, and the data's config is part of the plan)."""
    info = read_run_info(folder)
    drop = lambda p: {k: v for k, v in p.items() if k != "rows"}  # noqa: E731
    return info is not None and "plan" in info and drop(info["plan"]) == drop(plan.model_dump(mode="json"))


def _finetune_teachers(stages: dict, timings: dict) -> None:
    """Each teacher given as a base model is fine-tuned, unless its folder holds the same plan's model."""
    for task, ft in stages["finetune"].items():
        name = "finetune" if task == SINGLE_TASK else f"finetune_{task}"
        if up_to_date(ft.output, finetune_plan(ft, rows=0)):
            say(f"kd-ray run: teacher {ft.output} is up to date; skipping {name}")
        else:
            _timed(timings, name, run_finetune, ft)


def _train_students(stages: dict, timings: dict) -> None:
    """The student (or the search) and its alpha=0 twin, each kept when its folder holds the same plan's model."""
    if "tune" in stages:
        _timed(timings, "tune", run_tune, stages["tune"])
    for name in ("distill", "distill_alpha0"):
        if name not in stages or (name == "distill" and "tune" in stages):
            continue
        if up_to_date(stages[name].output, distill_plan(stages[name])[0]):
            say(f"kd-ray run: {stages[name].output} is up to date; skipping {name}")
        else:
            _timed(timings, name, run_distill, stages[name])


def _label(cfg: LabelConfig):
    summary = run_label(cfg)
    say(summary.line())
    return summary


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage; write metrics.json (kd_ray.stages.evaluate.metrics_report, plus timings and labeling) and
    report.html. Returns the evaluation report."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    stages = stage_configs(cfg)
    timings: dict = {}
    _finetune_teachers(stages, timings)
    summary = _timed(timings, "label", _label, stages["label"])
    _train_students(stages, timings)
    if "export" in stages:
        _timed(timings, "export", run_export, stages["export"])
    report = _timed(timings, "evaluate", evaluate_models, **stages["evaluate"])
    metrics = {**metrics_report(report), "timings_s": timings,
               "labeling": {"rows": summary.rows, "rows_per_s": summary.rows_per_s, "files": summary.files,
                            "rejected": summary.rejected, "truncated": summary.truncated}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report["report_html"] = str(write_report(out))
    return report


def main(cfg: PipelineConfig) -> dict:
    report = run_pipeline(cfg)
    say(summary_table(report))
    say(f"kd-ray run: {headline(report)}. Outputs: {cfg.output} (metrics: {Path(cfg.output) / 'metrics.json'})")
    say(f"kd-ray run: report: {report['report_html']} (plots as PNG in {Path(cfg.output) / 'report'})")
    return report


ENTRY_POINTS = {"run": main}
