"""`kd-ray run` end to end with a tiny model: the exact files and row counts a run produces.

The tests read the session's one finished run (conftest.finished_run); a run with a search and export, and its
rerun, is tests/test_multitask.py's (the same stages, with two tasks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import REPO


@pytest.mark.slow
def test_run_writes_every_stage_output(finished_run):
    run = finished_run.run
    for model in ("teacher", "student", "student_alpha0"):
        assert {"config.json", "model.safetensors", "tokenizer.json", "kd_ray_train.json"} <= {
            p.name for p in (run / model).iterdir()}
    parts = sorted((run / "soft_labels").glob("part-*.parquet"))
    ids = pq.read_table(parts, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted([f"train-{i}" for i in range(150)] + [f"transfer-{i}" for i in range(250)])
    labels = pq.read_table(parts, columns=["label"]).column("label")
    assert labels.null_count == 250  # the transfer set's gold stays hidden
    assert json.loads((run / "soft_labels" / "_manifest.json").read_text())["rows"] == 400


@pytest.mark.slow
def test_metrics_json_has_teacher_student_and_baseline(finished_run):
    metrics = json.loads((finished_run.run / "metrics.json").read_text())
    assert metrics["test"]["rows"] == 80
    for model in ("teacher", "student", "student_alpha0"):
        for key in ("accuracy", "macro_f1", "macro_recall", "params", "rows_per_s", "ece", "per_class_recall"):
            assert key in metrics[model], (model, key)
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert 0 <= metrics["student"]["agreement"] <= 1
    assert metrics["retention"]["macro_recall"] == pytest.approx(
        metrics["student"]["macro_recall"] / metrics["teacher"]["macro_recall"])
    assert metrics["speedup"] == pytest.approx(metrics["student"]["rows_per_s"] / metrics["teacher"]["rows_per_s"])
    assert metrics["labeling"]["rows"] == 400


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("prepare_")))
def test_job_entry_points_run(script):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--help"], capture_output=True, text=True,
                            cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert "ray job submit" in (REPO / "jobs" / script).read_text()


def _report_images(page: str) -> int:
    return page.count("src='data:image/png;base64,")


@pytest.mark.slow
def test_run_ends_with_a_report_that_says_it_has_no_tuning(finished_run):
    from matplotlib.image import imread

    run = finished_run.run
    page = (run / "report.html").read_text()
    pngs = sorted(p.stem for p in (run / "report").glob("*.png"))
    assert pngs == ["confusion", "efficiency", "quality", "soft_labels", "training"]
    assert _report_images(page) == len(pngs)  # the page embeds every plot: it needs no other file
    for name in pngs:
        height, width, _ = imread(run / "report" / f"{name}.png").shape
        assert height > 200 and width > 400
    assert "No tuning in this run" in page
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['retention']['macro_recall']:.1%}" in page
