"""`kd-ray label` end to end on the session's local Ray: files, ids, logits, metadata, reruns, bad input.

One 20,000-row run over five file formats is shared by most assertions; the other runs use
corpora of tens of rows. Errors found on the driver are checked without labeling anything;
errors found while reading fail a run as soon as a read task meets them.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LABELS, random_posts
from test_corpus import BAD_INPUT, line_ids, write_bad_corpus

import kd_ray
from kd_ray.cli import main
from kd_ray.config import LabelConfig, TeacherConfig, load_config
from kd_ray.data.normalize import normalize_post
from kd_ray.data.soft_labels import MANIFEST, METADATA_KEY, REJECTED_DIR, soft_label_schema, validate_soft_labels
from kd_ray.errors import CorpusError, KdRayUserError, ModelError, SoftLabelError, unwrap_user_error
from kd_ray.models.teacher import weights_sha256
from kd_ray.stages.label import run_label

MAX_LENGTH = 48
ROWS_PER_FILE = 5_000
BLOCK_ROWS = 1_000
CORPUS_LABEL_NAMES = ["positive", "negative", "neutral"]  # integer labels in b.jsonl index this, not the teacher
# file -> rows; sizes differ so that file and block boundaries do not line up
SPLIT_BYTES = 16 << 10  # every file of the big run is read as at least 4 byte ranges or row-group runs
FILES = {"a.parquet": 6_000, "b.jsonl": 5_000, "c.csv": 4_000, "sub/d.tsv": 3_000, "e.txt": 2_000}


def direct_logits(model_dir: Path, texts: list[str], max_length: int, batch_size: int = 256) -> np.ndarray:
    """The teacher run the plain transformers way: input order, padded per batch, fp32."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray actors share the two cores; more threads only spin
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt")
                out.append(model(**batch).logits.numpy())
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(out)


def read_parts(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))


def part_metadata(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


def label_cfg(corpus: Path, teacher: Path, output: Path, **overrides) -> LabelConfig:
    base = {"corpus.path": str(corpus), "teachers.0.model": str(teacher), "output.path": str(output),
            "compute.concurrency": 1}
    return load_config(LabelConfig, overrides={**base, **overrides})


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher with larger random weights: BERT's 0.02 init gives nearly the same logits
    for every post (std ~3e-5), which would make logit comparisons vacuous. Here std ~0.2."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("models") / "sharp-teacher"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- the shared 20k-row run


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """20,000 posts over five formats, gold labels in four of them, a few posts far over MAX_LENGTH.

    Returns (folder, expected) with expected: id -> (text, teacher label index or None).
    """
    root = tmp_path_factory.mktemp("big-corpus")
    texts = random_posts(sum(FILES.values()), seed=7)
    for i in range(0, 6_000, 600):  # ten very long posts in a.parquet
        texts[i] = " ".join(random_posts(40, seed=i, min_words=20, max_words=20))
    rng = np.random.default_rng(0)
    names = [LABELS[k] for k in rng.integers(0, 3, len(texts))]
    expected, start = {}, 0
    for name, n in FILES.items():
        rows = range(start, start + n)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        gold: list = [names[i] if i % 7 else None for i in rows]  # every 7th row has no gold label
        if name.endswith(".parquet"):
            pq.write_table(pa.table({"text": [texts[i] for i in rows], "label": gold}), path, row_group_size=500)
        elif name.endswith(".jsonl"):
            gold = [CORPUS_LABEL_NAMES.index(g) if g else None for g in gold]
            write_jsonl(path, [{"label": g, "text": texts[i]} for g, i in zip(gold, rows)])
            gold = [CORPUS_LABEL_NAMES[g] if g is not None else None for g in gold]
        elif name.endswith((".csv", ".tsv")):
            with open(path, "w", newline="") as f:
                writer = csv.writer(f, delimiter="," if name.endswith(".csv") else "\t")
                writer.writerow(["text", "label"])
                writer.writerows([texts[i], g or ""] for g, i in zip(gold, rows))
        else:
            path.write_text("".join(texts[i] + "\n" for i in rows))
            gold = [None] * n  # text files carry no gold labels
        ids = ([f"{name}:{k}" for k in range(n)] if name.endswith(".parquet")
               else line_ids(path, name, header=name.endswith((".csv", ".tsv"))))
        for k, i in enumerate(rows):
            expected[ids[k]] = (texts[i], LABELS.index(gold[k]) if gold[k] else None)
        start += n
    return root, expected


@pytest.fixture(scope="module")
def big_run(ray_session, teacher, big_corpus, tmp_path_factory):
    corpus, _ = big_corpus
    out = tmp_path_factory.mktemp("big-run") / "labels"
    cfg = label_cfg(corpus, teacher, out, **{
        "corpus.label_column": "label", "corpus.label_names": CORPUS_LABEL_NAMES,
        "teachers.0.max_length": MAX_LENGTH, "compute.block_rows": BLOCK_ROWS, "compute.concurrency": None,
        "output.rows_per_file": ROWS_PER_FILE, "corpus.split_bytes": SPLIT_BYTES,
        # the actors tokenize their own blocks here (the other runs use the tokenize stage, the default)
        "compute.tokenize": "actor", "compute.batch_tokens": 2048,
    })
    summary = run_label(cfg)
    table = read_parts(out)
    order = np.argsort(np.array(table.column("id").to_pylist()))
    return summary, out, table.take(pa.array(order))


def test_every_file_of_the_big_run_is_read_in_several_parts(big_corpus):
    from kd_ray.data.corpus import list_shards

    corpus, _ = big_corpus
    shards = list_shards(LabelConfig.model_validate(
        {"corpus": {"path": str(corpus), "split_bytes": SPLIT_BYTES}, "teachers": [{"model": "x"}],
         "output": {"path": "x"}}).corpus)
    parts = {name: sum(s.name == name for s in shards) for name in FILES}
    assert all(n >= 4 for n in parts.values()), parts


@pytest.mark.slow
def test_output_ids_are_the_input_ids_exactly(big_corpus, big_run):
    _, expected = big_corpus
    summary, _, table = big_run
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected) == summary.rows == 20_000
    assert set(ids) == set(expected)
    assert table.column("text").to_pylist() == [expected[i][0] for i in ids]


@pytest.mark.slow
def test_logits_equal_the_model_run_directly(teacher, big_run):
    _, _, table = big_run
    logits = np.array(table.column("teacher_logits").to_pylist(), dtype=np.float32)
    reference = direct_logits(teacher, table.column("text").to_pylist(), MAX_LENGTH)
    assert logits.shape == (20_000, len(LABELS))
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)
    assert logits.std(axis=0).min() > 0.05  # posts get clearly different logits, so a mix-up would show


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_labeler_pads_on_the_tokenizers_side(teacher, tmp_path, padding_side):
    """The labeler pads its length-sorted batches itself; they must equal the tokenizer's own padding."""
    from transformers import AutoTokenizer

    from kd_ray.models.teacher import TeacherLabeler

    folder = tmp_path / "teacher"
    shutil.copytree(teacher, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side=padding_side)
    tokenizer.save_pretrained(folder)
    texts = random_posts(200, seed=5)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    order = np.argsort(-np.array(lengths), kind="stable")  # the labeler's batches: longest first
    reference = direct_logits(folder, [texts[i] for i in order], MAX_LENGTH, batch_size=32)
    labeler = TeacherLabeler([TeacherConfig(model=str(folder), max_length=MAX_LENGTH)], batch_size=32)
    rows = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts, "label": pa.nulls(len(texts), pa.int32()),
                     "reject_reason": pa.nulls(len(texts), pa.string())})
    logits = np.array(labeler(rows).column("teacher_logits").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(logits[order], reference, atol=1e-4, rtol=0)


def test_tokenized_rows_label_as_raw_rows_do_with_batches_cut_by_tokens(teacher):
    """The tokenize stage's output fed to the labeler gives what the labeler gives tokenizing itself;
    batch_tokens changes the batches, not the logits; rejected rows carry no tokens and NaN logits."""
    from kd_ray.models.teacher import TeacherLabeler, Tokenizers, make_teacher

    texts = random_posts(300, seed=11, max_words=60)
    rows = pa.table({"id": [str(i) for i in range(300)], "text": texts, "label": pa.nulls(300, pa.int32()),
                     "reject_reason": ["empty text" if i % 50 == 0 else None for i in range(300)]})
    teachers = [TeacherConfig(model=str(teacher), max_length=MAX_LENGTH)]
    tokenized = Tokenizers([make_teacher(t) for t in teachers])(rows)
    assert tokenized.column("_token_ids_0").to_pylist()[0] == []
    raw = TeacherLabeler(teachers, batch_size=32)(rows)
    by_tokens = TeacherLabeler(teachers, batch_size=256, batch_tokens=512)(tokenized)
    assert by_tokens.column_names == raw.column_names  # token columns do not reach the files
    a, b = (np.array(t.column("teacher_logits").to_pylist(), dtype=np.float32) for t in (raw, by_tokens))
    assert np.isnan(a[::50]).all() and np.isnan(b[::50]).all()
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    assert by_tokens.column("truncated").to_pylist() == raw.column("truncated").to_pylist()


@pytest.mark.slow
def test_gold_labels_are_indices_in_the_teachers_label_order(big_corpus, big_run):
    _, expected = big_corpus
    _, _, table = big_run
    labels = table.column("label").to_pylist()
    assert labels == [expected[i][1] for i in table.column("id").to_pylist()]
    assert set(labels) == {0, 1, 2, None}


@pytest.mark.slow
def test_long_texts_are_truncated_and_counted(teacher, big_run):
    from transformers import AutoTokenizer

    summary, out, table = big_run
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    lengths = np.array([len(ids) for ids in tokenizer(table.column("text").to_pylist())["input_ids"]])
    too_long = lengths > MAX_LENGTH
    assert too_long.sum() >= 10  # at least the ten long posts
    assert table.column("truncated").to_pylist() == too_long.tolist()
    assert summary.truncated == too_long.sum() == json.loads((out / MANIFEST).read_text())["truncated"]


@pytest.mark.slow
def test_every_part_file_carries_complete_provenance(teacher, big_run):
    _, out, _ = big_run
    manifest = json.loads((out / MANIFEST).read_text())
    parts = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in parts] == manifest["files"] and len(parts) > 1  # a loop over no files checks nothing
    for path in parts:
        meta = part_metadata(path)
        assert meta["kd_ray_version"] == kd_ray.__version__
        assert meta["config_hash"] == manifest["config_hash"] and len(meta["config_hash"]) == 16
        assert meta["normalize"] is False and meta["logits_dtype"] == "float32"
        assert meta["gold"] == {"sentiment": LABELS} and meta["schema_version"] == 3
        [stored] = meta["teachers"]
        assert stored["model"] == str(Path(teacher).resolve())
        assert stored["weights_sha256"] == weights_sha256(Path(teacher)) and len(stored["weights_sha256"]) == 64
        assert stored["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
        assert stored["max_length"] == MAX_LENGTH
        assert (stored["name"], stored["task"]) == ("teacher", "sentiment")
        assert pq.read_schema(path).remove_metadata().equals(soft_label_schema(meta).remove_metadata())


@pytest.mark.slow
def test_files_respect_rows_per_file_and_match_the_manifest(big_run):
    summary, out, _ = big_run
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    rows = [pq.ParquetFile(out / p).metadata.num_rows for p in parts]
    manifest = json.loads((out / MANIFEST).read_text())
    assert sum(rows) == manifest["rows"] == 20_000
    assert manifest["files"] == parts and summary.files == len(parts)
    assert (manifest["rejected"], summary.rejected) == (0, 0)
    # rows_per_file is a minimum per file (Ray's min_rows_per_write): all files but one reach it,
    # and none runs more than a few blocks past it.
    assert 2 <= len(parts) <= math.ceil(20_000 / ROWS_PER_FILE)
    assert sum(r < ROWS_PER_FILE for r in rows) <= 1
    assert max(rows) < ROWS_PER_FILE + 3 * BLOCK_ROWS
    leftovers = sorted(p.name for p in out.iterdir() if p.name not in parts and p.name != MANIFEST)
    assert leftovers == []  # no temp files, no _rejected/ when nothing was rejected
    assert "20000 rows" in summary.line()


# ---------------------------------------------------------------------------- kd-ray validate


@pytest.mark.slow
def test_validate_passes_on_a_finished_run(capsys, big_run):
    _, out, _ = big_run
    assert main(["validate", str(out)]) == 0
    assert f"ok: 20000 rows in {len(list(out.glob('part-*.parquet')))} files, teachers ['teacher']" in capsys.readouterr().out


def _corrupt_copy(out: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    part = sorted(copy.glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    schema = table.schema
    if how in ("nan logits", "inf logits"):
        logits = np.array(table.column("teacher_logits").to_pylist(), dtype=np.float32)
        logits[3, 1] = np.nan if how == "nan logits" else -np.inf
        column = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), logits.shape[1])
        pq.write_table(table.set_column(table.schema.get_field_index("teacher_logits"), schema.field("teacher_logits"),
                                        column).cast(schema), part)
    elif how == "logits of the wrong width":
        logits = np.array(table.column("teacher_logits").to_pylist(), dtype=np.float32)[:, :2]
        column = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), 2)
        index = table.schema.get_field_index("teacher_logits")
        pq.write_table(table.set_column(index, pa.field("teacher_logits", column.type, nullable=False), column)
                       .replace_schema_metadata(schema.metadata), part)
    elif how == "duplicate id":
        pq.write_table(table.slice(0, 1).cast(schema), copy / "part-99999-extra.parquet")
    elif how == "no manifest":
        (copy / MANIFEST).unlink()
    elif how == "foreign run":
        meta = part_metadata(part)
        meta["config_hash"] = "0" * 16
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), part)
    elif how == "no metadata":
        pq.write_table(table.replace_schema_metadata(None), part)
    elif how == "gold label out of range":
        labels = pa.array([7] * table.num_rows, pa.int32())
        pq.write_table(table.set_column(table.schema.get_field_index("label"), schema.field("label"), labels), part)
    elif how == "no part files":
        for p in copy.glob("part-*.parquet"):
            p.unlink()
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("how, message", [
    ("nan logits", r"part-\d{5}-\w+\.parquet: 1 NaN/Inf values in teacher_logits"),
    ("inf logits", r"part-\d{5}-\w+\.parquet: 1 NaN/Inf values in teacher_logits"),
    ("logits of the wrong width", r"part-\d{5}-\w+\.parquet has schema(.|\n)*teacher_logits: "
                                  r"fixed_size_list<element: float>\[2\](.|\n)*expected(.|\n)*\[3\]"),
    ("duplicate id", r"id '.*' appears more than once(.|\n)*manifest says 20000 rows, the part files hold 20001"),
    ("no manifest", r"_manifest.json is missing: the labeling run did not finish"),
    ("foreign run", r"was labeled by a different teacher or config than .*; do not mix runs"),
    ("no metadata", r"has no kd_ray metadata: it was not written by `kd-ray label`"),
    ("gold label out of range", r"gold label index outside 0..2"),
    ("no part files", r"holds no part-\*\.parquet files"),
])
def test_validate_names_what_is_wrong_with_a_corrupted_folder(capsys, big_run, tmp_path, how, message):
    _, out, _ = big_run
    copy = _corrupt_copy(out, tmp_path, how)
    with pytest.raises(SoftLabelError, match=message):
        validate_soft_labels(str(copy))
    assert main(["validate", str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kd-ray validate: error: ") and str(copy) in err


def test_validate_without_a_folder_prints_usage(capsys):
    assert main(["validate"]) == 2
    assert "usage: kd-ray validate" in capsys.readouterr().err


# ---------------------------------------------------------------------------- normalisation, reruns


RAW_POSTS = ["@AmericanAir see  https://t.co/x 😡", "  thanks\t@crew   for the seat 🙂 ", "late again www.x.com/y",
             "@a @b @c", "fine"] * 4
RAW_LINES = ["@united  lost my bag http://t.co/abc", "great crew 🙂"] * 5


def by_id(table: pa.Table, column: str) -> dict:
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist()))


@pytest.fixture(scope="module")
def normalized_run(ray_session, teacher, tmp_path_factory):
    """30 posts with mentions, links, odd whitespace and emojis in two files, labeled with normalize=true."""
    root = tmp_path_factory.mktemp("normalized")
    write_jsonl(root / "corpus" / "posts.jsonl", [{"text": t} for t in RAW_POSTS])
    (root / "corpus" / "more.txt").write_text("".join(t + "\n" for t in RAW_LINES))
    raw = {**dict(zip(line_ids(root / "corpus" / "posts.jsonl", "posts.jsonl"), RAW_POSTS)),
           **dict(zip(line_ids(root / "corpus" / "more.txt", "more.txt"), RAW_LINES))}
    overrides = {"corpus.normalize": True}
    return run_label(label_cfg(root / "corpus", teacher, root / "labels", **overrides)), root, overrides, raw


@pytest.mark.slow
def test_normalized_text_is_stored_and_labeled(teacher, normalized_run):
    summary, root, _, raw = normalized_run
    table = read_parts(root / "labels")
    assert summary.rows == 30 and summary.files == 1  # two input files, one output file
    texts = by_id(table, "text")
    assert texts == {i: normalize_post(t) for i, t in raw.items()}
    assert [texts[i] for i in line_ids(root / "corpus" / "posts.jsonl", "posts.jsonl")[:5]] == [
        "@user see http 😡", "thanks @user for the seat 🙂", "late again http", "@user @user @user", "fine"]
    assert texts["more.txt@0"] == "@user lost my bag http"
    ids = sorted(raw)
    logits = np.array([by_id(table, "teacher_logits")[i] for i in ids], dtype=np.float32)
    np.testing.assert_allclose(logits, direct_logits(teacher, [texts[i] for i in ids], 128), atol=1e-4, rtol=0)
    assert not np.allclose(logits, direct_logits(teacher, [raw[i] for i in ids], 128), atol=1e-2)
    assert part_metadata(next((root / "labels").glob("part-*.parquet")))["normalize"] is True


@pytest.mark.slow
def test_rerunning_the_same_config_is_a_no_op_that_says_so(capsys, teacher, normalized_run):
    first, root, overrides, _ = normalized_run
    out = root / "labels"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary = run_label(label_cfg(root / "corpus", teacher, out, **overrides))
    assert summary.skipped_existing and (summary.rows, summary.files) == (first.rows, first.files)
    code = main(["label", "--corpus.path", str(root / "corpus"), "--corpus.normalize", "true",
                 "--teachers.0.model", str(teacher), "--output.path", str(out)])
    assert code == 0
    assert "already holds 30 rows labeled with this config; nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.slow
def test_a_different_config_is_refused_unless_overwrite(capsys, teacher, normalized_run, tmp_path):
    _, root, overrides, raw = normalized_run
    out = tmp_path / "labels"
    shutil.copytree(root / "labels", out)
    old_hash = json.loads((out / MANIFEST).read_text())["config_hash"]
    refused = r"already holds finished labels of another config \(hash \w+\).*set output.overwrite=true"
    with pytest.raises(KdRayUserError, match=refused):
        run_label(label_cfg(root / "corpus", teacher, out, **{**overrides, "corpus.normalize": False}))
    assert main(["label", "--corpus.path", str(root / "corpus"), "--corpus.normalize", "true", "--teachers.0.model",
                 str(teacher), "--teachers.0.max_length", "64", "--output.path", str(out)]) == 1
    assert "already holds finished labels of another config" in capsys.readouterr().err
    assert json.loads((out / MANIFEST).read_text())["config_hash"] == old_hash  # untouched

    old_parts = {p.name for p in out.glob("part-*.parquet")}
    summary = run_label(label_cfg(root / "corpus", teacher, out, **{
        **overrides, "corpus.normalize": False, "output.overwrite": True, "output.logits_dtype": "float16"}))
    assert not summary.skipped_existing and summary.rows == 30
    assert json.loads((out / MANIFEST).read_text())["config_hash"] != old_hash
    assert not old_parts & {p.name for p in out.glob("part-*.parquet")}
    table = read_parts(out)
    # a second run into another folder derives the same ids from the same files
    assert sorted(table.column("id").to_pylist()) == sorted(read_parts(root / "labels").column("id").to_pylist())
    assert by_id(table, "text") == raw
    assert table.schema.field("teacher_logits").type == pa.list_(pa.float16(), 3)
    ids = sorted(raw)
    np.testing.assert_allclose(np.array([by_id(table, "teacher_logits")[i] for i in ids], dtype=np.float32),
                               direct_logits(teacher, [raw[i] for i in ids], 128), atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------- bad rows set aside


@pytest.mark.slow
def test_bad_rows_skip_sets_them_aside_with_their_reason(ray_session, teacher, tmp_path):
    rows = [{"id": f"p{i}", "text": f"good post {i}", "label": LABELS[i % 3]} for i in range(20)]
    rows[3]["text"] = None
    rows[5]["text"] = ""
    rows[8]["text"] = " \t "
    rows[13]["label"] = "angry"
    write_jsonl(tmp_path / "corpus" / "a.jsonl", rows)
    pq.write_table(pa.table({"id": ["q0", "q1"], "text": ["fine", "late"], "label": ["neutral", None]}),
                   tmp_path / "corpus" / "b.parquet")
    out = tmp_path / "labels"
    summary = run_label(label_cfg(tmp_path / "corpus", teacher, out, **{
        "corpus.id_column": "id", "corpus.label_column": "label", "corpus.bad_rows": "skip"}))
    bad = {"p3": "null text", "p5": "empty text", "p8": "empty text",
           "p13": "gold label 'angry' not in ['negative', 'neutral', 'positive']"}
    assert (summary.rows, summary.rejected, summary.files) == (18, 4, 1)  # two input files, one output file
    labeled = read_parts(out)
    assert sorted(labeled.column("id").to_pylist()) == sorted({r["id"] for r in rows} - set(bad) | {"q0", "q1"})
    assert np.isfinite(np.array(labeled.column("teacher_logits").to_pylist())).all()
    labels = by_id(labeled, "label")
    assert (labels["p0"], labels["p1"], labels["p2"], labels["q0"], labels["q1"]) == (0, 1, 2, 1, None)
    rejected = pq.read_table(out / REJECTED_DIR).to_pylist()
    assert {r["id"]: r["reject_reason"] for r in rejected} == bad
    assert {r["id"]: r["text"] for r in rejected}["p8"] == " \t "
    assert json.loads((out / MANIFEST).read_text())["rejected"] == 4
    validate_soft_labels(str(out))  # _rejected/ does not count as labels


# ---------------------------------------------------------------------------- Hugging Face datasets


@pytest.mark.slow
def test_save_to_disk_dataset_is_labeled_with_stable_ids(ray_session, teacher, tmp_path):
    import datasets

    from kd_ray.config import CorpusConfig
    from kd_ray.data.corpus import list_shards, read_shard

    texts = random_posts(40, seed=3)
    datasets.Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(40)]}).save_to_disk(tmp_path / "tweets")
    overrides = {"corpus.label_column": "label", "corpus.label_names": LABELS}
    summary = run_label(label_cfg(tmp_path / "tweets", teacher, tmp_path / "labels", **overrides))
    table = read_parts(tmp_path / "labels")
    assert summary.rows == 40
    assert by_id(table, "text") == {f"tweets[train]:{i}": t for i, t in enumerate(texts)}
    assert by_id(table, "label") == {f"tweets[train]:{i}": i % 3 for i in range(40)}
    # reading the dataset again gives the same ids
    corpus_cfg = CorpusConfig(path=str(tmp_path / "tweets"), label_column="label", label_names=LABELS)
    again = [i for s in list_shards(corpus_cfg) for t in read_shard(s, corpus_cfg, None) for i in t.column("id").to_pylist()]
    assert sorted(again) == sorted(table.column("id").to_pylist())


# ---------------------------------------------------------------------------- errors


def _plain_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(folder)
    return folder


def _no_weights(teacher: Path, folder: Path) -> Path:
    shutil.copytree(teacher, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("problem, message", [
    ("missing model", r"teacher model folder .*/nowhere does not exist"),
    ("model without weights", r"teacher model folder .*/no-weights has no weights \(expected one of model.safetensors"),
    ("model without config", r"teacher model folder .*/no-config has no config.json"),
    ("not a classifier", r"teacher '.*/plain-bert' is a \['BertModel'\] model, not a sequence classifier"),
    ("foreign label name", r"corpus.label_names has 'angry', which teacher 'teacher' \(.*\) does not predict; "
                           r"its labels are \['negative', 'neutral', 'positive'\]"),
    ("missing corpus", r"corpus.path '.*/no-corpus' does not exist"),
    ("output is a file", r"output.path .*/labels is a file, not a folder"),
])
def test_errors_before_any_labeling_name_the_problem(capsys, ray_session, teacher, tmp_path, problem, message):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", [{"text": "good", "label": "positive"}])
    model, out = str(teacher), tmp_path / "labels"
    extra: list[str] = []
    if problem == "missing model":
        model = str(tmp_path / "nowhere")
    elif problem == "model without weights":
        model = str(_no_weights(teacher, tmp_path / "no-weights"))
    elif problem == "model without config":
        model = str(tmp_path / "no-config")
        shutil.copytree(teacher, model, ignore=shutil.ignore_patterns("config.json"))
    elif problem == "not a classifier":
        model = str(_plain_bert(tmp_path / "plain-bert"))
    elif problem == "foreign label name":
        extra = ["--corpus.label_column", "label", "--corpus.label_names", "[negative, angry]"]
    elif problem == "missing corpus":
        corpus = tmp_path / "no-corpus"
    elif problem == "output is a file":
        out.write_text("")
    capsys.readouterr()  # drop the progress bars of saving models
    argv = ["label", "--corpus.path", str(corpus), "--teachers.0.model", model, "--output.path", str(out), *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("kd-ray label: error: ")
    assert re.search(message, err), err
    assert not (out / MANIFEST).exists()


@pytest.mark.slow
def test_model_errors_are_typed(ray_session, teacher, tmp_path):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"text": "good"}])
    with pytest.raises(ModelError, match="not a sequence classifier"):
        run_label(label_cfg(tmp_path / "corpus", _plain_bert(tmp_path / "plain"), tmp_path / "labels"))
    assert not (tmp_path / "labels").exists()  # refused before the output folder is made


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing text column", "null text", "whitespace text", "integer texts",
                                  "invalid utf-8", "unknown gold label", "gold index out of range", "duplicate ids"])
def test_bad_input_read_in_a_worker_fails_the_run_with_the_readers_message(ray_session, teacher, tmp_path, kind):
    (tmp_path / "corpus").mkdir()
    file_name, overrides = write_bad_corpus(tmp_path / "corpus", kind)
    out = tmp_path / "labels"
    with pytest.raises(Exception) as info:
        run_label(label_cfg(tmp_path / "corpus", teacher, out, **{f"corpus.{k}": v for k, v in overrides.items()}))
    error = unwrap_user_error(info.value)
    assert isinstance(error, CorpusError), info.value
    assert re.search(BAD_INPUT[kind], str(error)) and str(tmp_path / "corpus" / file_name) in str(error)
    assert not (out / MANIFEST).exists()


@pytest.mark.slow
def test_bad_row_in_a_worker_reaches_the_cli_with_file_row_and_column(capsys, ray_session, teacher, tmp_path):
    write_jsonl(tmp_path / "corpus" / "posts.jsonl", [{"text": "good"}, {"text": "fine"}, {"text": None}])
    out = tmp_path / "labels"
    assert main(["label", "--corpus.path", str(tmp_path / "corpus"), "--teachers.0.model", str(teacher),
                 "--output.path", str(out), "--compute.concurrency", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kd-ray label: error: ")
    assert f"{tmp_path}/corpus/posts.jsonl: the row at byte 34 (id 'posts.jsonl@34') has null text in column 'text'" in err
    assert "corpus.bad_rows=skip" in err
    assert not (out / MANIFEST).exists()


@pytest.mark.slow
def test_worker_errors_print_without_rays_traceback(capsys, ray_session, teacher, tmp_path):
    write_jsonl(tmp_path / "corpus" / "posts.jsonl", [{"text": "good"}, {"text": None}])
    assert main(["label", "--corpus.path", str(tmp_path / "corpus"), "--teachers.0.model", str(teacher),
                 "--output.path", str(tmp_path / "labels"), "--compute.concurrency", "1"]) == 1
    err = capsys.readouterr().err
    assert err == (f"kd-ray label: error: {tmp_path}/corpus/posts.jsonl: the row at byte 17 (id 'posts.jsonl@17') has null text "
                   f"in column 'text'; fix the row or set corpus.bad_rows=skip to set such rows aside under "
                   f"_rejected/\n")


@pytest.mark.slow
def test_a_corpus_whose_rows_are_all_rejected_fails_and_says_where_they_are(ray_session, teacher, tmp_path):
    write_jsonl(tmp_path / "corpus" / "posts.jsonl", [{"text": ""}, {"text": None}, {"text": "  "}])
    out = tmp_path / "labels"
    with pytest.raises(CorpusError, match=r"gave no rows to label \(3 rejected; they are listed under "
                       + re.escape(f"{out}/{REJECTED_DIR}/")):
        run_label(label_cfg(tmp_path / "corpus", teacher, out, **{"corpus.bad_rows": "skip"}))
    assert pq.read_table(out / REJECTED_DIR).num_rows == 3
    assert not (out / MANIFEST).exists() and not list(out.glob("part-*"))


@pytest.mark.slow
def test_duplicate_ids_across_files_fail_the_run_without_a_manifest(capsys, ray_session, teacher, tmp_path):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"id": "x1", "text": "good"}, {"id": "x2", "text": "bad"}])
    pq.write_table(pa.table({"id": ["x3", "x1"], "text": ["fine", "late"]}), tmp_path / "corpus" / "b.parquet")
    out = tmp_path / "labels"
    assert main(["label", "--corpus.path", str(tmp_path / "corpus"), "--corpus.id_column", "id",
                 "--teachers.0.model", str(teacher), "--output.path", str(out), "--compute.concurrency", "1"]) == 1
    assert "id 'x1' appears more than once" in capsys.readouterr().err
    assert not (out / MANIFEST).exists()


def test_validate_checks_representations_for_nan_as_labeling_does(tmp_path):
    """`kd-ray validate` checks a file's rows with the same check labeling makes from its footers: a NaN in a
    stored representation is named, with its file and column."""
    from kd_ray.data.soft_labels import MANIFEST, parquet_writer

    meta = {"schema_version": 2, "teachers": [{"name": "teacher", "task": "sentiment", "max_length": 32,
                                               "model": "m", "id2label": {str(i): n for i, n in enumerate(LABELS)},
                                               "representation": {"pooling": "mean", "width": 4}}],
            "logits_dtype": "float32", "config_hash": "labels-1", "label_names": LABELS}
    schema = soft_label_schema(meta)
    representation = [[0.5] * 4, [0.25, float("nan"), 0.0, 1.0], [1.0] * 4]
    table = pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "label": [0, 2, None],
                      "teacher_logits": [[0.0, 1.0, 2.0]] * 3, "teacher_representation": representation,
                      "truncated": [False] * 3}, schema=schema)
    (tmp_path / "labels").mkdir()
    with parquet_writer(str(tmp_path / "labels" / "part-00000.parquet"), schema) as writer:
        writer.write_table(table)
    (tmp_path / "labels" / MANIFEST).write_text(json.dumps({"rows": 3}))
    with pytest.raises(SoftLabelError, match=r"part-00000.parquet: 1 NaN/Inf values in teacher_representation"):
        validate_soft_labels(str(tmp_path / "labels"))
