"""Ray Data edges of the corpus reader: a corpus as a Ray Dataset of checked rows."""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from kd_ray.config import AugmentConfig, CorpusConfig
from kd_ray.data.augment import augment_table
from kd_ray.data.corpus import ALREADY_LABELED, SHARD_COLUMN, Shard, list_shards, read_shard
from kd_ray.data.soft_labels import SoftLabelInfo
from kd_ray.data.storage import filesystem


def _mark_already_labeled(table: pa.Table, done: pa.Array) -> pa.Table:
    """Rows whose id is in ``done`` keep only their id, with reason ALREADY_LABELED: no teacher
    runs on them and the writer counts them instead of writing them."""
    hit = pc.is_in(table.column("id"), value_set=done)
    if not pc.any(hit).as_py():
        return table
    reasons = pc.if_else(hit, pa.scalar(ALREADY_LABELED), table.column("reject_reason"))
    texts = pc.if_else(hit, pa.scalar(None, pa.string()), table.column("text"))
    return table.set_column(1, "text", texts).set_column(3, "reject_reason", reasons)


def read_shard_rows(groups: list, columns: list[str]) -> pa.Table | None:
    """One corpus shard's rows in a soft-label folder: the row groups ``[[part file, [row group, ...] or None
    (the whole file)], ...]`` name (SoftLabelInfo.shards, Parts.shards), ``columns`` only; None for none."""
    tables = []
    for file, row_groups in groups:
        fs, path = filesystem(file)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            tables.append(pf.read(columns=columns) if row_groups is None else
                          pf.read_row_groups(row_groups, columns=columns))
    return pa.concat_tables(tables) if tables else None


def committed_ids(committed: str | None) -> pa.Array | None:
    """Ids of the rows an interrupted run committed from one shard: only that shard's row groups of
    the part files that hold some (``[[file, [row group, ...]], ...]`` as JSON) are read."""
    table = read_shard_rows(json.loads(committed), ["id"]) if committed else None
    return table.column("id").combine_chunks() if table is not None and table.num_rows else None


def _read_shards_udf(batch: pa.Table, corpus_cfg: CorpusConfig, label_to_index: dict | None, tag_shards: bool,
                     task_labels: dict | None, augment: AugmentConfig | None, mask_token: str | None):
    for row in batch.to_pylist():
        done = committed_ids(row.pop("committed", None))
        shard = Shard(**row)
        for table in read_shard(shard, corpus_cfg, label_to_index, task_labels):
            if augment is not None:
                table = augment_table(table, augment, mask_token, source=shard.uri)
            if done is not None:
                table = _mark_already_labeled(table, done)
            if tag_shards:
                table = table.append_column(SHARD_COLUMN, pa.repeat(pa.scalar(shard.key), table.num_rows))
            yield table
        # A read worker runs shard after shard: hand the last one's freed buffers back, so that its memory
        # stays that of one shard
        pa.default_memory_pool().release_unused()


def corpus_dataset(cfg: CorpusConfig, label_to_index: dict[str, int] | None, *, block_rows: int | None = None,
                   num_cpus: float | None = None, committed: dict[str, list] | None = None,
                   task_labels: dict[str, dict[str, int]] | None = None, augment: AugmentConfig | None = None,
                   mask_token: str | None = None, shards: list[Shard] | None = None) -> ray.data.Dataset:
    """Rows ``id, text, label, reject_reason`` (and ``label_<task>`` per task_labels; see
    kd_ray.data.corpus), one read task per shard (a file, or a part of a big one).

    block_rows: cut each shard's rows into blocks of at most this many rows, so that a
    single big file still spreads over many downstream actors.
    committed: for labeling: each row also carries its shard's key (column ``shard``), and the
    rows an earlier, interrupted run committed (shard key -> ``[[part file, [row groups]], ...]``)
    come out marked ALREADY_LABELED, without text. Only a shard's own read task reads its ids.
    augment: add perturbed copies of every accepted row after it (kd_ray.data.augment).
    shards: ``list_shards(cfg)`` where the caller already has them.
    """
    shards = list_shards(cfg) if shards is None else shards
    items = [{**asdict(s), **({"committed": json.dumps(committed.get(s.key, []))} if committed is not None else {})}
             for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(shards))
    ds = ds.map_batches(_read_shards_udf, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                        fn_kwargs={"corpus_cfg": cfg, "label_to_index": label_to_index,
                                   "tag_shards": committed is not None, "task_labels": task_labels,
                                   "augment": augment, "mask_token": mask_token})
    if block_rows:
        # Ray fuses this into the read task when both ask for the same resources (a whole CPU: see
        # kd_ray.stages.label.READ_TASK_CPUS); else it is an operator of its own that copies every block again.
        ds = ds.repartition(target_num_rows_per_block=block_rows)
    return ds


def _read_parquet_udf(batch: pa.Table, columns: list[str], rows_per_block: int):
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


def _read_units_udf(batch: pa.Table, columns: list[str], rows_per_block: int):
    for unit in batch.column("unit").to_pylist():
        table = read_shard_rows(json.loads(unit), columns)
        table = table.take(pc.sort_indices(table.column("id")))  # ids are unique: one order, whatever the files
        for start in range(0, table.num_rows, rows_per_block):
            yield table.slice(start, rows_per_block)


def soft_label_dataset(info: SoftLabelInfo, columns: list[str], *, num_cpus: float,
                       rows_per_block: int = 8192) -> ray.data.Dataset:
    """A soft-label folder's rows in an order that is a function of its rows alone: one light read task per
    corpus shard (``info.read_units()``, by shard key), its rows sorted by id. Read with
    ``preserve_order``, a training run then sees the same rows in the same order, however the labeling
    run's tasks happened to finish. A task holds one shard's rows (the corpus' split_bytes bounds it).
    """
    units = [json.dumps(unit) for unit in info.read_units()]
    ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
    return ds.map_batches(_read_units_udf, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                          fn_kwargs={"columns": columns, "rows_per_block": rows_per_block})
