"""`kd-ray run` as a person sees it: kd-ray's own lines on the console, Ray's and the libraries' in a log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from test_pipeline import pipeline_config


def _kd_ray(args: list[str], ray_session, **env) -> subprocess.CompletedProcess:
    """The kd-ray command in its own process, joined to the test session's Ray instance (one per machine)."""
    environment = {k: v for k, v in os.environ.items() if k != "KD_RAY_VERBOSE"} | env
    command = [str(Path(sys.executable).with_name("kd-ray")), *args,
               "--ray.address", ray_session.get_runtime_context().gcs_address]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)


def test_a_run_prints_its_stages_progress_and_result_and_logs_the_rest(tmp_path, tiny_teacher, ray_session):
    config = pipeline_config(tmp_path, tiny_teacher)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = _kd_ray(["run", "--config", str(tmp_path / "run.yaml")], ray_session)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    print(result.stdout)
    assert result.stderr == "" and 10 < len(lines) <= 60, result.stdout + result.stderr
    for stage in ("finetune", "label", "distill", "distill_alpha0", "evaluate"):
        assert f"kd-ray run: stage {stage} started" in result.stdout and f"kd-ray run: stage {stage} done" in result.stdout
    assert "kd-ray distill: epoch 2/2" in result.stdout  # a training worker's progress, forwarded by Ray
    assert "kd-ray label: wrote part-" in result.stdout  # a write task's progress
    assert "student keeps" in lines[-2] and "report.html" in lines[-1]
    assert not [line for line in lines if "INFO" in line or "pid=" in line or "Warning" in line], result.stdout
    log = (Path(config["output"]) / "kd-ray.log").read_text()
    assert "pid=" in log and "kd-ray run: stage label done" in log  # the workers' output, and kd-ray's own lines


def test_a_failing_run_prints_its_error_and_where_the_log_is(tmp_path, tiny_teacher, ray_session):
    config = pipeline_config(tmp_path, tiny_teacher)
    config["data"]["train"]["path"] = str(tmp_path / "missing.csv")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = _kd_ray(["run", "--config", str(tmp_path / "run.yaml")], ray_session)
    assert result.returncode == 1
    log = Path(config["output"]) / "kd-ray.log"
    assert f"kd-ray run: error: corpus.path {str(tmp_path / 'missing.csv')!r} does not exist" in result.stderr
    assert str(log) in result.stderr.splitlines()[-1] and log.is_file()
    assert "Traceback" not in result.stdout + result.stderr
