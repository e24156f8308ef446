"""Soft-label folders written by earlier kd-ray versions (committed under tests/fixtures/soft_labels/, made by
its make_fixtures.py) still validate and still train a student: schema 1 (one task, ids '<file>:<row>') and
schema 2 (two task teachers, the first task's gold in 'label')."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LABELS

from kd_ray.config import DistillConfig
from kd_ray.data.soft_labels import read_soft_label_info, validate_soft_labels

FIXTURES = Path(__file__).parent / "fixtures" / "soft_labels"
REASONS = ["Late Flight", "Lost Luggage", "Customer Service Issue", "Other"]


@pytest.mark.parametrize("folder, gold", [("v1-one-task", {"sentiment": "label"}),
                                          ("v2-two-tasks", {"sentiment": "label", "reason": "label_reason"})])
def test_an_earlier_schemas_folder_validates_and_names_its_gold_columns(folder, gold):
    assert validate_soft_labels(str(FIXTURES / folder))["rows"] == 48
    info = read_soft_label_info(str(FIXTURES / folder))
    assert {task: info.metadata.gold_column(task) for task in gold} == gold


@pytest.mark.slow
@pytest.mark.parametrize("folder, tasks", [("v1-one-task", None),
                                           ("v2-two-tasks", {"sentiment": {}, "reason": {}})])
def test_an_earlier_schemas_folder_trains_a_student(tmp_path, ray_session, tiny_teacher, folder, tasks):
    from kd_ray.stages.train import run_distill

    cfg = DistillConfig(soft_labels=str(FIXTURES / folder), output=str(tmp_path / "student"), tasks=tasks,
                        student={"kind": "cut", "model": str(tiny_teacher), "num_layers": 1, "ffn_size": None},
                        train={"epochs": 1, "batch_size": 16, "max_length": 32, "num_workers": 0})
    run_distill(cfg)
    info = json.loads((tmp_path / "student" / "kd_ray_train.json").read_text())
    assert len(info["history"]) == 1 and info["plan"]["rows"] == 48
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    expected = LABELS if tasks is None else [f"{t}:{n}" for t, names in (("sentiment", LABELS), ("reason", REASONS))
                                             for n in names]
    assert [config["id2label"][str(i)] for i in range(len(expected))] == expected
