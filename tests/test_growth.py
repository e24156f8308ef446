"""A corpus that grows: a rerun labels only new files and appended records, and refuses a changed or lost file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import random_posts
from test_corpus import line_ids, write_jsonl
from test_reproducible import sha256

from kd_ray.config import CorpusConfig, LabelConfig, load_config
from kd_ray.data.corpus import list_shards
from kd_ray.data.growth import corpus_growth, file_records
from kd_ray.data.soft_labels import MANIFEST
from kd_ray.errors import CorpusError
from kd_ray.stages.label import run_label


def _posts(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [{"text": t} for t in random_posts(n, seed=seed)])
    return path


def _append(path: Path, n: int, seed: int) -> None:
    stat = path.stat()
    with path.open("a") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in random_posts(n, seed=seed)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write, whatever the clock's grain


def _growth(folder: Path, recorded: dict, labeled: set[str], split_bytes: int | None = None):
    cfg = CorpusConfig(path=str(folder), split_bytes=split_bytes)
    return corpus_growth(cfg, list_shards(cfg), recorded, labeled, "out")


def _labeled(folder: Path, split_bytes: int | None = None) -> tuple[dict, set[str]]:
    shards = list_shards(CorpusConfig(path=str(folder), split_bytes=split_bytes))
    return file_records(shards), {s.key for s in shards}


# ---------------------------------------------------------------------------- the comparison alone


def test_an_unchanged_corpus_has_nothing_to_label(tmp_path):
    _posts(tmp_path / "c" / "a.jsonl", 20, 1)
    assert _growth(tmp_path / "c", *_labeled(tmp_path / "c")).shards == []


def test_a_new_file_and_an_appended_range_are_what_a_rerun_labels(tmp_path):
    a = _posts(tmp_path / "c" / "a.jsonl", 50, 1)
    _posts(tmp_path / "c" / "b.jsonl", 50, 2)
    recorded, labeled = _labeled(tmp_path / "c", split_bytes=1024)
    size = a.stat().st_size
    _append(a, 30, 3)
    _posts(tmp_path / "c" / "sub" / "new.jsonl", 10, 4)
    growth = _growth(tmp_path / "c", recorded, labeled, split_bytes=1024)
    assert growth.new_files == ["sub/new.jsonl"] and growth.appended == ["a.jsonl"]
    ranges = [(s.start, s.stop) for s in growth.shards if s.name == "a.jsonl"]
    assert ranges[0][0] == size and ranges[-1][1] == a.stat().st_size and all(b - a <= 1024 for a, b in ranges)
    assert not {s.key for s in growth.shards} & labeled
    assert growth.line() == "1 new file, 1 file with appended records"


@pytest.mark.parametrize("change, message", [
    ("removed", "a.jsonl was labeled but is gone"),
    ("shrank", r"a.jsonl shrank since it was labeled \(\d[\d,]* bytes then"),
    ("edited", "a.jsonl changed in place since it was labeled"),
    ("edited near its end, then appended to", "a.jsonl changed in place"),
])
def test_a_file_removed_shrunk_or_edited_is_refused_by_name(tmp_path, change, message):
    a = _posts(tmp_path / "c" / "a.jsonl", 50, 1)
    _posts(tmp_path / "c" / "b.jsonl", 50, 2)
    recorded, labeled = _labeled(tmp_path / "c")
    stat = a.stat()
    if change == "removed":
        a.unlink()
    elif change == "shrank":
        a.write_text(a.read_text()[:100])
    elif change == "edited":
        a.write_text(a.read_text().replace("e", "E"))
    else:
        text = a.read_text()
        a.write_text(text[:-5] + "x}\n" + json.dumps({"text": "new"}) + "\n")
    if change != "removed":
        os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CorpusError, match=message) as err:
        _growth(tmp_path / "c", recorded, labeled)
    assert "output.overwrite: true" in str(err.value)


def test_a_parquet_file_that_changed_is_refused_not_read_as_an_append(tmp_path):
    import pyarrow as pa

    folder = tmp_path / "c"
    folder.mkdir()
    pq.write_table(pa.table({"text": random_posts(20, seed=1)}), folder / "a.parquet")
    recorded, labeled = _labeled(folder)
    stat = (folder / "a.parquet").stat()
    pq.write_table(pa.table({"text": random_posts(40, seed=1)}), folder / "a.parquet")
    os.utime(folder / "a.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CorpusError, match="a.parquet changed in place"):
        _growth(folder, recorded, labeled)


# ---------------------------------------------------------------------------- kd-ray label


def _label_cfg(corpus: Path, teacher: Path, out: Path, **overrides) -> LabelConfig:
    return load_config(LabelConfig, overrides={"corpus.path": str(corpus), "teachers.0.model": str(teacher),
                                               "output.path": str(out), "compute.concurrency": 1, **overrides})


def _ids(folder: Path) -> list[str]:
    return pq.read_table(sorted(folder.glob("part-*.parquet")), columns=["id"]).column("id").to_pylist()


@pytest.mark.slow
def test_a_rerun_labels_only_the_new_file_and_the_appended_lines_and_keeps_the_old_files(tmp_path, tiny_teacher,
                                                                                        ray_session, capsys):
    corpus, out = tmp_path / "corpus", tmp_path / "labels"
    a = _posts(corpus / "a.jsonl", 300, 1)
    _posts(corpus / "b.jsonl", 200, 2)
    cfg = _label_cfg(corpus, tiny_teacher, out, **{"corpus.split_bytes": 4096})
    run_label(cfg)
    old = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    assert sorted(_ids(out)) == sorted(line_ids(a, "a.jsonl") + line_ids(corpus / "b.jsonl", "b.jsonl"))

    _posts(corpus / "c.jsonl", 120, 3)
    _append(a, 40, 4)
    summary = run_label(cfg)
    printed = capsys.readouterr().out
    assert "kd-ray label: corpus grew: 1 new file, 1 file with appended records" in printed
    ids = _ids(out)
    expected = line_ids(a, "a.jsonl") + line_ids(corpus / "b.jsonl", "b.jsonl") + line_ids(corpus / "c.jsonl", "c.jsonl")
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(expected) and summary.rows == 660
    assert summary.kept_rows == 500 and "grew: 500 rows kept from the folder's labeling, 160 done now" in summary.line()
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet") if p.name in old} == old  # untouched
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == 660 and set(manifest["corpus"]) == {"a.jsonl", "b.jsonl", "c.jsonl"}
    assert manifest["corpus"]["a.jsonl"]["size"] == a.stat().st_size

    assert run_label(cfg).skipped_existing  # and now it is done
    (corpus / "b.jsonl").unlink()
    with pytest.raises(CorpusError, match=f"{corpus / 'b.jsonl'} was labeled but is gone"):
        run_label(cfg)
    relabeled = run_label(cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": True})}))
    assert relabeled.rows == 460 and sorted(_ids(out)) == sorted(
        line_ids(a, "a.jsonl") + line_ids(corpus / "c.jsonl", "c.jsonl"))


@pytest.mark.slow
def test_a_second_run_on_a_copy_of_the_data_trains_the_same_models_then_labels_a_new_day_and_distills_again(
        finished_run, tmp_path, capsys):
    """Same config, same result: a run over a copy of the session run's data, in another folder, ends with
    bit-identical teacher, soft labels and students. Then a day's file lands in the transfer folder: the same
    command labels only its rows and distills again, from scratch."""
    import shutil

    import pyarrow.compute as pc

    from kd_ray.cli import main as cli_main

    shutil.copytree(finished_run.root / "data", tmp_path / "data")
    config = yaml.safe_load((finished_run.root / "run.yaml").read_text().replace(
        str(finished_run.root), str(tmp_path)))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    first, run = finished_run.run, tmp_path / "run"

    def rows(folder: Path):
        table = pq.read_table(sorted(folder.glob("part-*.parquet")))
        return table.take(pc.sort_indices(table.column("id")))

    assert rows(first / "soft_labels").equals(rows(run / "soft_labels"))
    for model in ("teacher", "student", "student_alpha0"):
        assert sha256(first / model / "model.safetensors") == sha256(run / model / "model.safetensors"), model
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (first, run)]
    assert [m[k]["macro_recall"] for m in metrics for k in ("teacher", "student", "student_alpha0")] == [
        metrics[0][k]["macro_recall"] for k in ("teacher", "student", "student_alpha0")] * 2

    old_parts = {p.name: p.read_bytes() for p in (run / "soft_labels").glob("part-*.parquet")}
    students = {p: sha256(p) for p in (run / "student" / "model.safetensors", run / "student_alpha0" / "model.safetensors")}
    (tmp_path / "data" / "transfer" / "day2.csv").write_text("id,text\n" + "".join(
        f"day2-{i},{t}\n" for i, t in enumerate(random_posts(60, seed=11, max_words=10))))
    capsys.readouterr()
    assert cli_main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "corpus grew: 1 new file" in out and "skipping finetune" in out
    assert "stage distill started" in out
    assert json.loads((run / "soft_labels" / MANIFEST).read_text())["rows"] == 400 + 60
    assert {p.name: p.read_bytes() for p in (run / "soft_labels").glob("part-*.parquet") if p.name in old_parts} \
        == old_parts
    info = json.loads((run / "student" / "kd_ray_train.json").read_text())
    assert info["plan"]["rows"] == 460 and info["history"][0]["resumed_from_epoch"] == 0
    assert sha256(run / "student" / "model.safetensors") != students[run / "student" / "model.safetensors"]
