"""`kd-ray run`: the whole job from one YAML, a list of stages, each skipped when its output already matches.

  data.train --finetune--> teacher/ --label (train + transfer)--> soft_labels/
  soft_labels/ --distill--> student/   (and student_alpha0/: the same student without distillation)
               (or, with a `tune:` section, --tune--> tune/, whose best student is the run's student)
  student/ --export--> student_onnx/   (with export: true)
  teacher/, student/ --evaluate on data.test--> metrics.json --report--> report.html, report/*.png

Each stage is an object holding the config its own command takes (``kd-ray finetune``, ``label``, ...): its
output, ``up_to_date()`` and ``run()``. With `tasks:` (multi-task), each task's teacher is fine-tuned into
teachers/<task>/ on the rows that carry its gold label, all teachers label the corpus in one pass, one
student with a head per task learns from them all, and each task is scored on the test rows that carry its
gold label. One run of one task is the same stages with one teacher.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from kd_ray.config import (CorpusConfig, DistillConfig, EvalSetConfig, ExportConfig, FinetuneConfig,
                           LabelConfig, LabelOutputConfig, PipelineConfig, RunTeacherConfig, TuneConfig)
from kd_ray.console import say
from kd_ray.stages.evaluate import SINGLE_TASK, evaluate_models, headline, metrics_report, summary_table
from kd_ray.stages.export import run_export
from kd_ray.stages.label import main as label_main
from kd_ray.stages.plan import distill_plan, finetune_plan
from kd_ray.stages.report import write_report
from kd_ray.stages.train import read_run_info, run_distill, run_finetune
from kd_ray.stages.tune import run_tune


def trained(folder: str, plan) -> bool:
    """Whether ``folder`` holds the model of this plan (its row count aside: a fine-tune counts its rows
    only once it reads its data, and the data's config is part of the plan)."""
    info = read_run_info(folder)
    drop = lambda p: {k: v for k, v in p.items() if k != "rows"}  # noqa: E731
    return info is not None and "plan" in info and drop(info["plan"]) == drop(plan.model_dump(mode="json"))


@dataclass
class Stage:
    """One step of a run: ``name`` in the console and timings, ``cfg`` the config its own command takes,
    ``command`` the function that command runs; a training stage's ``plan``: what its output holds when it is up
    to date (the other stages resume by themselves: labeling keeps its part files, a search Ray Tune's state)."""

    name: str
    cfg: Any
    command: Callable[[Any], Any]
    plan: Callable[[Any], Any] | None = None

    @property
    def output(self) -> str:
        return getattr(self.cfg.output, "path", self.cfg.output)

    def up_to_date(self) -> bool:
        """Whether the output already holds what ``run`` would make."""
        return self.plan is not None and trained(self.output, self.plan(self.cfg))

    def run(self, done: dict[str, Any]) -> Any:
        """Make the output; ``done``: the results of the stages before, by name."""
        return self.command(self.cfg)


@dataclass
class Evaluate(Stage):
    """Every teacher against every student on data.test (``cfg``: evaluate_models' arguments); writes
    metrics.json with the run's timings and labeling figures into ``folder``."""

    folder: str = ""

    @property
    def output(self) -> str:
        return str(Path(self.folder) / "metrics.json")

    def run(self, done):
        start = time.perf_counter()
        report = self.command(**self.cfg)
        labeled, timings = done["label"], {**done["timings_s"], self.name: round(time.perf_counter() - start, 1)}
        metrics = {**metrics_report(report), "timings_s": timings,
                   "labeling": {"rows": labeled.rows, "rows_per_s": labeled.rows_per_s, "files": labeled.files,
                                "rejected": labeled.rejected, "truncated": labeled.truncated}}
        Path(self.output).write_text(json.dumps(metrics, indent=2))
        return report


@dataclass
class Report(Stage):
    """report.html and its plots (``cfg``: the run folder)."""

    @property
    def output(self) -> str:
        return str(Path(self.cfg) / "report.html")


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


class RunTeacher(NamedTuple):
    """One task's teacher in a run: its config, its gold column in data.train, where its model is (or goes)."""

    task: str
    cfg: RunTeacherConfig
    gold: str | None
    path: str


def run_teachers(cfg: PipelineConfig) -> list[RunTeacher]:
    out = Path(cfg.output)
    if cfg.tasks is None:
        return [RunTeacher(SINGLE_TASK, cfg.teacher, cfg.data.train.label_column,
                           cfg.teacher.model or str(out / "teacher"))]
    return [RunTeacher(task, tc.teacher, tc.label_column, tc.teacher.model or str(out / "teachers" / task))
            for task, tc in cfg.tasks.items()]


def _finetune_stages(cfg: PipelineConfig, teachers: list[RunTeacher]) -> list[Stage]:
    """The fine-tuning of each teacher given as a base model (its rows are counted once it reads them)."""
    return [Stage("finetune" if t.task == SINGLE_TASK else f"finetune_{t.task}", FinetuneConfig(
        data=cfg.data.train.model_copy(update={"label_column": t.gold, "task_label_columns": {}}),
        base_model=t.cfg.base_model, labels=t.cfg.labels, validation=_eval_set(cfg, cfg.data.validation, t.task),
        train=t.cfg.train, output=t.path, ray=cfg.ray), run_finetune, lambda ft: finetune_plan(ft, rows=0))
        for t in teachers if t.cfg.base_model is not None]


def _label_stage(cfg: PipelineConfig, teachers: list[RunTeacher]) -> Stage:
    """Every teacher over train + transfer in one pass; one teacher keeps the default name (teacher_logits). The
    run folder is the pipeline's own: labels of an older teacher are replaced, not refused."""
    named = lambda t: {} if cfg.tasks is None else {"name": t.task, "task": t.task}  # noqa: E731
    return Stage("label", LabelConfig(
        corpus=label_corpus(cfg), compute=cfg.label, augment=cfg.augment, ray=cfg.ray,
        teachers=[t.cfg.labeling(t.path, **named(t)) for t in teachers],
        output=LabelOutputConfig(path=str(Path(cfg.output) / "soft_labels"), logits_dtype=cfg.logits_dtype,
                                 overwrite=True)), label_main)


def _student_stages(cfg: PipelineConfig, teachers: list[RunTeacher]) -> tuple[list[Stage], dict[str, str]]:
    """The student (or the search that picks it), its alpha=0 twin, its ONNX export; and every model the
    evaluation scores, by name."""
    out = Path(cfg.output)
    distill = DistillConfig(soft_labels=str(out / "soft_labels"), student=cfg.student, loss=cfg.loss,
                            validation=_eval_set(cfg, cfg.data.validation), train=cfg.distill, ray=cfg.ray,
                            output=str(out / "student"),
                            tasks={t: tc.loss for t, tc in cfg.tasks.items()} if cfg.tasks else None)
    plan = lambda d: distill_plan(d)[0]  # noqa: E731
    if cfg.tune is not None:  # the search replaces the single distillation; its first trial is that one
        run = [Stage("tune", TuneConfig(distill=distill, search=cfg.tune, output=str(out / "tune"), ray=cfg.ray),
                     run_tune)]
        students = {"student": str(out / "tune" / "student")}
    else:
        run, students = [Stage("distill", distill, run_distill, plan)], {"student": distill.output}
    if cfg.baseline_without_distillation and any(t.gold for t in teachers):  # alpha=0 learns from gold
        alpha0 = distill.model_copy(update={
            "loss": cfg.loss.model_copy(update={"alpha": 0.0}), "output": str(out / "student_alpha0"),
            "tasks": {t: tc.model_copy(update={"alpha": 0.0}) for t, tc in distill.tasks.items()}
            if distill.tasks else None})
        run.append(Stage("distill_alpha0", alpha0, run_distill, plan))
        students["student_alpha0"] = alpha0.output
    if cfg.export:  # the served student, in the same evaluation
        # no parity bar here: the evaluation reports the int8 file's quality and agreement beside the student's;
        # its parity check reads the test texts only (with tasks, data.test has no column 'label')
        parity = CorpusConfig(**cfg.data.test.model_dump(exclude={"label_column", "task_label_columns"}))
        export = ExportConfig(model=students["student"], output=str(out / "student_onnx"), parity=parity,
                              max_length=cfg.eval.max_length, min_agreement=0.0)
        run.append(Stage("export", export, run_export))
        students["student_int8"] = str(Path(export.output) / "model.int8.onnx")
    return run, students


def stages(cfg: PipelineConfig) -> list[Stage]:
    """The stages this run is made of, in order (each could be run alone with its own command)."""
    teachers = run_teachers(cfg)
    students, students_by_name = _student_stages(cfg, teachers)
    # each teacher is scored as it labels (an LLM teacher through its prompt)
    evaluate = {"teachers": {t.task: t.cfg.labeling(t.path, task=t.task) for t in teachers},
                "students": students_by_name, "test": _eval_set(cfg, cfg.data.test), "args": cfg.eval}
    return [*_finetune_stages(cfg, teachers), _label_stage(cfg, teachers), *students,
            Evaluate("evaluate", evaluate, evaluate_models, folder=cfg.output),
            Report("report", cfg.output, write_report)]


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage that is not up to date, each timed; returns the evaluation report, with
    ``report_html``."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    done: dict[str, Any] = {"timings_s": {}}
    for stage in stages(cfg):
        if stage.up_to_date():
            say(f"kd-ray run: {stage.output} is up to date; skipping {stage.name}")
            continue
        say(f"kd-ray run: stage {stage.name} started")
        start = time.perf_counter()
        done[stage.name] = stage.run(done)
        done["timings_s"][stage.name] = round(time.perf_counter() - start, 1)
        say(f"kd-ray run: stage {stage.name} done in {done['timings_s'][stage.name]} s")
    return {**done["evaluate"], "report_html": str(done["report"])}


def main(cfg: PipelineConfig) -> dict:
    report = run_pipeline(cfg)
    say(summary_table(report))
    say(f"kd-ray run: {headline(report)}. Outputs: {cfg.output} (metrics: {Path(cfg.output) / 'metrics.json'})")
    say(f"kd-ray run: report: {report['report_html']} (plots as PNG in {Path(cfg.output) / 'report'})")
    return report


ENTRY_POINTS = {"run": main}
