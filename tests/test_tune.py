"""`kd-ray tune`: search-space errors before any trial, and a whole search with tiny models killed midway
then resumed without re-running finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import labeled_corpus

from kd_ray.cli import main as cli_main
from kd_ray.config import DistillConfig, TuneConfig, load_config
from kd_ray.stages.report import write_report
from kd_ray.stages.tune import trial_starts

SPACE = {"temperature": {"distribution": "loguniform", "low": 1.0, "high": 8.0},
         "alpha": {"distribution": "uniform", "low": 0.2, "high": 1.0}}


def _overrides(soft_labels: Path, validation: Path, out: Path, **extra) -> dict:
    return {"distill.soft_labels": str(soft_labels), "distill.validation.path": str(validation),
            "distill.student.num_layers": 1, "distill.student.ffn_size": None, "distill.train.epochs": 2, "distill.train.batch_size": 16,
            "distill.train.max_length": 32, "distill.train.shuffle_buffer": 0,
            "distill.train.num_cpus_per_worker": 0.5, "distill.train.max_failures": 0,
            "search.space": SPACE, "search.num_samples": 3, "output": str(out), **extra}


@pytest.mark.parametrize("space, expected", [
    ({"temperature": {"distribution": "uniform", "low": 4.0, "high": 4.0}}, "empty range: low=4.0 must be below high=4.0"),
    ({"temprature": {"distribution": "uniform", "low": 1.0, "high": 4.0}}, "search.space.temprature: unknown hyperparameter"),
    ({"alpha": {"distribution": "uniform", "low": 0.5, "high": 1.5}}, "value 1.5 is not allowed for loss.alpha"),
    ({"loss.kind": {"distribution": "choice", "values": ["kl", "cosine"]}}, "value 'cosine' is not allowed for loss.kind"),
    ({"learning_rate": {"distribution": "loguniform", "low": 0.0, "high": 1e-3}}, "loguniform range needs low > 0"),
    ({"alpha": {"distribution": "grid", "values": []}}, "needs a non-empty list of values"),
    ({"train": {"distribution": "choice", "values": [1]}}, "search.space.train: unknown hyperparameter"),
    ({"train.epochs": {"distribution": "choice", "values": [1, 3]}}, "the epoch budget cannot be searched with it"),
    ({}, "search.space"),
])
def test_bad_search_space_is_refused_before_any_trial(tmp_path, capsys, space, expected):
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({"distill": {"soft_labels": str(tmp_path / "none"),
                                                  "validation": {"path": str(tmp_path / "v.csv")}},
                                      "search": {"space": space}, "output": str(tmp_path / "out")}))
    assert cli_main(["tune", "--config", str(config)]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_tune_needs_a_validation_set(tmp_path):
    with pytest.raises(Exception, match="distill.validation is required"):
        load_config(TuneConfig, overrides={"distill.soft_labels": "x", "search.space": SPACE, "output": str(tmp_path)})


def test_trials_in_ray_trains_local_mode_are_refused_by_field(tmp_path):
    with pytest.raises(Exception, match=r"distill.train.num_workers is 0 \(Ray Train's local mode\), which a Ray Tune "
                       "trial cannot run"):
        load_config(TuneConfig, overrides={"distill.soft_labels": "x", "distill.validation.path": "v.csv",
                                           "distill.train.num_workers": 0, "search.space": SPACE, "output": str(tmp_path)})


def _terminated_trials(experiment: Path) -> set[str]:
    """Trials Tune's saved experiment state records as finished: what a restore will keep."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return set()
    done = set()
    for trial_json, _ in data["trial_data"]:
        trial = json.loads(trial_json)
        if trial["status"] == "TERMINATED":
            done.add(f"trial_{trial['trial_id'].rsplit('_', 1)[-1]}")
    return done


@pytest.mark.fault
def test_a_search_of_three_trials_killed_midway_resumes_and_writes_table_best_config_and_student(
        tmp_path, soft_labels, ray_session):
    """`kd-ray tune` with ASHA over 3 trials, SIGKILLed (no clean-up) once Tune's saved state records a trial
    done, then the same command again: finished trials are kept, not run again, and the search ends with its
    tables, best config, student and report as an uninterrupted one."""
    from transformers import AutoModelForSequenceClassification

    validation = labeled_corpus(tmp_path / "val", 120, seed=3)
    out = tmp_path / "tune"
    # Both runs are drivers of their own in the session's Ray instance: killing one ends its job, and
    # Ray frees everything the job held, as on a cluster when `ray job submit`'s driver dies.
    overrides = _overrides(soft_labels, validation, out, **{
        "ray.address": ray_session.get_runtime_context().gcs_address})
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump({"search": {"space": SPACE}}))
    flags = [f"--{k}={json.dumps(v) if isinstance(v, dict) or v is None else v}" for k, v in overrides.items()]
    command = [sys.executable, "-m", "kd_ray.cli", "tune", "--config", str(config), *flags]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # save Tune's state often, so a kill finds it recent
    experiment = out / "experiment"

    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 420
    while not _terminated_trials(experiment) and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    finished_before = _terminated_trials(experiment)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert len(finished_before) == 1, (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / "trials.csv").exists()  # it never got to the end

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the search" in second.stdout
    summary = json.loads((out / "tune_summary.json").read_text())

    table = pd.read_csv(out / "trials.csv")
    epochs = pd.read_csv(out / "trial_epochs.csv")
    assert list(table["trial"]) == [f"trial_0000{i}" for i in range(3)]
    assert (table.loc[0, "temperature"], table.loc[0, "alpha"]) == (2.0, 0.7)  # trial 0: the config's own values
    assert table["temperature"].between(1, 8).all() and table["alpha"].between(0.2, 1).all()
    for row in table.itertuples():
        # the status says what the per-epoch table shows: ASHA cut a trial short, or it ran every epoch
        ran = epochs[epochs["trial"] == row.trial]["epoch"].tolist()
        assert ran == list(range(1, row.epochs + 1))
        assert row.status == ("completed" if row.epochs == 2 else "stopped early")
    assert (table["status"] == "stopped early").sum() == summary["stopped_early"]
    # the trial finished before the kill is kept, not run again; at most the one running then starts twice
    starts = trial_starts(out)
    assert set(starts) == set(table["trial"])
    for trial in finished_before:
        assert starts[trial] == 1 and table.loc[table["trial"] == trial, "starts"].item() == 1
    assert sum(starts.values()) <= 3 + 1
    completed = table[table["status"] == "completed"]
    assert summary["best_value"] == pytest.approx(completed["val_macro_recall"].max())
    best = table[table["trial"] == summary["best_trial"]].iloc[0]

    # one Ray Train run per trial, all reading the same soft labels
    assert len(list((out / "ray_train").glob("trial-*"))) == 3  # a restarted trial resumes its own
    best_cfg = load_config(DistillConfig, out / "best_config.yaml")
    assert best_cfg.loss.temperature == pytest.approx(best["temperature"])
    assert best_cfg.loss.alpha == pytest.approx(best["alpha"])
    assert best_cfg.soft_labels == str(soft_labels) and best_cfg.output == str(out / "student")
    info = json.loads((out / "student" / "kd_ray_train.json").read_text())
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    # 'auto' keeps a trial's best epoch: the student is that epoch's, and the trial is scored by it
    assert info["exported_epoch"] == best["kept_epoch"]
    kept = info["history"][info["exported_epoch"] - 1]
    assert kept["val_macro_recall"] == pytest.approx(best["val_macro_recall"]) == max(
        h["val_macro_recall"] for h in info["history"])
    assert info["plan"]["tasks"][0]["temperature"] == pytest.approx(best["temperature"])
    AutoModelForSequenceClassification.from_pretrained(out / "student")

    # the report of a tuning-only folder: the search's plots, and a note where evaluation would be
    page = write_report(out).read_text()
    assert sorted(p.name for p in (out / "report").glob("*.png")) == ["trial_curves.png", "tuning_landscape.png"]
    assert page.count("src='data:image/png;base64,") == 2
    assert f"Best of 3 trials: <b>val_macro_recall {summary['best_value']:.4f}</b>" in page
    assert "No evaluation in this run folder" in page


def test_a_search_saved_before_a_config_field_existed_still_matches_its_config(tmp_path):
    """A spec written by an older kd-ray lacks fields added since (here distill.tasks); read through
    today's models they take their defaults, so the same command resumes instead of refusing."""
    import json

    from kd_ray.stages.tune import _saved_spec, _spec

    cfg = load_config(TuneConfig, overrides=_overrides(tmp_path / "labels", tmp_path / "val.csv", tmp_path / "tune"))
    old = _spec(cfg)
    del old["distill"]["tasks"], old["distill"]["validation"]["task_label_columns"]
    (tmp_path / "spec.json").write_text(json.dumps(old))
    assert _saved_spec(tmp_path / "spec.json") == _spec(cfg)
    old["search"]["num_samples"] = 99  # a different search still differs
    (tmp_path / "spec.json").write_text(json.dumps(old))
    assert _saved_spec(tmp_path / "spec.json") != _spec(cfg)
    (tmp_path / "spec.json").write_text(json.dumps({"search": {}}))
    assert _saved_spec(tmp_path / "spec.json") is None


def test_a_trial_is_named_by_its_index_also_when_tune_suffixed_its_folder():
    """A resumed search re-creates a trial that started after Tune's last saved state; the killed run's
    folder is in the way, so Tune names the new one ``trial_00002_6d8d``. trials.csv and the starts log
    must still agree on ``trial_00002``."""
    from kd_ray.stages.tune import trial_of_dir

    assert trial_of_dir("trial_00002") == "trial_00002"
    assert trial_of_dir("trial_00002_6d8d") == "trial_00002"
    assert trial_of_dir("something_else") == "something_else"


def test_asha_judges_a_student_narrowed_after_training_once_it_is_narrowed(tmp_path):
    from kd_ray.stages.tune import grace_period

    def grace(**overrides):
        return grace_period(load_config(TuneConfig, overrides={"distill.soft_labels": "x", "search.space": SPACE,
                                                               "distill.validation.path": "v",
                                                               "output": str(tmp_path), **overrides}))

    assert grace() == 5  # the default student: 2 wide epochs, 2 narrowing steps, then 3 at its final width
    assert grace(**{"distill.student.ffn_size": None}) == 1  # a full-width cut: the search's own grace period
    assert grace(**{"distill.student.narrow_steps": 1}) == 3  # narrowed in one step, judged from then on
    assert grace(**{"search.grace_period": 6}) == 6
    assert grace(**{"search.grace_period": 9}) == 7  # never past the last of the 7 epochs


def test_a_trial_exports_and_is_scored_by_the_epoch_train_keep_picks():
    from kd_ray.stages.tune import kept_epoch

    history = [{"epoch": 1, "keep_score": -1.0, "val_macro_recall": 0.90},  # wide: scored but never kept
               {"epoch": 2, "keep_score": 0.70, "val_macro_recall": 0.70},
               {"epoch": 3, "keep_score": 0.70, "val_macro_recall": 0.70},
               {"epoch": 4, "keep_score": float("nan"), "val_macro_recall": 0.60}]  # no score: never kept
    assert kept_epoch(history, best=True)["epoch"] == 2  # the earliest of equals
    assert kept_epoch(history, best=False)["epoch"] == 4
    unscored = [{"epoch": e, "val_macro_recall": v} for e, v in ((1, 0.9), (2, 0.7))]  # trained before train.keep
    assert kept_epoch(unscored, best=True)["epoch"] == 2
