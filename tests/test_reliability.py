"""Labeling that resumes and loses nothing; processes killed mid-run (marked `fault`).

Every run shares the session's Ray instance. The kill tests kill real processes: a Ray Data
labeling actor, the labeling driver (SIGKILL, then the same command again), a Ray Train
worker. Each asserts that the output holds exactly the input's ids, once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_posts
from test_label import label_cfg, read_parts, teacher  # noqa: F401  (teacher is a fixture)

from kd_ray.data.soft_labels import MANIFEST, REJECTED_DIR
from kd_ray.errors import KdRayUserError, SoftLabelError
from kd_ray.stages.label import RUN_STATE, run_label


def write_corpus(folder: Path, files: int, rows_per_file: int, seed: int = 0) -> set[str]:
    """Parquet files with an id column; returns every id."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = set()
    for f in range(files):
        texts = random_posts(rows_per_file, seed=seed + f)
        file_ids = [f"f{f}-{i}" for i in range(rows_per_file)]
        pq.write_table(pa.table({"id": file_ids, "text": texts}), folder / f"posts-{f}.parquet")
        ids |= set(file_ids)
    return ids


def part_files(out: Path) -> dict[str, int]:
    """Committed part file -> modification time."""
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


def ids_of(out: Path) -> list[str]:
    return read_parts(out).column("id").to_pylist()


def as_interrupted(out: Path, drop_parts: int) -> dict[str, int]:
    """Turn a finished output into what a crash leaves: no manifest, the run state, some part
    files never committed, a half-written temporary file. Returns the committed files kept."""
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).unlink()
    (out / RUN_STATE).write_text(json.dumps({"config_hash": manifest["config_hash"]}))
    for name in sorted(part_files(out))[:drop_parts]:
        (out / name).unlink()
    (out / ".tmp-00007-deadbeef.parquet").write_bytes(b"PAR1 half a file")
    return part_files(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-corpus")
    return root, write_corpus(root, files=3, rows_per_file=1_000)


RESUME = {"corpus.id_column": "id", "compute.block_rows": 250, "output.rows_per_file": 400}


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory):
    """One JSON Lines file of 4,000 posts (no ids: derived from byte offsets), read as >= 4 byte ranges."""
    root = tmp_path_factory.mktemp("split-corpus")
    texts = random_posts(4_000, seed=21)
    (root / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    offsets = np.cumsum([0] + [len(json.dumps({"text": t}).encode()) + 1 for t in texts])[:-1]
    return root, {f"big.jsonl@{o}" for o in offsets}


SPLIT = {"corpus.split_bytes": 32 << 10, "compute.block_rows": 250, "output.rows_per_file": 600}


@pytest.mark.slow
def test_a_split_file_resumes_by_range_and_a_row_written_twice_is_found_by_its_shards_check(
        capsys, ray_session, teacher, split_corpus, tmp_path):  # noqa: F811
    from kd_ray.data.corpus import list_shards
    from kd_ray.stages.label import _duplicate_ids, build_metadata, read_parts

    root, ids = split_corpus
    out = tmp_path / "labels"
    cfg = label_cfg(root, teacher, out, **SPLIT)
    shards = {s.key: s for s in list_shards(cfg.corpus)}
    assert len(shards) >= 4
    run_label(cfg)
    # every row group of every part file holds the rows of the one shard its footer names
    parts = read_parts(str(out), build_metadata(cfg))
    assert set(parts.shards) == set(shards)
    for key, files in parts.shards.items():
        for file, groups in files:
            got = pq.ParquetFile(file).read_row_groups(groups, columns=["id"]).column("id").to_pylist()
            offsets = [int(i.split("@")[1]) for i in got]
            assert all(shards[key].start <= o < shards[key].stop for o in offsets), key
    kept = as_interrupted(out, drop_parts=3)
    kept_rows = sum(pq.read_metadata(out / name).num_rows for name in kept)
    capsys.readouterr()
    summary = run_label(cfg)
    assert f"holds {kept_rows} rows in {len(kept)} committed files" in capsys.readouterr().out
    assert summary.kept_rows == kept_rows and summary.rows == 4_000
    assert sorted(ids_of(out)) == sorted(ids)  # every line exactly once
    assert {n: t for n, t in part_files(out).items() if n in kept} == kept  # committed files untouched

    # A part file copied under another name (what a retried write with other blocks would leave): the
    # per-shard check names the duplicated ids, so such a run is not committed.
    assert _duplicate_ids(read_parts(str(out), build_metadata(cfg)), None) == []
    shutil.copy(sorted(out.glob("part-*.parquet"))[0], out / "part-99999-0000000000000000.parquet")
    problems = _duplicate_ids(read_parts(str(out), build_metadata(cfg)), None)
    assert problems and all("appears more than once (2 rows)" in p for p in problems)


@pytest.mark.slow
def test_an_unfinished_run_of_another_config_is_refused(ray_session, teacher, corpus, tmp_path):  # noqa: F811
    root, _ = corpus
    out = tmp_path / "labels"
    out.mkdir()
    (out / RUN_STATE).write_text(json.dumps({"config_hash": "0123456789abcdef"}))
    (out / "part-00000-0000.parquet").write_bytes(b"x")
    with pytest.raises(KdRayUserError, match=r"already holds an unfinished run of another config \(hash "
                                             r"0123456789abcdef\).*set output.overwrite=true"):
        run_label(label_cfg(root, teacher, out, **RESUME))
    assert (out / "part-00000-0000.parquet").read_bytes() == b"x"  # nothing touched


@pytest.mark.slow
def test_an_unfinished_run_of_an_earlier_schema_is_not_resumed(ray_session, teacher, corpus, tmp_path):  # noqa: F811
    """Soft-label schema 1 named a line file's rows '<file>:<row>' (2 and 3: '<file>@<byte offset>'), and 1 and 2
    kept the first task's gold in 'label': an interrupted folder of an earlier version cannot be resumed (its
    ids or columns would not match), and says so."""
    root, _ = corpus
    out = tmp_path / "labels"
    out.mkdir()
    (out / RUN_STATE).write_text(json.dumps({"config_hash": "0123456789abcdef"}))
    old = pa.table({"id": ["posts.jsonl:0"]}).replace_schema_metadata({"kd_ray": json.dumps({"schema_version": 1})})
    pq.write_table(old, out / "part-00000-0000.parquet")
    with pytest.raises(KdRayUserError, match=r"holds an unfinished run of an earlier kd-ray, with soft-label schema "
                                             r"version 1; this kd-ray writes version 3 and cannot resume it"):
        run_label(label_cfg(root, teacher, out, **RESUME))
    assert pq.read_table(out / "part-00000-0000.parquet").equals(old)  # nothing touched


@pytest.mark.slow
def test_a_rerun_after_an_interruption_labels_only_the_rest_unless_the_corpus_changed_since(
        capsys, ray_session, teacher, corpus, tmp_path):  # noqa: F811
    root, ids = corpus
    changed = shutil.copytree(root, tmp_path / "corpus")
    out = tmp_path / "labels"
    first = run_label(label_cfg(changed, teacher, out, **RESUME))
    before = read_parts(out)
    kept = as_interrupted(out, drop_parts=3)
    kept_rows = sum(pq.read_metadata(out / name).num_rows for name in kept)
    assert 0 < kept_rows < 3_000

    capsys.readouterr()
    summary = run_label(label_cfg(changed, teacher, out, **RESUME))
    assert f"resuming: {out} holds {kept_rows} rows in {len(kept)} committed files" in capsys.readouterr().out
    assert summary.kept_rows == kept_rows and summary.rows == 3_000 == first.rows
    assert f"resumed: {kept_rows} rows kept from the interrupted run, {3_000 - kept_rows} done now" in summary.line()
    assert sorted(ids_of(out)) == sorted(ids)  # every row exactly once
    assert {n: t for n, t in part_files(out).items() if n in kept} == kept  # committed files untouched
    assert not list(out.glob(".tmp-*")) and not (out / RUN_STATE).exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == 3_000 and manifest["kept_rows"] == kept_rows
    assert sorted(manifest["files"]) == sorted(part_files(out))
    # the rows labeled again got the same logits as the first time
    again = read_parts(out).sort_by("id")
    np.testing.assert_allclose(np.array(again.column("teacher_logits").to_pylist()),
                               np.array(before.sort_by("id").column("teacher_logits").to_pylist()), atol=1e-5)

    # interrupted again, and a file whose rows were committed is gone before the rerun
    as_interrupted(out, drop_parts=1)
    (changed / "posts-0.parquet").unlink()
    with pytest.raises(SoftLabelError, match=r"the corpus gave \d+ rows whose ids the interrupted run committed, "
                                             r"which committed \d+: the corpus changed since, or its ids are not unique"):
        run_label(label_cfg(changed, teacher, out, **RESUME))
    assert not (out / MANIFEST).exists()
    with pytest.raises(KdRayUserError, match=r"already holds a run of this config that failed validation \(the "
                                             r"corpus gave"):
        run_label(label_cfg(changed, teacher, out, **RESUME))
    summary = run_label(label_cfg(changed, teacher, out, **RESUME, **{"output.overwrite": True}))
    assert summary.rows == 2_000 and summary.kept_rows == 0


@pytest.mark.slow
def test_a_corrupt_parquet_file_among_good_ones_is_named_and_the_fixed_corpus_resumes(
        ray_session, teacher, corpus, tmp_path):  # noqa: F811
    root, ids = corpus
    broken = shutil.copytree(root, tmp_path / "corpus")
    good = (broken / "posts-2.parquet").read_bytes()
    (broken / "posts-2.parquet").write_bytes(good[: len(good) // 2])  # truncated mid-file
    out = tmp_path / "labels"
    with pytest.raises(Exception, match=r"posts-2.parquet: cannot read as parquet"):
        run_label(label_cfg(broken, teacher, out, **RESUME))
    assert not (out / MANIFEST).exists()
    (broken / "posts-2.parquet").write_bytes(good)
    summary = run_label(label_cfg(broken, teacher, out, **RESUME))
    assert sorted(ids_of(out)) == sorted(ids) and summary.rows == 3_000


@pytest.mark.slow
def test_a_megabyte_text_is_a_bad_row_that_skip_sets_aside(ray_session, teacher, tmp_path):  # noqa: F811
    rows = {"id": ["a", "big", "c"], "text": ["fine post", "x" * 1_048_576, "another post"]}
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "corpus" / "posts.parquet")
    with pytest.raises(Exception, match=r"posts.parquet: row 1 \(id 'big'\) has a text of 1,048,576 characters "
                                        r"\(over corpus.max_text_chars=100,000\) in column 'text'"):
        run_label(label_cfg(tmp_path / "corpus", teacher, tmp_path / "a", **{"corpus.id_column": "id"}))
    summary = run_label(label_cfg(tmp_path / "corpus", teacher, tmp_path / "b",
                                  **{"corpus.id_column": "id", "corpus.bad_rows": "skip"}))
    assert (summary.rows, summary.rejected) == (2, 1)
    rejected = pq.read_table(tmp_path / "b" / REJECTED_DIR)
    assert rejected.column("id").to_pylist() == ["big"]
    assert rejected.column("reject_reason")[0].as_py().startswith("a text of 1,048,576 characters")


# ---------------------------------------------------------------------------- processes killed


def alive_actors(class_part: str) -> list:
    """Live actors whose class name holds ``class_part``, from Ray's state API (Ray Data names a
    fused map's actors after every step, e.g. ``MapWorker(MapBatches(tokenize_batch)->MapBatches(...))``)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True) if class_part in a.class_name]


def run_in_thread(fn, *args):
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.fault
def test_a_labeling_actor_killed_mid_run_is_replaced_and_no_row_is_lost(ray_session, teacher, tmp_path):  # noqa: F811
    ids = write_corpus(tmp_path / "corpus", files=8, rows_per_file=5_000)
    out = tmp_path / "labels"
    cfg = label_cfg(tmp_path / "corpus", teacher, out, **{
        "corpus.id_column": "id", "compute.block_rows": 500, "output.rows_per_file": 5_000,
        "compute.concurrency": 2})
    thread, box = run_in_thread(run_label, cfg)
    deadline, workers = time.time() + 120, []
    while len(workers) < 2 and thread.is_alive() and time.time() < deadline:
        workers = alive_actors("MapBatches(TeacherLabeler)")
        time.sleep(0.05)
    while not part_files(out) and thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)  # the actors have labeled rows and a part file is committed
    victim = workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    killed_mid_run = thread.is_alive() and len(part_files(out)) < 8
    thread.join(300)
    assert "error" not in box, box.get("error")
    assert killed_mid_run
    assert sorted(ids_of(out)) == sorted(ids)  # nothing lost, nothing twice
    assert box["result"].rows == len(ids)
    import psutil

    assert not psutil.pid_exists(victim.pid) or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.fault
@pytest.mark.parametrize("command", ["label", "predict"])  # predictions are written by labeling's path
def test_a_labeling_driver_killed_then_rerun_finishes_with_every_row_once(command, ray_session, teacher,  # noqa: F811
                                                                          tmp_path):
    ids = write_corpus(tmp_path / "corpus", files=4, rows_per_file=5_000)
    out = tmp_path / "labels"
    model = {"label": "--teachers.0.model", "predict": "--model"}[command]
    flags = ["--corpus.path", str(tmp_path / "corpus"), "--corpus.id_column", "id", model, str(teacher),
             "--output.path", str(out), "--compute.block_rows", "500", "--output.rows_per_file", "2000",
             "--compute.concurrency", "2", "--ray.address", ray_session.get_runtime_context().gcs_address]
    command = [sys.executable, "-m", "kd_ray.cli", command, *flags]
    # The driver is its own job in the session's Ray instance: killing it ends its job's actors and
    # tasks, as when a `ray job submit` driver or its node dies.
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while len(part_files(out)) < 3 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(2)  # let Ray end the dead job's workers
    committed = part_files(out)
    assert len(committed) >= 3, (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / MANIFEST).exists()
    committed_rows = sum(pq.read_metadata(out / n).num_rows for n in committed)
    assert committed_rows < len(ids), "the first run finished before it was killed"

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"holds {committed_rows} rows in {len(committed)} committed files" in second.stdout
    assert f"resumed: {committed_rows} rows kept from the interrupted run, {len(ids) - committed_rows} done now" \
        in second.stdout
    assert sorted(ids_of(out)) == sorted(ids)
    assert {n: t for n, t in part_files(out).items() if n in committed} == committed  # not relabeled
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == len(ids) and manifest["kept_rows"] == committed_rows


@pytest.mark.fault
def test_a_training_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(tmp_path, soft_labels):
    from test_train import _distill_cfg

    from kd_ray.stages.train import read_run_info, run_distill

    overrides = {"train.epochs": 4, "train.max_failures": 2, "train.seed": 1}
    plain = tmp_path / "uninterrupted"  # the reference needs no worker group: Ray Train's local mode, same loop
    run_distill(_distill_cfg(soft_labels, plain / "student", **overrides, **{"train.num_workers": 0}))
    cfg = _distill_cfg(soft_labels, tmp_path / "student", **overrides)
    thread, box = run_in_thread(run_distill, cfg)
    deadline, killed = time.time() + 300, None
    while killed is None and thread.is_alive() and time.time() < deadline:
        if list((tmp_path / "ray_train").glob("*/checkpoint_manager_snapshot.json")):  # epoch 1 is checkpointed
            workers = alive_actors("RayTrainWorker")
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed = thread.is_alive() and not (tmp_path / "student").exists()
        time.sleep(0.05)
    thread.join(300)
    assert "error" not in box, box.get("error")
    assert killed, "the run ended before its worker could be killed"
    history = read_run_info(str(tmp_path / "student"))["history"]
    plain = read_run_info(str(plain / "student"))["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["resumed_from_epoch"] >= 1  # the last epochs ran in a new worker group, from a checkpoint
    # same data order and RNG state after the restore: the losses match the uninterrupted run's
    np.testing.assert_allclose([h["train_loss"] for h in history], [h["train_loss"] for h in plain], rtol=0.02)
