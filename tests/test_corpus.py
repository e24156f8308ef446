"""Reading corpora without Ray: kd_ray.data.corpus.list_shards and read_shard on files built in tmp_path."""

from __future__ import annotations

import csv
import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_ray.config import CorpusConfig
from kd_ray.data.corpus import ROW_SCHEMA, estimated_rows, list_shards, read_shard
from kd_ray.data.normalize import normalize_post
from kd_ray.errors import CorpusError

TEACHER_ORDER = {"negative": 0, "neutral": 1, "positive": 2}


def read_all(label_to_index=None, **corpus) -> pa.Table:
    cfg = CorpusConfig(**corpus)
    tables = [t for shard in list_shards(cfg) for t in read_shard(shard, cfg, label_to_index)]
    return pa.concat_tables(tables)


def line_ids(path, name: str, header: bool = False) -> list[str]:
    """The derived ids of a line file's rows: '<name>@<byte offset of the line>' (header and blank lines skipped)."""
    ids, offset = [], 0
    for k, line in enumerate(path.read_bytes().splitlines(keepends=True)):
        if line.strip() and not (header and k == 0):
            ids.append(f"{name}@{offset}")
        offset += len(line)
    return ids


def write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_csv(path, rows: list[dict], delimiter: str = ",") -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def mixed_corpus(tmp_path):
    """The same five posts in each of the five formats, plus files the reader must pass over."""
    texts = ["good flight", "awful delay, 2 hours", 'she said "never again"', "ok\tfine", "love the crew 🙂"]
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), root / "a.parquet")
    write_jsonl(root / "b.jsonl", [{"text": t} for t in texts])
    write_csv(root / "c.csv", [{"text": t} for t in texts])
    write_csv(root / "d.tsv", [{"text": t.replace("\t", " ")} for t in texts], delimiter="\t")
    (root / "nested" / "e.txt").write_text("".join(t.replace("\t", " ") + "\n" for t in texts))
    (root / "_manifest.json").write_text("{}")
    (root / ".hidden.txt").write_text("not a post\n")
    (root / "README.md").write_text("not a corpus file\n")
    return root, texts


def test_list_shards_finds_every_format_in_name_order(mixed_corpus):
    root, _ = mixed_corpus
    shards = list_shards(CorpusConfig(path=str(root)))
    assert [(s.name, s.format) for s in shards] == [
        ("a.parquet", "parquet"), ("b.jsonl", "jsonl"), ("c.csv", "csv"), ("d.tsv", "tsv"), ("nested/e.txt", "text"),
    ]


def test_glob_and_single_file(mixed_corpus):
    root, _ = mixed_corpus
    assert [s.name for s in list_shards(CorpusConfig(path=f"{root}/*.cs?"))] == ["c.csv"]
    [shard] = list_shards(CorpusConfig(path=str(root / "b.jsonl")))
    assert (shard.name, shard.format) == ("b.jsonl", "jsonl")


def test_every_format_reads_the_same_texts_with_positional_ids(mixed_corpus):
    root, texts = mixed_corpus
    table = read_all(path=str(root))
    assert table.schema == ROW_SCHEMA
    assert table.num_rows == 25
    rows = table.to_pylist()
    for k, name in enumerate(["a.parquet", "b.jsonl", "c.csv", "d.tsv", "nested/e.txt"]):
        got = rows[5 * k:5 * k + 5]
        expected_ids = ([f"{name}:{i}" for i in range(5)] if name.endswith(".parquet")
                        else line_ids(root / name, name, header=name[-4:] in (".csv", ".tsv")))
        assert [r["id"] for r in got] == expected_ids
        expected = texts if name in ("a.parquet", "b.jsonl", "c.csv") else [t.replace("\t", " ") for t in texts]
        assert [r["text"] for r in got] == expected
    assert all(r["label"] is None and r["reject_reason"] is None for r in rows)


def test_derived_ids_are_the_same_on_every_read(mixed_corpus):
    root, _ = mixed_corpus
    assert read_all(path=str(root)).column("id").to_pylist() == read_all(path=str(root)).column("id").to_pylist()


def test_compressed_files_are_read(tmp_path):
    with gzip.open(tmp_path / "posts.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "late again"}) + "\n")
    with gzip.open(tmp_path / "posts.txt.gz", "wt") as f:
        f.write("fine\n")
    table = read_all(path=str(tmp_path))
    assert table.column("id").to_pylist() == ["posts.jsonl.gz@0", "posts.txt.gz@0"]
    assert table.column("text").to_pylist() == ["late again", "fine"]


def test_csv_keeps_numeric_looking_texts_and_ids_as_strings(tmp_path):
    write_csv(tmp_path / "p.csv", [{"id": "007", "text": "123"}, {"id": "008", "text": "two\nlines"}])
    table = read_all(path=str(tmp_path), id_column="id")
    assert table.column("id").to_pylist() == ["007", "008"]
    assert table.column("text").to_pylist() == ["123", "two\nlines"]


def test_limit_reads_at_most_n_rows_per_file(mixed_corpus):
    root, _ = mixed_corpus
    table = read_all(path=str(root), limit=2)
    assert table.num_rows == 10
    assert table.column("id").to_pylist()[:3] == ["a.parquet:0", "a.parquet:1", "b.jsonl@0"]


def test_normalize_rewrites_mentions_links_and_whitespace_but_keeps_emojis(tmp_path):
    raw = ["@AmericanAir see  https://t.co/x 😡", "  hi\t@bob   www.x.com/y  ", "mail a@b.com"]
    write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in raw])
    table = read_all(path=str(tmp_path), normalize=True)
    assert table.column("text").to_pylist() == ["@user see http 😡", "hi @user http", "mail a@b.com"]
    assert normalize_post(raw[0]) == "@user see http 😡"


def test_gold_labels_become_indices_in_the_teachers_order(tmp_path):
    write_jsonl(tmp_path / "names.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"},
                                           {"text": "c", "label": None}, {"text": "d", "label": ""}])
    table = read_all(TEACHER_ORDER, path=str(tmp_path), label_column="label")
    assert table.column("label").to_pylist() == [2, 0, None, None]


def test_integer_gold_labels_index_into_label_names(tmp_path):
    # the corpus numbers its labels differently from the teacher: 0 = positive
    write_jsonl(tmp_path / "ints.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    write_csv(tmp_path / "ints.csv", [{"text": "c", "label": "1"}])
    table = read_all(TEACHER_ORDER, path=str(tmp_path), label_column="label",
                     label_names=["positive", "neutral", "negative"])
    assert table.column("id").to_pylist() == (line_ids(tmp_path / "ints.csv", "ints.csv", header=True)
                                              + line_ids(tmp_path / "ints.jsonl", "ints.jsonl"))
    assert table.column("label").to_pylist() == [1, 2, 0]


def test_text_files_carry_no_gold_labels_in_a_labeled_corpus(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": "neutral"}])
    (tmp_path / "b.txt").write_text("unlabeled post\n")
    table = read_all(TEACHER_ORDER, path=str(tmp_path), label_column="label")
    assert table.column("label").to_pylist() == [1, None]


def test_unlabeled_path_hides_gold_its_files_carry(tmp_path):
    # a transfer set that still has its gold column must not leak it into training
    write_csv(tmp_path / "labeled.csv", [{"id": "l0", "text": "a", "label": "positive"}])
    write_csv(tmp_path / "transfer.csv", [{"id": "t0", "text": "b", "label": "negative"},
                                          {"id": "t1", "text": "c", "label": "not a label"}])
    table = read_all(TEACHER_ORDER, path=str(tmp_path / "labeled.csv"), unlabeled_path=str(tmp_path / "transfer.csv"),
                     id_column="id", label_column="label")
    assert table.column("id").to_pylist() == ["l0", "t0", "t1"]
    assert table.column("label").to_pylist() == [2, None, None]


def test_unlabeled_path_file_names_must_not_clash_with_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_csv(tmp_path / "a" / "part.csv", [{"text": "a", "label": "positive"}])
    write_csv(tmp_path / "b" / "part.csv", [{"text": "b"}])
    with pytest.raises(CorpusError, match=r"unlabeled_path entries share the file names \['part.csv'\]"):
        list_shards(CorpusConfig(path=str(tmp_path / "a"), unlabeled_path=str(tmp_path / "b"), label_column="label"))


# ---------------------------------------------------------------------------- Hugging Face datasets


def test_save_to_disk_dataset_reads_with_stable_ids(tmp_path):
    import datasets

    texts = [f"post {i}" for i in range(7)]
    datasets.Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(7)]}).save_to_disk(tmp_path / "ds")
    cfg = CorpusConfig(path=str(tmp_path / "ds"), label_column="label", label_names=["negative", "neutral", "positive"])
    shards = list_shards(cfg, hf_rows_per_shard=3)
    assert [(s.format, s.start, s.stop) for s in shards] == [("hf", 0, 3), ("hf", 3, 6), ("hf", 6, 7)]

    def read():
        return pa.concat_tables(t for s in list_shards(cfg, hf_rows_per_shard=3) for t in read_shard(s, cfg, TEACHER_ORDER))

    first, second = read(), read()
    assert first.column("id").to_pylist() == [f"ds[train]:{i}" for i in range(7)]
    assert second.column("id").to_pylist() == first.column("id").to_pylist()
    assert first.column("text").to_pylist() == texts
    assert first.column("label").to_pylist() == [i % 3 for i in range(7)]


def test_dataset_dict_split_is_chosen_and_a_missing_split_is_named(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
        "test": datasets.Dataset.from_dict({"text": ["c"]}),
    }).save_to_disk(tmp_path / "dd")
    assert read_all(path=str(tmp_path / "dd"), split="test").column("text").to_pylist() == ["c"]
    with pytest.raises(CorpusError, match=r"splits \['test', 'train'\], not corpus.split='validation'"):
        list_shards(CorpusConfig(path=str(tmp_path / "dd"), split="validation"))


# ---------------------------------------------------------------------------- bad input


def test_missing_path_and_folder_without_corpus_files_are_named(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus.path '.*nowhere' does not exist"):
        list_shards(CorpusConfig(path=str(tmp_path / "nowhere")))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(CorpusError, match=r"matches no readable corpus files \(found only .*notes.md.*set corpus.format"):
        list_shards(CorpusConfig(path=str(tmp_path)))


def write_bad_corpus(tmp_path, kind: str):
    """A one-file corpus with one kind of bad input; returns (file name, CorpusConfig overrides)."""
    if kind == "missing text column":
        write_jsonl(tmp_path / "p.jsonl", [{"body": "a"}])
        return "p.jsonl", {}
    if kind == "null text":
        write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": None}])
        return "p.jsonl", {}
    if kind in ("empty text", "whitespace text"):
        write_csv(tmp_path / "p.csv", [{"text": "a"}, {"text": "b"}, {"text": "" if kind == "empty text" else "  \t "}])
        return "p.csv", {}
    if kind == "integer texts":
        write_jsonl(tmp_path / "p.jsonl", [{"text": 1}, {"text": 2}])
        return "p.jsonl", {}
    if kind == "mixed-type texts":
        write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": 2}])
        return "p.jsonl", {}
    if kind == "invalid utf-8":
        (tmp_path / "p.txt").write_bytes(b"fine\nbad \xff\xfe byte\n")
        return "p.txt", {}
    if kind == "unknown gold label":
        write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "angry"}])
        return "p.jsonl", {"label_column": "label"}
    if kind == "gold index out of range":
        write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 5}])
        return "p.jsonl", {"label_column": "label", "label_names": ["negative", "neutral", "positive"]}
    if kind == "duplicate ids":
        pq.write_table(pa.table({"id": ["x1", "x2", "x1"], "text": ["a", "b", "c"]}), tmp_path / "p.parquet")
        return "p.parquet", {"id_column": "id"}
    if kind == "null id":
        pq.write_table(pa.table({"id": ["x1", None], "text": ["a", "b"]}), tmp_path / "p.parquet")
        return "p.parquet", {"id_column": "id"}
    if kind == "missing id column":
        pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
        return "p.parquet", {"id_column": "post_id"}
    if kind == "missing label column":
        pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
        return "p.parquet", {"label_column": "gold"}
    raise AssertionError(kind)


# kind -> what the message must say (besides the file name)
BAD_INPUT = {
    "missing text column": r"has no column 'text' \(corpus.text_column\); its columns are \['body'\]",
    "null text": r"the row at byte 14 \(id 'p.jsonl@14'\) has null text in column 'text'.*corpus.bad_rows=skip",
    "empty text": r"the row at byte 12 \(id 'p.csv@12'\) has empty text in column 'text'",
    "whitespace text": r"the row at byte 12 \(id 'p.csv@12'\) has empty text in column 'text'",
    "integer texts": r"column 'text' \(corpus.text_column\) holds int64, not text",
    "mixed-type texts": r"cannot read as jsonl",
    "invalid utf-8": r"the line at byte 5 is not valid UTF-8",
    "unknown gold label": r"the row at byte 35 \(id 'p.jsonl@35'\) has gold label 'angry' not in \['negative', 'neutral', "
                          r"'positive'\] in column 'label'",
    "gold index out of range": r"the row at byte 26 .*has gold label 5 not in .* in column 'label'",
    "duplicate ids": r"rows 0 and 2 have the same id 'x1' in column 'id' \(corpus.id_column\)",
    "null id": r"row 1 has a null id in column 'id'",
    "missing id column": r"has no column 'post_id' \(corpus.id_column\)",
    "missing label column": r"has no column 'gold' \(corpus.label_column\)",
}


@pytest.mark.parametrize("kind", list(BAD_INPUT))
def test_bad_input_names_the_file_row_and_field(tmp_path, kind):
    file_name, overrides = write_bad_corpus(tmp_path, kind)
    with pytest.raises(CorpusError, match=BAD_INPUT[kind]) as info:
        read_all(TEACHER_ORDER, path=str(tmp_path), **overrides)
    assert str(tmp_path / file_name) in str(info.value)


@pytest.mark.parametrize("kind, reason", [
    ("null text", "null text"), ("empty text", "empty text"), ("whitespace text", "empty text"),
    ("unknown gold label", "gold label 'angry' not in"), ("gold index out of range", "gold label 5 not in"),
])
def test_bad_rows_skip_marks_rows_instead_of_raising(tmp_path, kind, reason):
    file_name, overrides = write_bad_corpus(tmp_path, kind)
    table = read_all(TEACHER_ORDER, path=str(tmp_path), bad_rows="skip", **overrides)
    reasons = table.column("reject_reason").to_pylist()
    bad_row = 2 if file_name.endswith(".csv") else 1
    assert [i for i, r in enumerate(reasons) if r is not None] == [bad_row]
    assert reasons[bad_row].startswith(reason)
    assert table.column("label").to_pylist()[bad_row] is None


@pytest.mark.parametrize("kind", ["integer texts", "duplicate ids", "missing text column"])
def test_bad_rows_skip_still_refuses_file_level_problems(tmp_path, kind):
    _, overrides = write_bad_corpus(tmp_path, kind)
    with pytest.raises(CorpusError, match=BAD_INPUT[kind]):
        read_all(TEACHER_ORDER, path=str(tmp_path), bad_rows="skip", **overrides)


# ---------------------------------------------------------------------------- big files in parts


def posts(n: int) -> list[str]:
    return [f"post {i} " + "delay " * (i % 7) + ("🙂" if i % 5 == 0 else "") for i in range(n)]


def write_big(tmp_path, fmt: str, texts: list[str]):
    if fmt == "jsonl":
        write_jsonl(tmp_path / "big.jsonl", [{"text": t, "label": "positive"} for t in texts])
    elif fmt == "csv":
        write_csv(tmp_path / "big.csv", [{"text": t, "label": "positive"} for t in texts])
    else:
        (tmp_path / "big.txt").write_text("".join(t + "\n" for t in texts))
    return tmp_path / f"big.{'txt' if fmt == 'text' else fmt}"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "text"])
def test_a_big_file_reads_in_byte_ranges_as_it_reads_whole(tmp_path, fmt):
    path = write_big(tmp_path, fmt, posts(600))
    labels = {"label_column": "label"} if fmt != "text" else {}
    shards = list_shards(CorpusConfig(path=str(path), split_bytes=2048, **labels))
    assert len(shards) >= 4 and [s.start for s in shards] == sorted(s.start for s in shards)
    assert len({s.key for s in shards}) == len(shards)
    whole = read_all(TEACHER_ORDER, path=str(path), split_bytes=None, **labels)
    parts = read_all(TEACHER_ORDER, path=str(path), split_bytes=2048, **labels)
    assert parts.to_pylist() == whole.to_pylist()  # every row once, in order, with the same ids
    assert whole.column("text").to_pylist() == posts(600)
    assert whole.column("id").to_pylist() == line_ids(path, path.name, header=fmt == "csv")


def test_a_csv_with_quoted_newlines_is_read_whole_and_right(tmp_path):
    texts = [f"line one {i}\nline two" if i % 3 == 0 else f"post {i}" for i in range(400)]
    path = write_big(tmp_path, "csv", texts)
    [shard] = list_shards(CorpusConfig(path=str(path), split_bytes=1024))
    assert shard.stop is None
    table = read_all(path=str(path), split_bytes=1024)
    assert table.column("text").to_pylist() == texts


def test_a_quoted_newline_past_the_sniffed_head_stops_a_split_csv_with_the_byte(tmp_path, monkeypatch):
    import kd_ray.data.corpus

    texts = [f"post {i}" for i in range(400)] + ["two\nlines"] + [f"post {i}" for i in range(400)]
    path = write_big(tmp_path, "csv", texts)
    monkeypatch.setattr(kd_ray.data.corpus, "SNIFF_BYTES", 512)
    with pytest.raises(CorpusError, match=r"big.csv: a quoted field spans lines near byte \d+, so this file cannot be "
                                          r"read in byte ranges; set corpus.split_bytes: null"):
        read_all(path=str(path), split_bytes=1024)


def test_a_corrupt_range_names_the_file_and_its_bytes(tmp_path):
    path = write_big(tmp_path, "jsonl", posts(600))
    raw = path.read_bytes()
    broken = raw.index(b"\n", 9000) + 1
    path.write_bytes(raw[:broken] + b'{"text": "cut off\n' + raw[broken:])
    with pytest.raises(CorpusError, match=r"big.jsonl: bytes \d+-\d+: cannot read as jsonl") as info:
        read_all(path=str(path), split_bytes=2048)
    first, last = map(int, re.search(r"bytes (\d+)-(\d+)", str(info.value)).groups())
    assert first <= broken < last <= first + 2 * 2048  # the range that holds the broken line, not the file


def test_a_big_parquet_file_reads_in_runs_of_row_groups(tmp_path):
    texts = posts(3000)
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=200)
    shards = list_shards(CorpusConfig(path=str(tmp_path), split_bytes=4096))
    assert len(shards) >= 4
    table = read_all(path=str(tmp_path), split_bytes=4096)
    assert table.column("id").to_pylist() == [f"big.parquet:{i}" for i in range(3000)]
    assert table.column("text").to_pylist() == texts


# ---------------------------------------------------------------------------- corpus size and block sizes


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "text", "parquet"])
def test_the_corpus_size_is_estimated_from_its_bytes_and_one_sample(tmp_path, fmt, monkeypatch):
    import kd_ray.data.corpus

    monkeypatch.setattr(kd_ray.data.corpus, "SNIFF_BYTES", 4096)  # a sample smaller than the file, as in real corpora
    texts = posts(3000)
    if fmt == "parquet":
        pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=200)
        path = tmp_path / "big.parquet"
    else:
        path = write_big(tmp_path, fmt, texts)
    whole = list_shards(CorpusConfig(path=str(path), split_bytes=None))
    parts = list_shards(CorpusConfig(path=str(path), split_bytes=8192))
    assert len(whole) == 1 and len(parts) >= 4
    for shards in (whole, parts):
        assert abs(estimated_rows(shards) - 3000) <= 0.1 * 3000, (fmt, estimated_rows(shards))
    if fmt == "parquet":
        assert estimated_rows(whole) == 3000  # the footer counts them


def test_a_compressed_corpus_has_no_size_estimate(tmp_path):
    with gzip.open(tmp_path / "posts.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in posts(100))
    assert estimated_rows(list_shards(CorpusConfig(path=str(tmp_path)))) is None


@pytest.mark.parametrize("rows, actors, most, expected", [
    (25_000, 2, 8192, 6250),   # 4 even blocks, not 8192, 8192, 8192, 424
    (25_000, 2, 2048, 1786),   # 14 blocks, 7 an actor
    (1_000_000, 16, 8192, 7813),
    (10, 4, 8192, 3),          # fewer rows than a block per actor
    (None, 2, 8192, 8192),     # size unknown: blocks as configured
])
def test_blocks_are_evened_out_over_the_actors(rows, actors, most, expected):
    from kd_ray.stages.label import balanced_block_rows

    size = balanced_block_rows(rows, actors, most)
    assert size == expected and size <= most
    if rows:
        assert -(-rows // size) % actors == 0  # whole rounds: every actor gets as many blocks
