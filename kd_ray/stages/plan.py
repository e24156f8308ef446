"""The training plan: what a `finetune` or `distill` run does, built once on the driver, read by every worker.

A plan is a list of tasks, each a slice of the model's output with its gold column, its
teachers' logit columns and its loss. A single-task student is a plan with one task;
`kd-ray finetune` is a plan with one task and no teacher (cross-entropy on gold); a multi-task
student (``tasks:`` in the config) has one task per head and names its outputs 'task:label'.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from kd_ray.config import DistillConfig, FinetuneConfig, StudentConfig, TaskLossConfig, TrainArgs
from kd_ray.data.soft_labels import (SoftLabelInfo, TeacherInfo, logits_column, read_soft_label_info,
                                     representation_column)
from kd_ray.data.storage import absolute_if_local
from kd_ray.errors import KdRayUserError, ModelError, SoftLabelError
from kd_ray.models.multitask import TaskSlice, joint_labels, task_layout
from kd_ray.models.teacher import make_teacher


class TaskPlan(TaskSlice):
    """One task: its slice of the output, where its targets are, and how it is learned."""

    gold_column: str | None = "label"
    teachers: dict[str, float] = {}  # logits column -> weight; none: learned from gold labels alone
    teacher_model: str | None = None  # the first teacher's model: a cut student's source
    kind: Literal["kl", "mse", "hard"] = "kl"
    temperature: float = 1.0
    alpha: float = 0.0
    weight: float = 1.0
    # representation distillation: the stored teacher representation the student's pooled states match
    beta: float = 0.0
    representation: str | None = None  # its column
    pooling: Literal["mean", "cls"] = "mean"
    representation_width: int = 0
    representation_loss: Literal["cosine", "mse"] = "cosine"


class TrainPlan(BaseModel):
    """Everything a training worker needs; the run's name is a hash of it (a changed plan starts afresh)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["finetune", "distill"]
    tasks: list[TaskPlan]
    named_heads: bool = False  # outputs named 'task:label' and kd_ray_tasks.json beside the weights
    train: TrainArgs
    rows: int  # training rows, all workers together
    has_validation: bool = False
    gold_only: bool = False  # no distillation term anywhere: rows without gold are left out
    base_model: str | None = None  # finetune: the encoder it starts from
    student: StudentConfig | None = None  # distill: the student to build
    source: dict[str, Any] = {}  # the data it learns from: soft labels' hash and files, or the corpus config

    @property
    def labels(self) -> list[str]:
        """The model's output names."""
        return joint_labels(self.tasks) if self.named_heads else list(self.tasks[0].labels)

    @property
    def teacher_columns(self) -> list[str]:
        return list(dict.fromkeys(c for t in self.tasks for c in t.teachers))

    @property
    def representation_columns(self) -> list[str]:
        return list(dict.fromkeys(t.representation for t in self.tasks if t.representation))

    @property
    def gold_columns(self) -> list[str]:
        return [t.gold_column for t in self.tasks if t.gold_column]

    @property
    def wide_epochs(self) -> int:
        """Epochs at full feed-forward width before a student is narrowed (0: none)."""
        return self.student.wide_epochs if self.student else 0

    @property
    def narrow_at(self) -> list[int]:
        """Epochs done after which the student is narrowed one step (the last step reaches student.ffn_size)."""
        return list(range(self.wide_epochs, self.student.epochs_before_final_width + 1)) if self.wide_epochs else []

    @property
    def epochs(self) -> int:
        """Wide epochs, one for each narrowing step before the last, then train.epochs at the final width."""
        return (self.student.epochs_before_final_width if self.student else 0) + self.train.epochs

    @property
    def keeps_best(self) -> bool:
        """Whether the run exports its best epoch (train.keep 'best', or 'auto' with validation data and a worker
        group: local mode keeps only the last checkpoint)."""
        return self.train.keep == "best" or (self.train.keep == "auto" and self.has_validation
                                             and self.train.num_workers > 0)


def finetune_plan(cfg: FinetuneConfig, rows: int) -> TrainPlan:
    """A teacher fine-tuned on gold labels: one task, no teacher."""
    task = TaskPlan(name="label", labels=tuple(cfg.labels))
    return TrainPlan(mode="finetune", tasks=[task], train=cfg.train, rows=rows,
                     has_validation=cfg.validation is not None, base_model=absolute_if_local(cfg.base_model),
                     source={"data": cfg.data.model_dump(mode="json")})


def distill_plan(cfg: DistillConfig) -> tuple[TrainPlan, SoftLabelInfo]:
    """Check the soft labels against the distill config; return the plan and what the soft labels hold."""
    info = read_soft_label_info(cfg.soft_labels)
    tasks = _task_plans(cfg, info, _requested_tasks(cfg, info))
    student = cfg.student.model_copy(update={"model": absolute_if_local(cfg.student.model)})
    _check_student(student, tasks, info)
    gold_only = all(t.alpha == 0 and t.beta == 0 for t in tasks)
    rows = _trainable_rows(info, tasks, gold_only)
    if rows == 0:
        what = "rows with a gold label (alpha=0 trains on gold labels only)" if gold_only else "rows"
        raise SoftLabelError(f"soft labels at {cfg.soft_labels} hold no {what}: the training set is empty")
    plan = TrainPlan(mode="distill", tasks=tasks, named_heads=cfg.tasks is not None, train=cfg.train, rows=rows,
                     has_validation=cfg.validation is not None, gold_only=gold_only, student=student,
                     source={"soft_labels_hash": info.metadata.config_hash, "soft_label_files": info.files_digest})
    return plan, info


def _requested_tasks(cfg: DistillConfig, info: SoftLabelInfo) -> dict[str, TaskLossConfig]:
    """The config's tasks; a single-task config (``loss:``) is one task, that of its teachers."""
    if cfg.tasks is not None:
        return cfg.tasks
    names = [t.name for t in info.teachers]
    weights = cfg.loss.teachers or {names[0]: 1.0}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise SoftLabelError(f"loss.teachers names {unknown}, but the soft labels at {cfg.soft_labels} hold "
                             f"teachers {names}")
    teachers = [info.teacher(name) for name in weights]
    tasks = sorted({t.task for t in teachers})
    if len(tasks) > 1:
        raise SoftLabelError(f"loss.teachers names teachers of tasks {tasks}; one head learns one task: give each "
                             f"task its own head with tasks.<task>.teachers")
    return {tasks[0]: TaskLossConfig(teachers=weights)}


def _task_plans(cfg: DistillConfig, info: SoftLabelInfo, requested: dict[str, TaskLossConfig]) -> list[TaskPlan]:
    by_task: dict[str, dict[str, TeacherInfo]] = {}
    for t in info.teachers:
        by_task.setdefault(t.task, {})[t.name] = t
    chosen = {task: _task_teachers(cfg, task, by_task, tc.teachers) for task, tc in requested.items()}
    try:
        layout = task_layout({task: teachers[0].labels for task, teachers in chosen.items()})
    except ValueError as e:
        raise KdRayUserError(f"tasks: {e}") from None
    plans = []
    for spec, (task, tc) in zip(layout, requested.items()):
        weights = tc.teachers or {t.name: 1.0 for t in chosen[task]}
        beta = tc.beta if tc.beta is not None else cfg.loss.beta
        plans.append(TaskPlan(
            **spec.model_dump(), gold_column=info.metadata.gold_column(task), teacher_model=chosen[task][0].model,
            teachers={logits_column(n): w for n, w in weights.items()}, kind=tc.kind or cfg.loss.kind,
            temperature=tc.temperature if tc.temperature is not None else cfg.loss.temperature,
            alpha=tc.alpha if tc.alpha is not None else cfg.loss.alpha, weight=tc.weight,
            **(_representation_target(cfg, task, chosen[task], beta) if beta > 0 else {})))
    return plans


def _representation_target(cfg: DistillConfig, task: str, teachers: list[TeacherInfo], beta: float) -> dict:
    """A task's representation term: the first of its teachers that stored a representation."""
    stored = next((t for t in teachers if t.representation), None)
    if stored is None:
        raise SoftLabelError(
            f"loss.beta={beta} (task {task!r}) matches the student to a teacher's stored representation, but none of "
            f"the task's teachers {[t.name for t in teachers]} stored one in {cfg.soft_labels}; label with "
            f"teachers.N.representation: mean, or set beta: 0")
    return {"beta": beta, "representation": representation_column(stored.name),
            "pooling": stored.representation.pooling, "representation_width": stored.representation.width,
            "representation_loss": cfg.loss.representation_loss}


def _task_teachers(cfg: DistillConfig, task: str, by_task: dict[str, dict[str, TeacherInfo]],
                   weights: dict[str, float] | None) -> list[TeacherInfo]:
    """The teachers task ``task`` learns from (all of the task's when ``weights`` is None). They predict the
    same labels: `kd-ray label` refuses teachers of one task that do not."""
    if task not in by_task:
        raise SoftLabelError(f"tasks.{task}: the soft labels at {cfg.soft_labels} have no label column for task "
                             f"{task!r}; their teachers label tasks {sorted(by_task)}")
    named = by_task[task]
    wrong = sorted(set(weights or {}) - set(named))
    if wrong:
        raise SoftLabelError(f"tasks.{task}.teachers names {wrong}, which are not teachers of task {task!r} in "
                             f"{cfg.soft_labels}; its teachers are {sorted(named)}")
    return [named[name] for name in weights] if weights else list(named.values())


def _check_student(student: StudentConfig, tasks: list[TaskPlan], info: SoftLabelInfo) -> None:
    local = student.model and student.model.startswith((".", "/", "~"))
    if local and not Path(student.model).expanduser().exists():
        raise ModelError(f"student.model {student.model} does not exist")
    if student.kind == "cut" and student.model is None and len(tasks[0].teachers) > 1:
        raise KdRayUserError("student.kind=cut with several teachers needs student.model: which teacher to cut")
    source = next(t for t in info.teachers if t.model == tasks[0].teacher_model)
    try:
        student.check_source(f"teacher {source.name!r} ({source.model})", encoder=make_teacher(source).encoder)
    except ValueError as e:
        raise KdRayUserError(str(e)) from None


def _trainable_rows(info: SoftLabelInfo, tasks: list[TaskPlan], gold_only: bool) -> int:
    """Rows a distillation trains on: all, or those with a gold label for some task when no task distills."""
    import pyarrow.dataset as pads

    if not gold_only:
        return info.num_rows
    golds = [pads.field(t.gold_column).is_valid() for t in tasks if t.gold_column]
    if not golds:
        return 0
    return pads.dataset(info.files, format="parquet").count_rows(filter=functools.reduce(lambda a, b: a | b, golds))
