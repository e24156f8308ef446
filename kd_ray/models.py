"""Loading the models a training run starts from (Ray-free; runs inside each worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd_ray.errors import ModelError
from kd_ray.students import cut_student_from_teacher, ffn_neurons, student_from_config


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


def build_student(student: dict[str, Any], teacher_model: str, labels: list[str], tasks: list[dict] | None = None):
    """The student described by a StudentConfig dict, with the teacher's label set.

    With ``tasks`` (multi-task), ``labels`` is the joint 'task:label' list: one head per task (see
    kd_ray.multitask); a cut student keeps the cut teacher's head for the first task's slice."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    kind = student["kind"]
    if tasks and kind == "cut":
        first = list(tasks[0]["labels"])
        net, tokenizer = build_student(student, teacher_model, first)
        return with_joint_head(net, labels, keep=len(first)), tokenizer
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
        ffn_size, wide_first = student.get("ffn_size"), bool(student.get("wide_epochs"))
        try:  # a student narrowed after training (wide_epochs) starts at full width
            net = cut_student_from_teacher(teacher, student["num_layers"], student["layer_selection"],
                                           None if wide_first else ffn_size)
            if wide_first:
                ffn_neurons(net, ffn_size)
        except ValueError as e:
            raise ModelError(f"cannot cut a student from {source}: {e}") from e
        return net, tokenizer
    config = AutoConfig.from_pretrained(source, **_label_maps(labels))
    net = student_from_config(config, num_layers=student["num_layers"], hidden_size=student["hidden_size"],
                              num_attention_heads=student["num_attention_heads"],
                              intermediate_size=student["intermediate_size"])
    return net, tokenizer


def with_joint_head(model, labels: list[str], *, keep: int):
    """``model`` with its output layer widened to ``labels``; its first ``keep`` rows are kept."""
    import torch
    from torch import nn

    from kd_ray.multitask import output_layer

    head = output_layer(model, model.config.num_labels)
    wide = nn.Linear(head.in_features, len(labels), dtype=head.weight.dtype)
    model._init_weights(wide)
    with torch.no_grad():
        wide.weight[:keep] = head.weight[:keep]
        wide.bias[:keep] = head.bias[:keep]
    head.weight, head.bias, head.out_features = wide.weight, wide.bias, len(labels)
    model.config.update(_label_maps(labels))
    model.num_labels = len(labels)
    return model
