"""A multi-task student: one encoder, one classification head per task (Ray-free).

The student is an ordinary Hugging Face sequence classifier whose outputs are the tasks' label
sets laid end to end (``sentiment:negative, ..., reason:Bad Flight, ...``); each task is a slice
of the logits with its own softmax. For a BERT-like model that is exactly one shared encoder and
pooler with one linear head per task, and it keeps every tool that takes an HF classifier working
(cutting layers, Accelerate, Ray Train checkpoints, ``save_pretrained``). ``kd_ray_tasks.json``
beside the weights records the slices; ``export_task`` writes one standard single-task folder.

Load and run, one forward pass per batch for all tasks::

    from kd_ray.models.multitask import MultiTaskClassifier
    results = MultiTaskClassifier.from_pretrained("runs/multitask/student").predict(["my flight was late"])
    results["sentiment"]["labels"], results["sentiment"]["probs"]   # ['negative'], (1, 3) array
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from kd_ray.errors import ModelError
from kd_ray.models.inference import predict_logits
from kd_ray.models.onnx import OnnxModel

TASKS_FILE = "kd_ray_tasks.json"
SEPARATOR = ":"


class TaskSlice(BaseModel):
    """Task ``name`` owns logits[:, start : start + len(labels)]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    labels: tuple[str, ...]
    start: int = 0

    @property
    def stop(self) -> int:
        return self.start + len(self.labels)

    def of(self, logits: Tensor) -> Tensor:
        """(batch, total) -> (batch, len(labels))"""
        return logits[..., self.start:self.stop]


def task_layout(tasks: dict[str, list[str]]) -> list[TaskSlice]:
    """Tasks in config order, each with its slice of the joint output."""
    layout, start = [], 0
    for name, labels in tasks.items():
        if SEPARATOR in name:
            raise ValueError(f"task name {name!r} must not contain {SEPARATOR!r}")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"task {name!r} needs at least 2 distinct labels, got {labels}")
        layout.append(TaskSlice(name=name, labels=tuple(labels), start=start))
        start += len(labels)
    return layout


def label_maps(labels: list[str]) -> dict[str, Any]:
    """``from_pretrained`` / ``config.update`` keyword arguments for a classifier with ``labels`` as outputs."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def joint_labels(layout: list[TaskSlice]) -> list[str]:
    """Names of the joint output: 'task:label'."""
    return [f"{t.name}{SEPARATOR}{label}" for t in layout for label in t.labels]


def task_predictions(logits: np.ndarray, tasks: dict[str, list[str]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """task -> (each row's predicted label index, its (rows, C) softmax probabilities), from a model's joint
    logits: each task a slice of them, in order, with its own softmax."""
    results, start = {}, 0
    for task, labels in tasks.items():
        z = logits[:, start:start + len(labels)].astype(np.float64)
        start += len(labels)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        results[task] = probs.argmax(axis=1), probs
    return results


def model_tasks(folder: str | Path, task: str | None) -> dict[str, list[str]]:
    """A model folder's tasks and their labels, in output order: a multi-task model's layout, or ``task`` with the
    labels of a single-task classifier's config.json."""
    if task is None or (Path(folder) / TASKS_FILE).is_file():
        return {t.name: list(t.labels) for t in read_layout(folder)}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return {task: [config.id2label[i] for i in range(config.num_labels)]}


def write_layout(folder: str | Path, layout: list[TaskSlice]) -> None:
    tasks = [{"name": t.name, "labels": list(t.labels), "start": t.start} for t in layout]  # a plan's tasks hold more
    (Path(folder) / TASKS_FILE).write_text(json.dumps({"tasks": tasks}, indent=2))


def read_layout(folder: str | Path) -> list[TaskSlice]:
    path = Path(folder) / TASKS_FILE
    if not path.is_file():
        raise ModelError(f"{folder} is not a kd-ray multi-task model: it has no {TASKS_FILE}")
    return [TaskSlice.model_validate(t) for t in json.loads(path.read_text())["tasks"]]


def output_layer(model: nn.Module, num_labels: int) -> nn.Linear:
    """The last Linear that produces the ``num_labels`` logits (BERT's classifier, RoBERTa's out_proj...)."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise ModelError(f"{type(model).__name__} has no linear output layer with {num_labels} outputs")
    return heads[-1]


def with_head(model, labels: list[str], *, rows: range):
    """``model`` with an output layer for ``labels`` whose first rows are its present layer's ``rows``, the
    others freshly initialised: widened to several tasks' heads, or cut to one task's."""
    head = output_layer(model, model.config.num_labels)
    new = nn.Linear(head.in_features, len(labels), dtype=head.weight.dtype)
    model._init_weights(new)
    with torch.no_grad():
        new.weight[:len(rows)] = head.weight[rows.start:rows.stop]
        new.bias[:len(rows)] = head.bias[rows.start:rows.stop]
    head.weight, head.bias, head.out_features = new.weight, new.bias, len(labels)
    model.config.update(label_maps(labels))
    model.num_labels = len(labels)
    return model


def export_task(folder: str | Path, task: str, output: str | Path) -> Path:
    """Write task ``task`` of a multi-task model as a standard sequence-classification folder.

    Same encoder, that task's rows of the output layer: ``pipeline()`` on it predicts exactly what
    the multi-task model predicts for that task (the price: one encoder per exported task).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    layout = {t.name: t for t in read_layout(folder)}
    if task not in layout:
        raise ModelError(f"{folder} has tasks {sorted(layout)}, not {task!r}")
    spec = layout[task]
    joint = AutoModelForSequenceClassification.from_pretrained(folder)
    with_head(joint, list(spec.labels), rows=range(spec.start, spec.stop))
    out = Path(output)
    joint.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


class MultiTaskClassifier:
    """A saved multi-task student, ready to predict every task from one forward pass per batch; or, with
    ``task``, any single-task classifier folder as a model of that one task."""

    def __init__(self, model, tokenizer, layout: list[TaskSlice], *, max_length: int = 128, device: str = "cpu",
                 path: str | Path | None = None):
        self.model, self.tokenizer, self.layout = model.eval().to(device), tokenizer, layout
        self.max_length, self.device, self.path = max_length, device, path

    @classmethod
    def from_pretrained(cls, path: str | Path, *, task: str | None = None, **kwargs) -> MultiTaskClassifier:
        """A model folder, or a file ``kd-ray export`` wrote (``.onnx``, run by ONNX Runtime)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if str(path).endswith(".onnx"):
            model, folder = OnnxModel(path), Path(path).parent
        else:
            model, folder = AutoModelForSequenceClassification.from_pretrained(path), path
        return cls(model, AutoTokenizer.from_pretrained(folder), task_layout(model_tasks(folder, task)), path=path,
                   **kwargs)

    @property
    def tasks(self) -> dict[str, list[str]]:
        return {t.name: list(t.labels) for t in self.layout}

    def task(self, name: str) -> TaskSlice:
        spec = next((t for t in self.layout if t.name == name), None)
        if spec is None:
            raise ModelError(f"{self.path} has tasks {sorted(self.tasks)}, not {name!r}")
        return spec

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(n, total) joint logits, rows in the order of ``texts`` (batches sorted by length)."""
        return predict_logits(self.model, self.tokenizer, texts, max_length=self.max_length, batch_size=batch_size,
                              device=self.device)

    def predict(self, texts: list[str], batch_size: int = 64) -> dict[str, dict[str, Any]]:
        """task -> {"labels": predicted label per text, "probs": (n, C_task) softmax}."""
        predicted = task_predictions(self.logits(texts, batch_size), self.tasks)
        return {task: {"labels": [labels[i] for i in predicted[task][0]], "probs": predicted[task][1]}
                for task, labels in self.tasks.items()}
