"""Representation distillation: the teacher's stored sentence representation, the loss that matches it,
and students cut from the teacher's bottom/top layers or from another pretrained encoder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import LABELS, build_tiny_classifier, random_posts

from kd_ray.config import DistillConfig, StudentConfig, load_config
from kd_ray.data.soft_labels import METADATA_KEY, read_soft_label_info
from kd_ray.errors import SoftLabelError
from kd_ray.models.components import RepresentationTerm
from kd_ray.models.losses import multitask_loss, pool, representation_loss
from kd_ray.stages.plan import TaskPlan, distill_plan

FAST = {"train.epochs": 2, "train.batch_size": 16, "train.max_length": 32, "train.shuffle_buffer": 0,
        "train.num_cpus_per_worker": 0.5, "train.max_failures": 0, "student.num_layers": 1, "student.ffn_size": None}


# ---------------------------------------------------------------------------- pure torch


def test_mean_pooling_averages_the_real_tokens_and_cls_takes_the_first():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling must be one of \\['mean', 'cls'\\]"):
        pool(hidden, mask, "max")


def test_representation_loss_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert representation_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)  # cosine ignores scale
    assert representation_loss(a, -a).item() == pytest.approx(2.0)
    assert representation_loss(a, 3 * a, "mse").item() == pytest.approx(torch.nn.functional.mse_loss(a, 3 * a).item())
    with pytest.raises(ValueError, match="both be \\(batch, width\\)"):
        representation_loss(a, a[:, :1])


def _student(tmp_path: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = build_tiny_classifier(tmp_path / "student", num_layers=1, seed=4)
    return AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _task(beta: float, **more) -> TaskPlan:
    return TaskPlan(name="sentiment", labels=tuple(LABELS), teachers={"teacher_logits": 1.0}, kind="kl",
                    temperature=2.0, alpha=0.5, beta=beta, representation="teacher_representation",
                    representation_width=48, **more)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_the_representation_term_reaches_the_projection_and_the_student(tmp_path, kind):
    model, tokenizer = _student(tmp_path)
    task = _task(0.7, representation_loss=kind)
    other = TaskPlan(name="b", labels=("x", "y"), start=3, teachers={"b_logits": 1.0}, alpha=1.0)  # no target
    term = RepresentationTerm(SimpleNamespace(tasks=[task, other]), model)
    assert term.hidden_states and list(term.module.maps) == ["sentiment"]  # the projection the loop optimizes
    enc = tokenizer(["great flight", "awful awful seat and bag"], padding=True, return_tensors="pt")
    out = model(**enc, output_hidden_states=True)
    targets = {"teacher_representation": torch.randn(2, 48)}
    terms = term.loss_terms(out, enc, targets.__getitem__)
    projected = term.module(out.hidden_states[-1], enc["attention_mask"])["sentiment"]
    assert list(terms) == ["sentiment"]
    assert terms["sentiment"].item() == pytest.approx(0.7 * representation_loss(projected, targets[
        "teacher_representation"], kind).item())
    terms["sentiment"].backward()
    assert term.module.maps["sentiment"].weight.grad.abs().sum() > 0
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_the_representation_term_checkpoints_its_projection_and_is_idle_without_a_target(tmp_path):
    model, _ = _student(tmp_path)
    plan = SimpleNamespace(tasks=[_task(0.5)])
    term, fresh = RepresentationTerm(plan, model), RepresentationTerm(plan, model)
    state = term.state_dict()
    assert list(state) == ["projection"]  # the checkpoint's key since the first representation runs
    assert list(state["projection"]) == ["maps.sentiment.weight", "maps.sentiment.bias"]
    assert not torch.equal(fresh.module.maps["sentiment"].weight, term.module.maps["sentiment"].weight)
    fresh.load_state_dict({"epoch": 1, **state})
    assert torch.equal(fresh.module.maps["sentiment"].weight, term.module.maps["sentiment"].weight)
    idle = RepresentationTerm(SimpleNamespace(tasks=[_task(0.0).model_copy(update={"representation": None})]), model)
    assert idle.module is None and not idle.hidden_states and idle.loss_terms(None, {}, None) == {}
    assert idle.state_dict() == {"projection": None}
    idle.load_state_dict({"epoch": 1, "projection": None})


def test_multitask_loss_adds_each_extra_term_to_its_task_before_the_weight():
    logits = torch.randn(4, 5, requires_grad=True)
    first = _task(1.0).model_copy(update={"name": "a", "weight": 2.0})
    second = TaskPlan(name="b", labels=("x", "y"), start=3, teachers={"b_logits": 1.0}, alpha=1.0)
    teacher = {"a": torch.randn(4, 3), "b": torch.randn(4, 2)}
    gold = {"a": torch.full((4,), -100), "b": torch.full((4,), -100)}
    total, with_terms = multitask_loss(logits, [first, second], teacher, gold, [{"a": torch.tensor(0.25)},
                                                                                 {"a": torch.tensor(0.5)}])
    plain, without = multitask_loss(logits, [first, second], teacher, gold)
    assert with_terms["a"].item() == pytest.approx(without["a"].item() + 0.75)
    assert with_terms["b"].item() == pytest.approx(without["b"].item())
    assert total.item() == pytest.approx(plain.item() + 2.0 * 0.75)


# ---------------------------------------------------------------------------- labeling


@pytest.mark.slow
def test_labeling_stores_the_mean_pooled_representation_with_its_metadata(rep_labels, tiny_teacher):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = read_soft_label_info(str(rep_labels))
    assert info.metadata.stored()["teachers"][0]["representation"] == {"pooling": "mean", "layer": "last", "width": 32,
                                                              "dtype": "float16"}
    table = pq.read_table(info.files)
    assert table.schema.field("teacher_representation").type == pa.list_(pa.float16(), 32)
    assert not table.schema.field("teacher_representation").nullable
    rows = table.slice(0, 40)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    enc = tokenizer(rows.column("text").to_pylist(), truncation=True, max_length=128, padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    direct = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    stored = np.array(rows.column("teacher_representation").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=2e-3)  # float16 storage


@pytest.mark.slow
def test_a_teacher_without_a_representation_keeps_its_metadata_and_columns(soft_labels):
    info = read_soft_label_info(str(soft_labels))
    assert "representation" not in info.metadata.stored()["teachers"][0]  # and so the config hash of such runs stays
    assert not [n for n in pq.read_schema(info.files[0]).names if n.endswith("_representation")]


def test_the_labeler_without_ray_pools_the_first_token(tiny_teacher):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_ray.config import TeacherConfig
    from kd_ray.models.teacher import TeacherLabeler

    texts = random_posts(10, seed=3)
    labeler = TeacherLabeler([TeacherConfig(model=str(tiny_teacher), representation="cls")], batch_size=4)
    out = labeler(pa.table({"id": [str(i) for i in range(10)], "text": texts, "label": pa.nulls(10, pa.int32()),
                            "reject_reason": pa.nulls(10, pa.string())}))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    enc = AutoTokenizer.from_pretrained(tiny_teacher)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = model(**enc, output_hidden_states=True).hidden_states[-1][:, 0].numpy()
    stored = np.array(out.column("teacher_representation").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(stored, cls, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_a_representation_column_narrower_than_its_metadata_is_refused(rep_labels, tmp_path):
    import shutil

    copy = tmp_path / "labels"
    shutil.copytree(rep_labels, copy)
    part = sorted(copy.glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["teachers"][0]["representation"]["width"] = 16
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True)}), part)
    with pytest.raises(SoftLabelError, match="column 'teacher_representation' holds fixed_size_list<.*>\\[32\\], but "
                       "teacher 'teacher''s metadata gives its representation width 16"):
        read_soft_label_info(str(copy))


# ---------------------------------------------------------------------------- distillation


def _distill_cfg(soft_labels: Path, out: Path, **overrides) -> DistillConfig:
    return load_config(DistillConfig, overrides={"soft_labels": str(soft_labels), "output": str(out), **FAST,
                                                 **overrides})


@pytest.mark.slow
def test_beta_without_a_stored_representation_is_refused_by_name(soft_labels, tmp_path):
    with pytest.raises(SoftLabelError, match="loss.beta=0.5 \\(task 'sentiment'\\).*teachers \\['teacher'\\] stored "
                       "one.*teachers.N.representation: mean"):
        distill_plan(_distill_cfg(soft_labels, tmp_path / "s", **{"loss.beta": 0.5}))


@pytest.mark.slow
def test_the_plan_carries_the_representation_target_per_task(rep_labels, tmp_path):
    plan, _ = distill_plan(_distill_cfg(rep_labels, tmp_path / "s", **{"loss.beta": 0.5,
                                                                        "tasks": {"sentiment": {"beta": 2.0}}}))
    (task,) = plan.tasks
    assert (task.beta, task.representation, task.pooling, task.representation_width) == (
        2.0, "teacher_representation", "mean", 32)
    assert plan.representation_columns == ["teacher_representation"]
    plan, _ = distill_plan(_distill_cfg(rep_labels, tmp_path / "s"))
    assert plan.tasks[0].representation is None and plan.representation_columns == []


# ---------------------------------------------------------------------------- student starts


def test_listed_layers_set_num_layers_and_bad_lists_are_refused():
    assert StudentConfig(layer_selection=[0, 2]).num_layers == 2
    with pytest.raises(ValueError, match="distinct layer indices"):
        StudentConfig(layer_selection=[2, 0])
    with pytest.raises(ValueError, match="must list num_layers \\(3\\)"):
        StudentConfig(layer_selection=[0, 2], num_layers=3)


def test_a_cut_of_another_pretrained_encoder_gets_a_fresh_head_and_its_own_tokenizer(tmp_path, tiny_teacher):
    from transformers import AutoTokenizer, BertModel

    from kd_ray.models.loading import build_student

    other = build_tiny_classifier(tmp_path / "other", num_layers=3, labels=["a", "b"], seed=7)
    encoder = tmp_path / "encoder"  # a bare encoder, as sentence-transformers ship MiniLM-L6
    BertModel.from_pretrained(other).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(other).save_pretrained(encoder)
    student = StudentConfig(kind="cut", model=str(encoder), num_layers=2, layer_selection="top", ffn_size=None)
    net, tokenizer = build_student(student, str(tiny_teacher), LABELS)
    assert [net.config.id2label[i] for i in range(3)] == LABELS
    source = BertModel.from_pretrained(encoder)
    assert torch.equal(net.bert.encoder.layer[0].attention.self.query.weight,
                       source.encoder.layer[1].attention.self.query.weight)
    assert tokenizer.backend_tokenizer.to_str() == AutoTokenizer.from_pretrained(encoder).backend_tokenizer.to_str()
    with pytest.raises(Exception, match="its labels \\['a', 'b'\\] differ"):  # a classifier keeps its own head
        build_student(student.model_copy(update={"model": str(other)}), str(tiny_teacher), LABELS)


def test_a_pipeline_stores_representations_for_beta_and_refuses_beta_without():
    from kd_ray.config import PipelineConfig
    from kd_ray.stages.pipeline import stages

    tree = {"output": "runs/x", "labels": LABELS, "data": {"train": {"path": "t.csv"}, "test": {"path": "test.csv"}},
            "teacher": {"model": "some/teacher"}, "loss": {"beta": 0.5}}
    with pytest.raises(ValueError, match="loss.beta=0.5 .* set teacher.representation: mean"):
        load_config(PipelineConfig, overrides=tree)
    cfg = load_config(PipelineConfig, overrides={**tree, "teacher": {"model": "some/teacher",
                                                                      "representation": "mean"}})
    run = {stage.name: stage for stage in stages(cfg)}
    assert run["label"].cfg.teachers[0].representation == "mean"
    assert run["distill"].cfg.loss.beta == 0.5

