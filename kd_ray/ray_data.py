"""Ray Data edges of the corpus reader: a corpus as a Ray Dataset of checked rows."""

from __future__ import annotations

from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from kd_ray.augment import augment_table
from kd_ray.config import AugmentConfig, CorpusConfig
from kd_ray.corpus import ALREADY_LABELED, Shard, list_shards, read_shard
from kd_ray.storage import filesystem


def _mark_already_labeled(table: pa.Table, done: pa.Array) -> pa.Table:
    """Rows whose id is in ``done`` keep only their id, with reason ALREADY_LABELED: no teacher
    runs on them and the writer counts them instead of writing them."""
    hit = pc.is_in(table.column("id"), value_set=done)
    if not pc.any(hit).as_py():
        return table
    reasons = pc.if_else(hit, pa.scalar(ALREADY_LABELED), table.column("reject_reason"))
    texts = pc.if_else(hit, pa.scalar(None, pa.string()), table.column("text"))
    return table.set_column(1, "text", texts).set_column(3, "reject_reason", reasons)


def _read_shards_udf(batch: pa.Table, corpus_cfg: CorpusConfig, label_to_index: dict | None, done_ids: list,
                     task_labels: dict | None, augment: AugmentConfig | None, mask_token: str | None):
    done = ray.get(done_ids[0]) if done_ids else None
    for row in batch.to_pylist():
        for table in read_shard(Shard(**row), corpus_cfg, label_to_index, task_labels):
            if augment is not None:
                table = augment_table(table, augment, mask_token, source=row["uri"])
            yield table if done is None else _mark_already_labeled(table, done)


def corpus_dataset(cfg: CorpusConfig, label_to_index: dict[str, int] | None, *, block_rows: int | None = None,
                   num_cpus: float | None = None, done_ids: ray.ObjectRef | None = None,
                   task_labels: dict[str, dict[str, int]] | None = None, augment: AugmentConfig | None = None,
                   mask_token: str | None = None) -> ray.data.Dataset:
    """Rows ``id, text, label, reject_reason`` (and ``label_<task>`` per task_labels; see
    kd_ray.corpus), one read task per shard.

    block_rows: cut each shard's rows into blocks of at most this many rows, so that a
    single big file still spreads over many downstream actors.
    done_ids: an Arrow string array (in the object store) of ids labeled by an earlier,
    interrupted run; their rows come out marked ALREADY_LABELED, without text.
    augment: add perturbed copies of every accepted row after it (kd_ray.augment).
    """
    shards = list_shards(cfg)
    ds = ray.data.from_items([asdict(s) for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(_read_shards_udf, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                        fn_kwargs={"corpus_cfg": cfg, "label_to_index": label_to_index,
                                   "done_ids": [done_ids] if done_ids is not None else [],
                                   "task_labels": task_labels, "augment": augment, "mask_token": mask_token})
    if block_rows:
        # Ray fuses this into the read task when both ask for the same resources.
        ds = ds.repartition(target_num_rows_per_block=block_rows)
    return ds


def _read_parquet_udf(batch: pa.Table, columns: list[str], rows_per_block: int):
    import pyarrow.parquet as pq

    for path in batch.column("path").to_pylist():
        fs, local = filesystem(path)
        with fs.open_input_file(local) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_block, columns=columns):
                yield pa.Table.from_batches([record_batch])


def parquet_files_dataset(files: list[str], columns: list[str], *, num_cpus: float,
                          rows_per_block: int = 8192) -> ray.data.Dataset:
    """Stream known Parquet files, one light task per file.

    Unlike ``ray.data.read_parquet`` this needs no file-listing task, which asks for a
    whole CPU and would wait forever while training workers hold every core.
    """
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return ds.map_batches(_read_parquet_udf, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                          fn_kwargs={"columns": columns, "rows_per_block": rows_per_block})
