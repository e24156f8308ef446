"""Fine-tuning and distillation on Ray Train + Accelerate, with tiny models on CPU."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LABELS, failing_after_epoch, labeled_corpus

from kd_ray.config import ConfigError, DistillConfig, FinetuneConfig, load_config
from kd_ray.errors import KdRayUserError, ModelError, SoftLabelError, unwrap_user_error
from kd_ray.stages.train import read_run_info, run_distill, run_finetune

FAST = {"train.epochs": 2, "train.batch_size": 16, "train.max_length": 32, "train.shuffle_buffer": 0,
        "train.num_cpus_per_worker": 0.5, "train.max_failures": 0}
# The loop's logic needs no worker group: Ray Train's local mode runs it in this process, in about a second
# (a one-worker run takes ten). Data parallelism, checkpoints, resuming and keep: best keep real workers.
LOCAL = {"train.num_workers": 0}


def _distill_cfg(soft_labels: Path, out: Path, **overrides) -> DistillConfig:
    return load_config(DistillConfig, overrides={"soft_labels": str(soft_labels), "output": str(out),
                                                 "student.num_layers": 1, "student.ffn_size": None,
                                                 **FAST, **overrides})


@pytest.mark.slow
def test_finetune_exports_a_folder_that_label_and_pipeline_accept(tmp_path, tiny_teacher, ray_session):
    from transformers import pipeline

    from kd_ray.models.teacher import describe_model

    data = labeled_corpus(tmp_path / "data", 200)
    cfg = load_config(FinetuneConfig, overrides={
        "data.path": str(data), "data.label_column": "label", "base_model": str(tiny_teacher),
        "labels": LABELS, "output": str(tmp_path / "teacher"), "validation.path": str(data), **FAST, **LOCAL})
    run_finetune(cfg)
    info = read_run_info(str(tmp_path / "teacher"))
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    assert info["history"][0]["rows"] == 200 and "val_macro_recall" in info["history"][-1]
    assert describe_model(str(tmp_path / "teacher")).labels == LABELS
    assert not (tmp_path / "teacher" / "train_state.pt").exists()
    predictions = pipeline("text-classification", model=str(tmp_path / "teacher"))(["great flight", "awful seat"])
    assert {p["label"] for p in predictions} <= set(LABELS)


@pytest.mark.slow
@pytest.mark.parametrize("keep, validation", [("last", True), ("auto", False), ("auto", True)])
def test_keep_last_or_auto_without_validation_or_workers_exports_the_last_epoch(tmp_path, soft_labels, keep,
                                                                                validation):
    cfg = _distill_cfg(soft_labels, tmp_path / "student", **{"train.keep": keep}, **LOCAL, **(
        {"validation.path": str(labeled_corpus(tmp_path / "val", 100))} if validation else {}))
    run_distill(cfg)
    info = read_run_info(str(tmp_path / "student"))
    assert info["exported_epoch"] == 2 and not any("keep_score" in h for h in info["history"])


@pytest.mark.slow
def test_a_narrowed_student_resumes_at_its_width_refuses_a_lost_weight_and_exports_the_best_narrow_epoch(
        tmp_path, soft_labels, monkeypatch):
    """One wide epoch, then two narrowing steps (64 -> 32 -> 16), then one more epoch at 16. Stopped after the wide epoch: resumes wide and narrows; stopped again after the first step:
    the checkpoint holds a narrowed model, which the resumed run must rebuild (narrow() once, to the first
    step's width) before loading it, and then narrow on. A checkpoint that lost a weight is refused on resume,
    naming the key. keep: best exports the best narrow epoch, which Ray Train kept beside the latest across the
    restarts, as a plain narrow model. The same config over rewritten soft labels (e.g. relabeled after a
    corpus fix) must not pick up that run's checkpoints at all."""
    import filecmp
    import os
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from kd_ray.stages.plan import distill_plan
    from kd_ray.stages.train import run_name

    labels = tmp_path / "soft_labels"
    shutil.copytree(soft_labels, labels)
    cfg = _distill_cfg(labels, tmp_path / "student", **{
        "student.ffn_size": 16, "student.wide_epochs": 1, "student.narrow_steps": 2, "train.epochs": 2,
        "train.keep": "best", "train.learning_rate": 3e-3,
        "validation.path": str(labeled_corpus(tmp_path / "val", 100))})
    with failing_after_epoch(1, monkeypatch):
        run_distill(cfg)
    with failing_after_epoch(2, monkeypatch):
        run_distill(cfg)

    def checkpoints() -> dict:
        return {torch.load(c / "train_state.pt", weights_only=False)["epoch"]: c
                for c in (tmp_path / "ray_train").glob("*/checkpoint_*") if (c / "train_state.pt").is_file()}

    checkpoint = checkpoints()[2]  # the one a resume loads: after the first narrowing step
    intact = (checkpoint / "model.safetensors").read_bytes()
    weights = load_file(checkpoint / "model.safetensors")
    key = next(k for k in weights if k.endswith("classifier.weight"))
    save_file({k: v for k, v in weights.items() if k != key}, checkpoint / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(Exception) as err:
        run_distill(cfg)
    error = unwrap_user_error(err.value)
    assert isinstance(error, ModelError) and key in str(error) and "missing keys" in str(error), err.value
    assert not (tmp_path / "student").exists()
    (checkpoint / "model.safetensors").write_bytes(intact)

    run_distill(cfg)
    info = read_run_info(str(tmp_path / "student"))
    history = info["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # the whole run's history, whichever epoch is kept
    assert [h["resumed_from_epoch"] for h in history] == [0, 1, 2, 2]
    assert [h["ffn_size"] for h in history] == [64, 32, 16, 16]
    assert all("val_macro_recall" in h for h in history)
    assert all(h["rows"] == 800 for h in history)  # one worker: every row (two split them: test_reproducible.py)
    assert history[0]["keep_score"] == history[1]["keep_score"] == -1.0  # wide or half-narrowed: never the student
    best = max(history[2:], key=lambda h: (h["val_macro_recall"], -h["epoch"]))
    assert info["exported_epoch"] == best["epoch"]
    kept = checkpoints()
    assert best["epoch"] in kept and 4 in kept
    assert filecmp.cmp(kept[best["epoch"]] / "model.safetensors", tmp_path / "student" / "model.safetensors",
                       shallow=False)
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")  # a plain narrow model
    assert student.config.intermediate_size == 16
    assert student.bert.encoder.layer[0].intermediate.dense.weight.shape == (16, 32)

    # a run resumes the Ray Train run of its name, which the plan names, soft labels' files included
    (run,) = [d.name for d in (tmp_path / "ray_train").iterdir() if d.is_dir()]
    assert run == run_name(cfg.output, distill_plan(cfg)[0])
    for part in labels.glob("part-*.parquet"):
        stat = part.stat()
        os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as a rewrite would leave it
    assert run_name(cfg.output, distill_plan(cfg)[0]) != run  # so this config starts afresh, not from it


@pytest.mark.slow
def test_alpha_zero_trains_on_gold_rows_only(tmp_path, soft_labels):
    cfg = _distill_cfg(soft_labels, tmp_path / "student", **{"loss.alpha": 0.0, "train.epochs": 1}, **LOCAL)
    run_distill(cfg)
    assert read_run_info(str(tmp_path / "student"))["history"][0]["rows"] == 400


@pytest.mark.parametrize("overrides, message", [
    ({"loss.temperature": 0}, "loss.temperature"),
    ({"loss.alpha": 1.5}, "loss.alpha"),
    ({"loss.alpha": -0.1}, "loss.alpha"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"student.kind": "tiny"}, "student.kind"),
    ({"train.keep": "best"}, "train.keep"),  # needs validation data
    ({"train.keep": "first"}, "train.keep"),
    ({"train.keep": "best", "validation.path": "v", "train.num_workers": 0}, "train.keep is 'best', but train.num_workers is 0"),
])
def test_bad_distill_config_names_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(DistillConfig, overrides={"soft_labels": "x", "output": str(tmp_path), **overrides})


@pytest.mark.slow
def test_student_path_that_does_not_exist(tmp_path, soft_labels):
    cfg = _distill_cfg(soft_labels, tmp_path / "student",
                       **{"student.kind": "pretrained", "student.model": str(tmp_path / "missing")}, **LOCAL)
    with pytest.raises(Exception) as err:
        run_distill(cfg)
    assert isinstance(unwrap_user_error(err.value), ModelError)
    assert "does not exist" in str(unwrap_user_error(err.value))


@pytest.mark.slow
def test_soft_labels_with_another_label_set_are_refused(tmp_path, soft_labels, tiny_teacher):
    from conftest import build_tiny_classifier

    other = build_tiny_classifier(tmp_path / "other", labels=["neg", "pos"])
    cfg = _distill_cfg(soft_labels, tmp_path / "student", **{"student.kind": "cut", "student.model": str(other)},
                       **LOCAL)
    with pytest.raises(Exception) as err:
        run_distill(cfg)
    assert "labels" in str(unwrap_user_error(err.value))


@pytest.mark.slow
def test_unknown_teacher_in_loss_is_refused(tmp_path, soft_labels):
    cfg = _distill_cfg(soft_labels, tmp_path / "student", **{"loss.teachers": {"nobody": 1.0}})
    with pytest.raises(SoftLabelError, match="nobody"):
        run_distill(cfg)


@pytest.mark.slow
def test_empty_training_set_is_refused(tmp_path, soft_labels):
    # soft labels with no gold at all, then alpha=0: nothing to learn from
    root = tmp_path / "unlabeled"
    table = pq.read_table(next(soft_labels.glob("part-*.parquet")))
    unlabeled = table.set_column(table.schema.get_field_index("label"), table.schema.field("label"),
                                 pa.nulls(table.num_rows, pa.int32()))
    root.mkdir()
    pq.write_table(unlabeled, root / "part-00000.parquet")
    cfg = _distill_cfg(root, tmp_path / "student", **{"loss.alpha": 0.0})
    with pytest.raises(SoftLabelError, match="empty"):
        run_distill(cfg)


def test_missing_soft_label_folder(tmp_path):
    cfg = _distill_cfg(tmp_path / "nothing", tmp_path / "student")
    with pytest.raises(KdRayUserError, match="does not exist"):
        run_distill(cfg)


@pytest.mark.slow
def test_nan_teacher_logits_stop_training_with_the_rows_named(tmp_path, soft_labels):
    import numpy as np

    root = tmp_path / "nan"
    root.mkdir()
    parts = sorted(soft_labels.glob("part-*.parquet"))
    for part in parts[1:]:
        (root / part.name).write_bytes(part.read_bytes())
    table = pq.read_table(parts[0])
    logits = np.array(table.column("teacher_logits").to_pylist(), dtype=np.float32)
    logits[5, 0] = np.nan  # one value in one row
    column = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), logits.shape[1])
    index = table.schema.get_field_index("teacher_logits")
    bad_id = table.column("id")[5].as_py()
    pq.write_table(table.set_column(index, table.schema.field(index), column), root / parts[0].name)
    cfg = _distill_cfg(root, tmp_path / "student", **{"train.epochs": 1}, **LOCAL)
    with pytest.raises(Exception) as err:
        run_distill(cfg)
    error = unwrap_user_error(err.value)
    assert isinstance(error, SoftLabelError), err.value
    assert "NaN/Inf in column 'teacher_logits'" in str(error) and bad_id in str(error)
    assert not (tmp_path / "student").exists()
