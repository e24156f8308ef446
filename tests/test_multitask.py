"""The multi-task student's Ray-free core: layout, loss, save/load, per-task export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_classifier, random_posts

from kd_ray.models.losses import distill_loss, multitask_loss
from kd_ray.models.multitask import (MultiTaskClassifier, export_task, joint_labels, read_layout, task_layout,
                                     write_layout)
from kd_ray.stages.plan import TaskPlan

TASKS = {"sentiment": ["negative", "neutral", "positive"],
         "reason": ["Late Flight", "Lost Luggage", "Customer Service Issue", "Other"]}


@pytest.fixture(scope="module")
def multitask_model(tmp_path_factory):
    """A tiny BERT with the joint 7-way output, saved with its task layout."""
    from transformers import AutoModelForSequenceClassification

    layout = task_layout(TASKS)
    labels = joint_labels(layout)
    folder = build_tiny_classifier(tmp_path_factory.mktemp("mt") / "student", labels=labels)
    write_layout(folder, layout)
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 7
    return folder


def test_layout_slices_the_joint_output_in_config_order():
    layout = task_layout(TASKS)
    assert [(t.name, t.start, t.stop) for t in layout] == [("sentiment", 0, 3), ("reason", 3, 7)]
    logits = torch.arange(14.0).reshape(2, 7)
    assert layout[1].of(logits).tolist() == [[3, 4, 5, 6], [10, 11, 12, 13]]
    assert joint_labels(layout)[3] == "reason:Late Flight"


@pytest.mark.parametrize("tasks, message", [
    ({"a:b": ["x", "y"]}, "must not contain"),
    ({"a": ["x"]}, "at least 2 distinct"),
    ({"a": ["x", "x"]}, "at least 2 distinct"),
])
def test_layout_refuses_bad_tasks(tasks, message):
    with pytest.raises(ValueError, match=message):
        task_layout(tasks)


def test_loss_is_the_weighted_sum_of_per_task_distillation_losses():
    torch.manual_seed(0)
    layout = task_layout(TASKS)
    logits = torch.randn(5, 7, requires_grad=True)
    teacher = {"sentiment": torch.randn(5, 3), "reason": torch.randn(5, 4)}
    gold = {"sentiment": torch.tensor([0, 1, 2, 0, 1]), "reason": torch.tensor([2, -100, -100, 1, -100])}
    losses = {"sentiment": {"kind": "kl", "temperature": 2.0, "alpha": 0.7, "weight": 1.0},
              "reason": {"kind": "kl", "temperature": 4.0, "alpha": 0.5, "weight": 0.5}}
    tasks = [TaskPlan(**t.model_dump(), **losses[t.name]) for t in layout]
    total, parts = multitask_loss(logits, tasks, teacher, gold)
    expected = {"sentiment": distill_loss(logits[:, :3], teacher["sentiment"], gold["sentiment"], temperature=2.0,
                                          alpha=0.7),
                "reason": distill_loss(logits[:, 3:], teacher["reason"], gold["reason"], temperature=4.0, alpha=0.5)}
    assert torch.allclose(parts["sentiment"], expected["sentiment"]) and torch.allclose(parts["reason"], expected["reason"])
    assert torch.allclose(total, expected["sentiment"] + 0.5 * expected["reason"])


def test_rows_without_a_tasks_gold_label_get_only_its_distillation_term():
    """A row with no reason label: its reason loss is the KL term alone, and its gradient does not
    depend on what gold index the row would have had."""
    torch.manual_seed(1)
    layout = task_layout(TASKS)
    logits = torch.randn(1, 7, requires_grad=True)
    teacher = {"sentiment": torch.randn(1, 3), "reason": torch.randn(1, 4)}
    tasks = [TaskPlan(**t.model_dump(), kind="kl", temperature=2.0, alpha=0.6) for t in layout]
    _, parts = multitask_loss(logits, tasks, teacher, {"sentiment": torch.tensor([1]), "reason": torch.tensor([-100])})
    kl = F.kl_div(F.log_softmax(logits[:, 3:] / 2, -1), F.log_softmax(teacher["reason"] / 2, -1), reduction="batchmean",
                  log_target=True)
    assert torch.allclose(parts["reason"], 0.6 * 4 * kl)
    parts["reason"].backward()
    assert logits.grad[:, :3].abs().sum() == 0  # the reason loss does not touch the sentiment head


def test_saved_model_predicts_every_task_in_one_pass(multitask_model):
    model = MultiTaskClassifier.from_pretrained(multitask_model)
    texts = random_posts(9, seed=3)
    out = model.predict(texts, batch_size=4)
    assert set(out) == set(TASKS)
    joint = model.logits(texts)
    for name, labels in TASKS.items():
        assert out[name]["probs"].shape == (9, len(labels))
        assert torch.allclose(torch.from_numpy(out[name]["probs"]).sum(1), torch.ones(9))
        assert all(label in labels for label in out[name]["labels"])
    assert out["reason"]["probs"].argmax(1).tolist() == joint[:, 3:].argmax(1).tolist()


def test_exported_task_folders_load_in_pipeline_and_match_the_multitask_model(multitask_model, tmp_path):
    from transformers import pipeline

    model = MultiTaskClassifier.from_pretrained(multitask_model)
    texts = random_posts(12, seed=4)
    joint = model.predict(texts)
    for name in TASKS:
        folder = export_task(multitask_model, name, tmp_path / name)
        classify = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
        for text, scores, probs in zip(texts, classify(texts), joint[name]["probs"]):
            by_label = {s["label"]: s["score"] for s in scores}
            assert [round(by_label[label], 5) for label in TASKS[name]] == pytest.approx(list(probs), abs=1e-5), text


def test_export_of_an_unknown_task_or_a_plain_folder_fails_clearly(multitask_model, tmp_path):
    from kd_ray.errors import ModelError

    with pytest.raises(ModelError, match="not 'emotion'"):
        export_task(multitask_model, "emotion", tmp_path / "x")
    plain = build_tiny_classifier(tmp_path / "plain")
    with pytest.raises(ModelError, match="not a kd-ray multi-task model"):
        read_layout(plain)


# ---------------------------------------------------------------------------- with Ray: label and distill

REASONS = ["Late Flight", "Lost Luggage", "Customer Service Issue", "Other"]


def _airline_like_corpus(folder, n: int = 300):
    """Sentiment on every row; a complaint reason only on negative rows (empty elsewhere), as in the
    airline tweets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    posts = random_posts(n, seed=5, max_words=12)
    sentiment = ["negative" if "bad" in p or "late" in p else "positive" if "great" in p else "neutral" for p in posts]
    reason = [REASONS[i % 4] if s == "negative" else "" for i, s in enumerate(sentiment)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(n)], "text": posts, "sentiment": sentiment,
                             "reason": reason}), folder / "posts.parquet")
    return folder / "posts.parquet"


@pytest.fixture(scope="module")
def two_task_labels(tmp_path_factory, tiny_teacher, ray_session):
    from kd_ray.config import LabelConfig, load_config
    from kd_ray.stages.label import run_label

    root = tmp_path_factory.mktemp("two-task")
    reason_teacher = build_tiny_classifier(root / "reason-teacher", labels=REASONS, seed=3)
    corpus = _airline_like_corpus(root / "corpus")
    cfg = load_config(LabelConfig, overrides={
        "corpus.path": str(corpus), "corpus.id_column": "id", "corpus.label_column": "sentiment",
        "corpus.task_label_columns": {"reason": "reason"},
        "teachers": [{"model": str(tiny_teacher), "name": "sentiment", "task": "sentiment"},
                     {"model": str(reason_teacher), "name": "reason", "task": "reason"}],
        "output.path": str(root / "labels")})
    summary = run_label(cfg)
    return root, corpus, summary


@pytest.mark.slow
def test_one_labeling_pass_writes_every_teachers_column_for_exactly_the_input_ids(two_task_labels, tiny_teacher):
    import pyarrow.parquet as pq

    from kd_ray.data.soft_labels import read_soft_label_info, validate_soft_labels

    root, corpus, summary = two_task_labels
    source = pq.read_table(corpus).to_pylist()
    info = read_soft_label_info(str(root / "labels"))
    table = pq.read_table(info.files)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(r["id"] for r in source) and summary.rows == len(source)
    for r in source:
        got = rows[r["id"]]
        assert len(got["sentiment_logits"]) == 3 and len(got["reason_logits"]) == 4
        assert got["label_sentiment"] == ["negative", "neutral", "positive"].index(r["sentiment"])  # schema 3
        assert got["label_reason"] == (REASONS.index(r["reason"]) if r["reason"] else None)
        assert "label" not in got
    teachers = {t.name: t for t in info.teachers}
    assert teachers["sentiment"].task == "sentiment" and teachers["reason"].task == "reason"
    assert teachers["reason"].labels == REASONS
    assert teachers["sentiment"].model == str(tiny_teacher) and teachers["reason"].weights_sha256
    assert info.metadata.gold == {"sentiment": ["negative", "neutral", "positive"], "reason": REASONS}
    validate_soft_labels(str(root / "labels"))


@pytest.mark.slow
@pytest.mark.parametrize("problem, message", [
    ("same task, other labels", "both for task 'sentiment' but predict different labels"),
    ("task without a teacher", "names tasks \\['emotion'\\] that no teacher labels"),
])
def test_labeling_config_errors_come_before_any_work(two_task_labels, tiny_teacher, tmp_path, problem, message):
    from kd_ray.config import LabelConfig, load_config
    from kd_ray.errors import KdRayUserError
    from kd_ray.stages.label import run_label

    root, corpus, _ = two_task_labels
    second = {"model": str(root / "reason-teacher"), "name": "other", "task": "sentiment"}
    columns = {}
    if problem == "task without a teacher":
        second["task"], columns = "reason", {"emotion": "reason"}
    cfg = load_config(LabelConfig, overrides={
        "corpus.path": str(corpus), "corpus.id_column": "id", "corpus.label_column": "sentiment",
        "corpus.task_label_columns": columns,
        "teachers": [{"model": str(tiny_teacher), "name": "sentiment", "task": "sentiment"}, second],
        "output.path": str(tmp_path / "labels")})
    with pytest.raises(KdRayUserError, match=message):
        run_label(cfg)
    assert not (tmp_path / "labels").exists()


def _multitask_distill(root, out, **overrides):
    from kd_ray.config import DistillConfig, load_config

    return load_config(DistillConfig, overrides={
        "soft_labels": str(root / "labels"), "output": str(out),
        "tasks": {"sentiment": {"weight": 1.0}, "reason": {"weight": 0.5, "temperature": 4.0}},
        "student.kind": "cut", "student.num_layers": 1, "student.ffn_size": None,
        "validation": {"path": str(root / "corpus" / "posts.parquet"), "label_column": "sentiment",
                       "task_label_columns": {"reason": "reason"}},
        "train.epochs": 1, "train.batch_size": 16, "train.max_length": 32, "train.learning_rate": 1e-3,
        **overrides})


@pytest.mark.slow
def test_multitask_student_trains_one_head_per_task_and_exports_them(two_task_labels, tmp_path):
    from transformers import pipeline

    from kd_ray.stages.train import read_run_info, run_distill

    root, corpus, _ = two_task_labels
    run_distill(_multitask_distill(root, tmp_path / "student", **{"train.num_workers": 0}))
    info = read_run_info(str(tmp_path / "student"))
    last = info["history"][-1]
    for key in ("val_sentiment_macro_recall", "val_reason_macro_recall", "val_macro_recall"):
        assert 0.0 <= last[key] <= 1.0, key
    assert last["val_macro_recall"] == pytest.approx((last["val_sentiment_macro_recall"]
                                                      + last["val_reason_macro_recall"]) / 2)
    job_tasks = {t["name"]: t for t in info["plan"]["tasks"]}
    assert job_tasks["reason"]["temperature"] == 4.0 and job_tasks["reason"]["gold_column"] == "label_reason"
    model = MultiTaskClassifier.from_pretrained(tmp_path / "student")
    assert model.tasks == {"sentiment": ["negative", "neutral", "positive"], "reason": REASONS}
    texts = random_posts(6, seed=11)
    joint = model.predict(texts)
    folder = export_task(tmp_path / "student", "reason", tmp_path / "reason-only")
    scores = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")(texts)
    assert [max(s, key=lambda x: x["score"])["label"] for s in scores] == joint["reason"]["labels"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    ({"tasks": {"emotion": {}}}, "no label column for task 'emotion'"),
    ({"tasks": {"reason": {"teachers": {"sentiment": 1.0}}}}, "not teachers of task 'reason'"),
])
def test_student_tasks_the_soft_labels_cannot_feed_are_refused_before_training(two_task_labels, tmp_path, overrides,
                                                                              message):
    from kd_ray.errors import SoftLabelError
    from kd_ray.stages.train import run_distill

    root, _, _ = two_task_labels
    with pytest.raises(SoftLabelError, match=message):
        run_distill(_multitask_distill(root, tmp_path / "student", **overrides))
    assert not (tmp_path / "student").exists()


def _multitask_run_config(tmp_path, tiny_teacher) -> dict:
    """A two-task `kd-ray run` config over an airline-like corpus split into train/transfer/validation/test."""
    import pyarrow.parquet as pq

    corpus = _airline_like_corpus(tmp_path / "data", n=240)
    frame = pq.read_table(corpus).to_pandas()
    files = {}
    for name, part in {"train": frame[:100], "transfer": frame[100:180], "validation": frame[180:210],
                       "test": frame[210:]}.items():
        files[name] = tmp_path / "data" / f"{name}.csv"
        (part[["id", "text"]] if name == "transfer" else part).to_csv(files[name], index=False)
    # the teachers train in Ray Train's local mode; the student on a worker group, as a search's trials must
    fast = {"epochs": 1, "batch_size": 16, "max_length": 32, "num_workers": 0}
    config = {
        "output": str(tmp_path / "run"),
        "tasks": {"sentiment": {"label_column": "sentiment", "labels": ["negative", "neutral", "positive"],
                                "teacher": {"base_model": str(tiny_teacher), "train": fast}},
                  "reason": {"label_column": "reason", "labels": REASONS,
                             "teacher": {"base_model": str(tiny_teacher), "train": fast}, "loss": {"weight": 0.5}}},
        "data": {"train": {"path": str(files["train"]), "id_column": "id"},
                 "transfer": {"path": str(files["transfer"]), "id_column": "id"},
                 "validation": {"path": str(files["validation"])}, "test": {"path": str(files["test"])}},
        "student": {"num_layers": 1, "ffn_size": None},
        "distill": {**fast, "num_workers": 1, "num_cpus_per_worker": 0.5},
        "eval": {"max_length": 32, "timing_rows": 40, "timing_repeats": 1},
    }
    return config, frame


@pytest.mark.slow
def test_a_multitask_run_searches_exports_and_scores_each_task_and_a_rerun_skips_every_stage(
        tmp_path, tiny_teacher, ray_session, capsys):
    """`kd-ray run` with tasks, a search and export: both teachers fine-tuned (the reason teacher on its labeled
    rows only), one labeling pass, a search over one task's alpha and weight, scored on the mean validation
    score, whose best student (two heads) is exported to ONNX and evaluated per task beside its int8 file and
    its alpha=0 twin. The same command again finds every stage done."""
    pytest.importorskip("onnxruntime", reason="needs the export extra: pip install -e '.[export]'")
    import pandas as pd
    import yaml

    from kd_ray.cli import main as cli_main
    from kd_ray.data.soft_labels import read_soft_label_info

    config, frame = _multitask_run_config(tmp_path, tiny_teacher)
    config["tune"] = {"space": {"tasks.reason.alpha": {"distribution": "grid", "values": [0.3, 0.9]},
                                "tasks.reason.weight": {"distribution": "choice", "values": [0.25]}},
                      "num_samples": 1, "include_default": False, "scheduler": "fifo",
                      "max_concurrent_trials": 2}  # both trials at once: each starts its own worker group
    config["export"] = True
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # task order is the YAML's
    assert cli_main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert f"report: {run / 'report.html'}" in out and "stage export done" in out
    reason_job = json.loads((run / "teachers" / "reason" / "kd_ray_train.json").read_text())
    assert reason_job["plan"]["rows"] == int((frame[:100]["reason"] != "").sum())  # rows without a reason skipped
    info = read_soft_label_info(str(run / "soft_labels"))
    assert [t.name for t in info.teachers] == ["sentiment", "reason"] and info.num_rows == 180

    # the search: both grid values, the chosen weight, the best trial's values in its config and its student
    table = pd.read_csv(run / "tune" / "trials.csv")
    assert sorted(table["tasks.reason.alpha"]) == [0.3, 0.9] and set(table["tasks.reason.weight"]) == {0.25}
    summary = json.loads((run / "tune" / "tune_summary.json").read_text())
    assert summary["trials"] == 2 and summary["student"] == str((run / "tune" / "student").resolve())
    best = yaml.safe_load((run / "tune" / "best_config.yaml").read_text())
    assert best["tasks"]["reason"]["alpha"] == summary["best_values"]["tasks.reason.alpha"]
    assert best["tasks"]["reason"]["weight"] == 0.25 and best["tasks"]["sentiment"]["weight"] == 1.0
    job = json.loads((run / "tune" / "student" / "kd_ray_train.json").read_text())
    assert {t["name"]: t["alpha"] for t in job["plan"]["tasks"]}["reason"] == summary["best_values"]["tasks.reason.alpha"]
    assert not (run / "student").exists()  # the search's best student is the run's
    assert MultiTaskClassifier.from_pretrained(run / "tune" / "student").tasks["reason"] == REASONS
    assert MultiTaskClassifier.from_pretrained(run / "student_alpha0").tasks["reason"] == REASONS

    # the export stage checks the ONNX files against PyTorch on every head; the evaluation scores the int8 file
    parity = json.loads((run / "student_onnx" / "export.json").read_text())["parity"]
    assert parity["fp32"]["argmax_agreement"] == 1.0 and parity["rows"] == 30
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tasks"]["reason"]["rows"] == int((frame[210:]["reason"] != "").sum())
    for task in ("sentiment", "reason"):
        for name in ("teacher", "student", "student_alpha0", "student_int8"):
            assert 0 <= metrics["tasks"][task][name]["macro_recall"] <= 1
    assert set(metrics["rows_per_s"]) == {"teachers", "student", "student_alpha0", "student_int8"}
    page = (run / "report.html").read_text()
    assert "Best of 2 trials" in page and "No tuning" not in page
    assert {p.stem for p in (run / "report").glob("*.png")} == {"confusion", "efficiency", "quality", "soft_labels", "training",
                                                                "trial_curves", "tuning_landscape"}  # every plot, per task

    # the same config again: every stage is found done, no model is written again
    before = {p: p.stat().st_mtime_ns for p in run.rglob("model.safetensors")}
    assert cli_main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "skipping finetune_sentiment" in out and "skipping distill_alpha0" in out and "nothing to do" in out
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("model.safetensors")} and len(before) >= 4


@pytest.mark.parametrize("space, message", [
    ({"tasks.emotion.alpha": {"distribution": "uniform", "low": 0.3, "high": 1.0}}, "has no tasks.emotion"),
    ({"tasks.reason.alpha": {"distribution": "uniform", "low": 0.3, "high": 2.0}}, "value 2.0 is not allowed"),
    ({"tasks.reason": {"distribution": "choice", "values": [1]}}, "unknown hyperparameter"),
])
def test_tune_search_space_reaches_per_task_settings_and_names_bad_ones(space, message):
    from kd_ray.config import ConfigError, TuneConfig, load_config

    base = {"distill": {"soft_labels": "x", "validation": {"path": "v"}, "tasks": {"sentiment": {}, "reason": {}}},
            "output": "o"}
    with pytest.raises(ConfigError, match=message):
        load_config(TuneConfig, overrides={**base, "search": {"space": space}})


def test_teachers_that_share_a_tokenizer_tokenize_each_block_once_with_the_same_logits(tmp_path, tiny_teacher):
    """Two teachers with one tokenizer: one encoding per block serves both, and
    each teacher's logits are what it computes alone. Another max_length is another encoding."""
    import numpy as np
    import pyarrow as pa

    from kd_ray.config import TeacherConfig
    from kd_ray.models.teacher import TeacherLabeler

    other = build_tiny_classifier(tmp_path / "reason", labels=REASONS, seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # fine-tuned from one base: one tokenizer
        (other / name).write_bytes((tiny_teacher / name).read_bytes())
    texts = random_posts(50, seed=8, max_words=40)
    block = pa.table({"id": [f"r{i}" for i in range(50)], "text": texts, "label": pa.nulls(50, pa.int32()),
                      "reject_reason": pa.nulls(50, pa.string())})
    teachers = [TeacherConfig(model=str(tiny_teacher), name="sentiment", max_length=16),
                TeacherConfig(model=str(other), name="reason", max_length=16)]
    shared = TeacherLabeler(teachers, batch_size=8)
    assert shared.tokenizers.of_teacher == [0, 0]
    together = shared(block)
    for t in teachers:
        alone = TeacherLabeler([t], batch_size=8)(block)
        np.testing.assert_allclose(np.array(together.column(f"{t.name}_logits").to_pylist()),
                                   np.array(alone.column(f"{t.name}_logits").to_pylist()), atol=1e-6)
    mixed = TeacherLabeler([teachers[0], teachers[1].model_copy(update={"max_length": 32})], batch_size=8)
    assert mixed.tokenizers.of_teacher == [0, 1]


@pytest.mark.slow
def test_a_single_task_student_of_another_tasks_teacher_learns_that_tasks_gold(two_task_labels, tmp_path):
    """`loss.teachers` naming the reason teacher: the one head learns reason, from its own gold column (every task
    has one since soft-label schema 3); teachers of two tasks for one head are refused."""
    from kd_ray.config import DistillConfig, load_config
    from kd_ray.errors import SoftLabelError
    from kd_ray.stages.plan import distill_plan
    from kd_ray.stages.train import run_distill

    root, _, _ = two_task_labels
    base = {"soft_labels": str(root / "labels"), "output": str(tmp_path / "student"),
            "loss.teachers": {"reason": 1.0}, "student.num_layers": 1, "student.ffn_size": None,
            "train.epochs": 1, "train.max_length": 32}
    (task,) = distill_plan(load_config(DistillConfig, overrides={**base, "loss.alpha": 0.7}))[0].tasks
    assert (task.name, task.gold_column, task.labels) == ("reason", "label_reason", tuple(REASONS))
    with pytest.raises(SoftLabelError, match="one head learns one task"):
        run_distill(load_config(DistillConfig, overrides={**base, "loss.teachers": {"reason": 1.0, "sentiment": 1.0}}))
