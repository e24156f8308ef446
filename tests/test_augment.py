"""Perturbed copies of the posts the teacher labels (`augment` in `kd-ray label` and `kd-ray run`)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import labeled_corpus, random_posts
from test_label import direct_logits

from kd_ray.config import AugmentConfig, LabelConfig, PipelineConfig, load_config
from kd_ray.data.augment import SEPARATOR, augment_table
from kd_ray.data.soft_labels import METADATA_KEY
from kd_ray.errors import CorpusError
from kd_ray.stages.label import run_label


def corpus_rows(n: int) -> pa.Table:
    """Rows as kd_ray.data.corpus reads them, with one rejected row and one task label column."""
    texts = random_posts(n, seed=3, min_words=4)
    reasons = [None] * n
    reasons[1] = "empty text"
    return pa.table({"id": [f"p{i}" for i in range(n)], "text": texts, "label": pa.array(range(n), pa.int32()),
                     "reject_reason": pa.array(reasons, pa.string()),
                     "label_reason": pa.array([0] * n, pa.int32())})


def test_copies_follow_their_posts_with_new_ids_and_no_gold():
    table = corpus_rows(50)
    out = augment_table(table, AugmentConfig(copies=2), "[MASK]")
    assert out.schema == table.schema and out.slice(0, 50).equals(table)
    copies = out.slice(50).to_pydict()
    accepted = [i for i in range(50) if i != 1]  # the rejected row gets no copies
    assert copies["id"] == [f"p{i}{SEPARATOR}{k}" for k in range(2) for i in accepted]
    for column in ("label", "reject_reason", "label_reason"):
        assert copies[column] == [None] * 98
    originals = dict(zip(table["id"].to_pylist(), table["text"].to_pylist()))
    changed = [text != originals[i.split(SEPARATOR)[0]] for i, text in zip(copies["id"], copies["text"])]
    assert 0.5 < np.mean(changed) < 1.0  # most copies differ; a short post may come through whole
    assert any("[MASK]" in text for text in copies["text"])
    for i, text in zip(copies["id"], copies["text"]):  # a span keeps at least half of the words
        assert 2 * len(text.split()) >= len(originals[i.split(SEPARATOR)[0]].split())


def test_copies_depend_only_on_seed_id_and_block():
    table = corpus_rows(30)
    cfg = AugmentConfig(copies=1)
    first = augment_table(table, cfg, "[MASK]")
    assert augment_table(table, cfg, "[MASK]").equals(first)
    other_seed = augment_table(table, AugmentConfig(copies=1, seed=1), "[MASK]")
    assert other_seed["text"].to_pylist()[30:] != first["text"].to_pylist()[30:]
    assert augment_table(table, AugmentConfig(copies=0), "[MASK]") is table


def test_a_post_whose_id_looks_like_a_copy_is_refused():
    table = corpus_rows(5)
    table = table.set_column(0, "id", pa.array(["p0", "p1", f"p2{SEPARATOR}7", "p3", "p4"]))
    with pytest.raises(CorpusError, match=r"posts\.csv: ids such as 'p2#aug7' end like an augmented copy's id"):
        augment_table(table, AugmentConfig(copies=1), "[MASK]", source="posts.csv")
    assert augment_table(table, AugmentConfig(copies=0), "[MASK]") is table  # no copies, no clash
    fine = table.set_column(0, "id", pa.array(["p0", "p1", f"p2{SEPARATOR}", f"x{SEPARATOR}1y", "p4"]))
    assert augment_table(fine, AugmentConfig(copies=1), "[MASK]").num_rows == 9


def test_without_a_mask_token_masked_words_are_dropped():
    table = corpus_rows(40)
    out = augment_table(table, AugmentConfig(copies=1, mask_prob=0.5, replace_prob=0.0, span_prob=0.0), None)
    originals = table["text"].to_pylist()
    for text, original in zip(out["text"].to_pylist()[40:], originals[:1] + originals[2:]):
        words = text.split()
        assert words and "[MASK]" not in words and len(words) <= len(original.split())
        assert all(w in original.split() for w in words)
    assert np.mean([len(t.split()) for t in out["text"].to_pylist()[40:]]) < np.mean([len(t.split()) for t in originals])


@pytest.mark.parametrize("fields, message", [
    ({"copies": 1, "mask_prob": 0.7, "replace_prob": 0.5}, "must be at most 1"),
    ({"copies": 1, "mask_prob": 0, "replace_prob": 0, "span_prob": 0}, "exact copies"),
    ({"copies": -1}, "greater than or equal to 0"),
    ({"copies": 1, "span_prob": 1.5}, "less than or equal to 1"),
])
def test_bad_augment_settings_are_refused(fields, message):
    with pytest.raises(Exception, match=message):
        AugmentConfig(**fields)


def test_pipeline_passes_augment_to_its_label_stage(tmp_path):
    from kd_ray.stages.pipeline import stages

    cfg = load_config(PipelineConfig, overrides={
        "output": str(tmp_path / "run"), "labels": ["negative", "neutral", "positive"],
        "data": {"train": {"path": str(tmp_path / "l.csv"), "label_column": "label"},
                 "test": {"path": str(tmp_path / "t.csv")}},
        "teacher": {"base_model": str(tmp_path / "base")}, "augment": {"copies": 3}})
    assert {stage.name: stage for stage in stages(cfg)}["label"].cfg.augment.copies == 3


@pytest.mark.slow
def test_the_teacher_labels_every_copy(tmp_path, tiny_teacher, ray_session):
    corpus = labeled_corpus(tmp_path / "corpus", 200)
    outputs = []
    for run in ("a", "b"):  # two runs in fresh Ray workers make the same copies
        cfg = load_config(LabelConfig, overrides={
            "corpus.path": str(corpus), "corpus.id_column": "id", "corpus.label_column": "label",
            "teachers.0.model": str(tiny_teacher), "teachers.0.max_length": 48, "augment.copies": 2,
            "compute.block_rows": 64, "output.path": str(tmp_path / run)})
        summary = run_label(cfg)
        assert summary.rows == 600
        outputs.append(pq.read_table(tmp_path / run).sort_by("id"))
    a, b = outputs
    assert a.select(["id", "text", "label"]).equals(b.select(["id", "text", "label"]))
    ids = a["id"].to_pylist()
    originals = pq.read_table(corpus)
    assert set(ids) == set(originals["id"].to_pylist()) | {f"{i}{SEPARATOR}{k}" for i in originals["id"].to_pylist()
                                                           for k in range(2)}
    is_copy = np.array([SEPARATOR in i for i in ids])
    labels = a["label"].to_numpy(zero_copy_only=False)
    assert np.isnan(labels[is_copy].astype(float)).all() and not np.isnan(labels[~is_copy].astype(float)).any()
    # the logits are the teacher's on the copy's own (perturbed) text
    logits = np.stack(a["teacher_logits"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(logits, direct_logits(tiny_teacher, a["text"].to_pylist(), 48), atol=1e-4)
    metadata = json.loads(a.schema.metadata[METADATA_KEY])
    assert metadata["augment"]["copies"] == 2 and metadata["augment"]["mask_token"] == "[MASK]"
    assert any("[MASK]" in t for t, c in zip(a["text"].to_pylist(), is_copy) if c)


@pytest.mark.slow
def test_a_clashing_id_stops_labeling_before_anything_is_written(tmp_path, tiny_teacher, ray_session):
    corpus = labeled_corpus(tmp_path / "corpus", 50)
    table = pq.read_table(corpus)
    ids = table["id"].to_pylist()
    ids[17] = f"{ids[3]}{SEPARATOR}0"  # would be the id of post 3's first copy
    pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids)), corpus)
    cfg = load_config(LabelConfig, overrides={
        "corpus.path": str(corpus), "corpus.id_column": "id", "corpus.label_column": "label",
        "teachers.0.model": str(tiny_teacher), "teachers.0.max_length": 48, "augment.copies": 1,
        "output.path": str(tmp_path / "out")})
    with pytest.raises(CorpusError, match=f"{corpus}: ids such as '{ids[17]}'"):
        run_label(cfg)
    assert not list((tmp_path / "out").glob("**/*.parquet"))
