"""`kd-ray run` as a person sees it: kd-ray's own lines on the console, Ray's and the libraries' in a log."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import kd_ray_command, pipeline_config


@pytest.mark.slow
def test_a_run_prints_its_stages_progress_and_result_and_logs_the_rest(finished_run):
    result = finished_run.console  # the session's run, by the kd-ray command in its own process
    lines = result.stdout.splitlines()
    assert result.stderr == "" and 10 < len(lines) <= 60, result.stdout + result.stderr
    for stage in ("finetune", "label", "distill", "distill_alpha0", "evaluate"):
        assert f"kd-ray run: stage {stage} started" in result.stdout and f"kd-ray run: stage {stage} done" in result.stdout
    assert "kd-ray distill: epoch 2/2" in result.stdout  # the training loop's progress (local mode: this process)
    assert "kd-ray label: wrote part-" in result.stdout  # a Ray write task's progress, forwarded by Ray
    assert "student keeps" in lines[-2] and "report.html" in lines[-1]
    assert not [line for line in lines if "INFO" in line or "pid=" in line or "Warning" in line], result.stdout
    log = (finished_run.run / "kd-ray.log").read_text()
    assert "pid=" in log and "kd-ray run: stage label done" in log  # the workers' output, and kd-ray's own lines


@pytest.mark.slow
def test_a_failing_run_prints_its_error_and_where_the_log_is(tmp_path, tiny_teacher, ray_session):
    config = pipeline_config(tmp_path, tiny_teacher)
    config["data"]["train"]["path"] = str(tmp_path / "missing.csv")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = kd_ray_command(["run", "--config", str(tmp_path / "run.yaml")], ray_session)
    assert result.returncode == 1
    log = Path(config["output"]) / "kd-ray.log"
    assert f"kd-ray run: error: corpus.path {str(tmp_path / 'missing.csv')!r} does not exist" in result.stderr
    assert str(log) in result.stderr.splitlines()[-1] and log.is_file()
    assert "Traceback" not in result.stdout + result.stderr
