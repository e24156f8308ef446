"""Loading the models a training run starts from (Ray-free; runs inside each worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd_ray.errors import ModelError
from kd_ray.students import cut_student_from_teacher, student_from_config


def _label_maps(labels: list[str]) -> dict[str, Any]:
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def _check_path(model: str, what: str) -> None:
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise ModelError(f"{what} {model} does not exist")


def load_classifier(model: str, labels: list[str], *, what: str = "model"):
    """A sequence classifier with exactly ``labels`` as outputs, and its tokenizer.

    A bare encoder (or a classifier with another label count) gets a fresh head.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _check_path(model, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        net = AutoModelForSequenceClassification.from_pretrained(model, ignore_mismatched_sizes=True,
                                                                 **_label_maps(labels))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {what} from {model!r}: {e}") from e
    return net, tokenizer


def build_student(student: dict[str, Any], teacher_model: str, labels: list[str]):
    """The student described by a StudentConfig dict, with the teacher's label set."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    kind = student["kind"]
    if kind == "pretrained":
        if not student.get("model"):
            raise ModelError("student.kind=pretrained needs student.model (a model folder or hub id)")
        return load_classifier(student["model"], labels, what="student model")
    source = student.get("model") or teacher_model
    _check_path(source, "teacher model to cut the student from" if kind == "cut" else "teacher model")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if kind == "cut":
        teacher = AutoModelForSequenceClassification.from_pretrained(source)
        if [teacher.config.id2label[i] for i in range(teacher.config.num_labels)] != labels:
            raise ModelError(f"cannot cut a student from {source}: its labels "
                             f"{list(teacher.config.id2label.values())} differ from the soft labels' {labels}")
        return cut_student_from_teacher(teacher, student["num_layers"], student["layer_selection"]), tokenizer
    config = AutoConfig.from_pretrained(source, **_label_maps(labels))
    net = student_from_config(config, num_layers=student["num_layers"], hidden_size=student["hidden_size"],
                              num_attention_heads=student["num_attention_heads"],
                              intermediate_size=student["intermediate_size"])
    return net, tokenizer
