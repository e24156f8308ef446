"""The multi-task student's Ray-free core: layout, loss, save/load, per-task export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_classifier, random_posts
from kd_ray.losses import distill_loss
from kd_ray.multitask import (MultiTaskClassifier, export_task, joint_label_maps, multitask_loss, read_layout,
                              task_layout, write_layout)

TASKS = {"sentiment": ["negative", "neutral", "positive"],
         "reason": ["Late Flight", "Lost Luggage", "Customer Service Issue", "Other"]}


@pytest.fixture(scope="module")
def multitask_model(tmp_path_factory):
    """A tiny BERT with the joint 7-way output, saved with its task layout."""
    from transformers import AutoModelForSequenceClassification

    layout = task_layout(TASKS)
    labels = list(joint_label_maps(layout)["id2label"].values())
    folder = build_tiny_classifier(tmp_path_factory.mktemp("mt") / "student", labels=labels)
    write_layout(folder, layout)
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 7
    return folder


def test_layout_slices_the_joint_output_in_config_order():
    layout = task_layout(TASKS)
    assert [(t.name, t.start, t.stop) for t in layout] == [("sentiment", 0, 3), ("reason", 3, 7)]
    logits = torch.arange(14.0).reshape(2, 7)
    assert layout[1].of(logits).tolist() == [[3, 4, 5, 6], [10, 11, 12, 13]]
    assert joint_label_maps(layout)["id2label"][3] == "reason:Late Flight"


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
    total, parts = multitask_loss(logits, layout, teacher, gold, losses)
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
    losses = {t: {"kind": "kl", "temperature": 2.0, "alpha": 0.6, "weight": 1.0} for t in TASKS}
    _, parts = multitask_loss(logits, layout, teacher, {"sentiment": torch.tensor([1]), "reason": torch.tensor([-100])},
                              losses)
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
