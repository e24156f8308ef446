"""Loading the models a training run starts from (Ray-free; runs inside each worker)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kd_ray.errors import ModelError
from kd_ray.models.inference import is_classifier_config
from kd_ray.models.multitask import label_maps
from kd_ray.models.students import cut_student_from_teacher, ffn_neurons, student_from_config

if TYPE_CHECKING:
    from kd_ray.config import StudentConfig


def _check_path(model: str, what: str) -> None:
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise ModelError(f"{what} {model} does not exist")


def is_classifier(model: str) -> bool:
    """Whether ``model``'s config says it is a sequence classifier (a bare encoder is not)."""
    from transformers import AutoConfig

    try:
        return is_classifier_config(AutoConfig.from_pretrained(model))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the config of {model!r}: {e}") from e


def load_classifier(model: str, labels: list[str], *, what: str = "model"):
    """A sequence classifier with exactly ``labels`` as outputs, and its tokenizer.

    A bare encoder (or a classifier with another label count) gets a fresh head.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _check_path(model, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        net = AutoModelForSequenceClassification.from_pretrained(model, ignore_mismatched_sizes=True,
                                                                 **label_maps(labels))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {what} from {model!r}: {e}") from e
    return net, tokenizer


def build_student(student: StudentConfig, teacher_model: str, labels: list[str]):
    """The student ``student`` describes, with ``labels`` as outputs, and its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    if student.kind == "pretrained":
        if not student.model:
            raise ModelError("student.kind=pretrained needs student.model (a model folder or hub id)")
        return load_classifier(student.model, labels, what="student model")
    source = student.model or teacher_model
    _check_path(source, "teacher model to cut the student from" if student.kind == "cut" else "teacher model")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if student.kind == "cut":
        return _cut_student(student, source, labels), tokenizer
    config = AutoConfig.from_pretrained(source, **label_maps(labels))
    net = student_from_config(config, num_layers=student.num_layers, hidden_size=student.hidden_size,
                              num_attention_heads=student.num_attention_heads,
                              intermediate_size=student.intermediate_size)
    return net, tokenizer


def _cut_student(student: StudentConfig, source: str, labels: list[str]):
    from transformers import AutoModelForSequenceClassification

    if is_classifier(source):  # a teacher: its head is kept, so its labels must be these
        teacher = AutoModelForSequenceClassification.from_pretrained(source)
        if [teacher.config.id2label[i] for i in range(teacher.config.num_labels)] != labels:
            raise ModelError(f"cannot cut a student from {source}: its labels "
                             f"{list(teacher.config.id2label.values())} differ from the soft labels' {labels}")
    else:  # another pretrained encoder (MiniLM-L6 for an MPNet teacher): its layers under a fresh head
        teacher, _ = load_classifier(source, labels, what="model to cut the student from")
    wide_first = bool(student.wide_epochs)
    try:  # a student narrowed after training (wide_epochs) starts at full width
        net = cut_student_from_teacher(teacher, student.num_layers, student.layer_selection,
                                       None if wide_first else student.ffn_size)
        if wide_first:
            ffn_neurons(net, student.ffn_size)  # checks the size now, not epochs later
    except ValueError as e:
        raise ModelError(f"cannot cut a student from {source}: {e}") from e
    return net
