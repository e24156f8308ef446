"""`kd-ray run` end to end with a tiny model: the exact files and row counts a run produces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import LABELS, REPO, random_posts
from kd_ray.cli import main as cli_main


def _csv(path: Path, n: int, seed: int, with_labels: bool = True) -> Path:
    import csv

    posts = random_posts(n, seed=seed, max_words=10)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"] if with_labels else ["id", "text"])
        for i, p in enumerate(posts):
            label = "negative" if "bad" in p else "positive" if "great" in p else "neutral"
            w.writerow([f"{path.stem}-{i}", p, label] if with_labels else [f"{path.stem}-{i}", p])
    return path


def pipeline_config(root: Path, tiny_teacher: Path) -> dict:
    """A small `kd-ray run` config: its data written under ``root``, its output ``root/run``."""
    data = root / "data"
    data.mkdir()
    files = {name: _csv(data / f"{name}.csv", n, seed, name != "transfer")
             for name, n, seed in [("train", 150, 1), ("transfer", 250, 2), ("validation", 60, 3), ("test", 80, 4)]}
    config = {
        "output": str(root / "run"), "labels": LABELS,
        "data": {"train": {"path": str(files["train"]), "id_column": "id", "label_column": "label", "normalize": True},
                 "transfer": {"path": str(files["transfer"]), "id_column": "id", "normalize": True},
                 "validation": {"path": str(files["validation"])}, "test": {"path": str(files["test"])}},
        "teacher": {"base_model": str(tiny_teacher),
                    "train": {"epochs": 1, "batch_size": 16, "max_length": 32, "num_cpus_per_worker": 0.5}},
        "student": {"num_layers": 1, "ffn_size": None},
        "distill": {"epochs": 2, "batch_size": 16, "max_length": 32, "num_cpus_per_worker": 0.5},
        "eval": {"max_length": 32, "timing_rows": 50, "timing_repeats": 1},
    }
    return config


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_teacher, ray_session):
    import yaml

    root = tmp_path_factory.mktemp("pipeline")
    (root / "run.yaml").write_text(yaml.safe_dump(pipeline_config(root, tiny_teacher)))
    assert cli_main(["run", "--config", str(root / "run.yaml")]) == 0
    return root


def test_run_writes_every_stage_output(pipeline_run):
    run = pipeline_run / "run"
    for model in ("teacher", "student", "student_alpha0"):
        assert {"config.json", "model.safetensors", "tokenizer.json", "kd_ray_train.json"} <= {
            p.name for p in (run / model).iterdir()}
    parts = sorted((run / "soft_labels").glob("part-*.parquet"))
    ids = pq.read_table(parts, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted([f"train-{i}" for i in range(150)] + [f"transfer-{i}" for i in range(250)])
    labels = pq.read_table(parts, columns=["label"]).column("label")
    assert labels.null_count == 250  # the transfer set's gold stays hidden
    assert json.loads((run / "soft_labels" / "_manifest.json").read_text())["rows"] == 400


def test_metrics_json_has_teacher_student_and_baseline(pipeline_run):
    metrics = json.loads((pipeline_run / "run" / "metrics.json").read_text())
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


def test_rerun_skips_finished_stages(pipeline_run, capsys):
    before = {p: p.stat().st_mtime for p in (pipeline_run / "run").glob("*/model.safetensors")}
    assert cli_main(["run", "--config", str(pipeline_run / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "skipping finetune" in out and "skipping distill" in out and "nothing to do" in out
    after = {p: p.stat().st_mtime for p in (pipeline_run / "run").glob("*/model.safetensors")}
    assert before == after


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("prepare_")))
def test_job_entry_points_run(script):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--help"], capture_output=True, text=True,
                            cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert "ray job submit" in (REPO / "jobs" / script).read_text()


def _report_images(page: str) -> int:
    return page.count("src='data:image/png;base64,")


def test_run_ends_with_a_report_that_says_it_has_no_tuning(pipeline_run):
    from matplotlib.image import imread

    run = pipeline_run / "run"
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


def test_run_with_export_checks_the_onnx_student_and_scores_its_int8_file(pipeline_run, capsys):
    """The trained stages are kept; the export runs, and the evaluation has the int8 file as a row."""
    pytest.importorskip("onnxruntime", reason="needs the export extra: pip install -e '.[export]'")
    import yaml

    config = yaml.safe_load((pipeline_run / "run.yaml").read_text())
    (pipeline_run / "export.yaml").write_text(yaml.safe_dump({**config, "export": True}))
    assert cli_main(["run", "--config", str(pipeline_run / "export.yaml")]) == 0
    out = capsys.readouterr().out
    run = pipeline_run / "run"
    assert "skipping distill" in out and "stage export done" in out
    parity = json.loads((run / "student_onnx" / "export.json").read_text())["parity"]
    assert parity["fp32"]["argmax_agreement"] == 1.0 and parity["rows"] == 80
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student_int8"]["size_mb"] < metrics["student"]["size_mb"] and metrics["student_int8"]["rows_per_s"] > 0


def test_run_with_a_tune_section_evaluates_the_best_trial(pipeline_run, capsys):
    """Last in this module: it turns the shared run into a tuned one."""
    import yaml

    config = yaml.safe_load((pipeline_run / "run.yaml").read_text())
    config["tune"] = {"space": {"temperature": {"distribution": "loguniform", "low": 1.0, "high": 8.0}},
                      "num_samples": 2, "scheduler": "fifo"}
    (pipeline_run / "tuned.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["run", "--config", str(pipeline_run / "tuned.yaml")]) == 0
    out = capsys.readouterr().out
    run = pipeline_run / "run"
    assert "skipping finetune" in out and f"report: {run / 'report.html'}" in out
    summary = json.loads((run / "tune" / "tune_summary.json").read_text())
    assert summary["trials"] == 2 and summary["student"] == str((run / "tune" / "student").resolve())
    best = json.loads((run / "tune" / "student" / "kd_ray_train.json").read_text())
    assert best["plan"]["tasks"][0]["temperature"] == pytest.approx(summary["best_values"]["temperature"])
    page = (run / "report.html").read_text()
    assert "Best of 2 trials" in page and "No tuning" not in page
    assert {"tuning_landscape.png", "trial_curves.png"} <= {p.name for p in (run / "report").glob("*.png")}
