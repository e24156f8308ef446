"""Same config, same seed, same student: nothing a run produces depends on the order Ray's tasks finish in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import LABELS, failing_after_epoch

from kd_ray.config import DistillConfig, load_config
from kd_ray.data.soft_labels import PART_KEY, SoftLabelInfo, parquet_writer, read_soft_label_info
from kd_ray.stages.train import run_distill

FAST = {"train.epochs": 2, "train.batch_size": 16, "train.max_length": 32, "train.num_cpus_per_worker": 0.5,
        "train.max_failures": 0, "student.num_layers": 1, "student.ffn_size": None}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _distill(soft_labels: Path, out: Path, **overrides) -> Path:
    run_distill(load_config(DistillConfig, overrides={"soft_labels": str(soft_labels), "output": str(out),
                                                      **FAST, **overrides}))
    return out / "model.safetensors"


def _rows_by_id(folder: Path) -> pa.Table:
    table = pq.read_table(sorted(folder.glob("part-*.parquet")))
    return table.take(pc.sort_indices(table.column("id")))


def _relabeled_in_another_order(soft_labels: Path, out: Path) -> Path:
    """The same rows as another labeling run could have left them: every shard's rows in one file (not the
    files the run wrote), shards in reverse order, each shard's rows reversed."""
    info = read_soft_label_info(str(soft_labels))
    table = _rows_by_id(soft_labels)
    schema = pq.read_schema(info.files[0])
    shard_of = {}
    for key, groups in info.shards.items():
        for file, row_groups in groups:
            for rg in row_groups:
                for i in pq.ParquetFile(file).read_row_group(rg, columns=["id"]).column("id").to_pylist():
                    shard_of[i] = key
    out.mkdir()
    keys = pa.array([shard_of[i] for i in table.column("id").to_pylist()])
    shards = sorted(info.shards, reverse=True)
    with parquet_writer(str(out / "part-00007-reordered.parquet"), schema) as writer:
        for key in shards:
            rows = table.filter(pc.equal(keys, key))
            writer.write_table(rows.take(pa.array(range(rows.num_rows - 1, -1, -1))).cast(schema),
                               row_group_size=rows.num_rows)
        writer.add_key_value_metadata({PART_KEY: json.dumps({"rows": table.num_rows, "shards": shards})})
    return out


def test_read_units_follow_the_shard_keys_not_the_file_names():
    info = SoftLabelInfo(path="x", files=["x/part-00001-b.parquet", "x/part-00000-a.parquet"], metadata={},
                         num_rows=0, shards={"b.csv[0:10]": [["x/part-00000-a.parquet", [1]]],
                                             "a.csv[0:10]": [["x/part-00001-b.parquet", [0]],
                                                             ["x/part-00000-a.parquet", [0]]]})
    assert info.read_units() == [[["x/part-00001-b.parquet", [0]], ["x/part-00000-a.parquet", [0]]],
                                 [["x/part-00000-a.parquet", [1]]]]


@pytest.mark.slow
def test_stopped_and_resumed_or_from_soft_labels_written_in_another_order_two_workers_train_the_same_student(
        rep_labels, tmp_path, monkeypatch):
    """Each worker checkpoints its own random state (python, numpy, torch, cuda) beside the model, and the
    representation term's projection beside the optimizer; a resume restores them, with the data order, so the
    resumed run ends where one never stopped ends. That one reads the same rows as another labeling run could
    have left them (other files, shards and rows in reverse order): the data order follows the shards and ids,
    not the files or the order Ray's tasks finished in. The student exported has no projection in it."""
    import torch
    from safetensors.torch import load_file
    from transformers import pipeline

    two_workers = {"train.num_workers": 2, "train.num_cpus_per_worker": 0.25, "train.shuffle_buffer": 100,
                   "loss.beta": 1.0}
    cfg = load_config(DistillConfig, overrides={"soft_labels": str(rep_labels), "output": str(tmp_path / "resumed"),
                                                **FAST, **two_workers})
    with failing_after_epoch(1, monkeypatch):
        run_distill(cfg)
    assert not (tmp_path / "resumed").exists()  # nothing exported from a failed run
    (checkpoint,) = [c for c in (tmp_path / "ray_train").glob("*/checkpoint_*") if (c / "train_state.pt").is_file()]
    states = [torch.load(checkpoint / f"rng_state_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(set(s) == {"python", "numpy", "torch", "cuda"} for s in states)
    assert states[0]["torch"].ne(states[1]["torch"]).any() or states[0]["python"] != states[1]["python"]
    projection = torch.load(checkpoint / "train_state.pt", weights_only=False)["projection"]
    assert projection["maps.sentiment.weight"].shape == (32, 32)  # student width -> the teacher's
    run_distill(cfg)
    info = json.loads((tmp_path / "resumed" / "kd_ray_train.json").read_text())
    assert [h["resumed_from_epoch"] for h in info["history"]] == [0, 1]
    # two workers split the data: rank 0 reads half of the 600 rows (an equal split may drop num_workers - 1)
    assert all(299 <= h["rows"] <= 300 for h in info["history"]), [h["rows"] for h in info["history"]]
    assert info["plan"]["tasks"][0]["beta"] == 1.0
    assert not list((tmp_path / "resumed").glob("rng_state_*"))  # training state stays out of the model folder
    assert not (tmp_path / "resumed" / "train_state.pt").exists()
    assert not [k for k in load_file(tmp_path / "resumed" / "model.safetensors") if "maps." in k or "projection" in k]
    predictions = pipeline("text-classification", model=str(tmp_path / "resumed"))(["great flight", "awful seat"])
    assert {p["label"] for p in predictions} <= set(LABELS)

    reordered = _relabeled_in_another_order(rep_labels, tmp_path / "reordered")
    assert _rows_by_id(reordered).equals(_rows_by_id(rep_labels))  # same rows, other files and order
    uninterrupted = _distill(reordered, tmp_path / "whole", **two_workers)
    assert sha256(tmp_path / "resumed" / "model.safetensors") == sha256(uninterrupted)


@pytest.mark.parametrize("deterministic", [False, True])
def test_every_training_run_reads_its_data_in_order_and_deterministic_fixes_the_cublas_workspace(tmp_path,
                                                                                               deterministic):
    from kd_ray.config import FinetuneConfig
    from kd_ray.stages.plan import finetune_plan
    from kd_ray.stages.train import build_trainer

    cfg = load_config(FinetuneConfig, overrides={"data.path": "x.csv", "base_model": "m", "labels": ["a", "b"],
                                                 "output": str(tmp_path / "m"), "train.num_cpus_per_worker": 1,
                                                 "train.deterministic": deterministic})
    trainer = build_trainer(finetune_plan(cfg, rows=10), {}, "run", str(tmp_path))
    assert trainer.data_config._resolve_execution_options("train").preserve_order
    env = (trainer.run_config.worker_runtime_env or {}).get("env_vars", {})
    assert env.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if deterministic else None)
    assert trainer.train_loop_config["train"]["deterministic"] is deterministic
