"""`kd-ray label`: shard a corpus over teacher actors with Ray Data; write soft labels as Parquet.

read shards (tasks) -> blocks of ``block_rows`` (streaming repartition) -> TeacherLabeler
(actor pool) -> SoftLabelDatasink (part files written under a temporary name, then renamed)
-> validation -> ``_manifest.json``. The manifest is written last: a folder without one
is an unfinished run.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Datasink

from kd_ray import __version__
from kd_ray.config import LabelConfig
from kd_ray.errors import CorpusError, KdRayUserError, SoftLabelError
from kd_ray.ray_data import corpus_dataset
from kd_ray.storage import filesystem
from kd_ray.soft_labels import (MANIFEST, REJECTED_DIR, SCHEMA_VERSION, parquet_writer, soft_label_schema,
                                validate_soft_labels)
from kd_ray.teacher import TeacherLabeler, teacher_metadata

WRITE_TASK_CPUS = 0.1  # writing mostly waits on I/O; keep the CPUs for the teachers


@dataclass
class LabelSummary:
    output: str
    rows: int
    files: int
    rejected: int
    truncated: int
    seconds: float
    skipped_existing: bool = False

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        if self.skipped_existing:
            return f"kd-ray label: {self.output} already holds {self.rows} rows labeled with this config; nothing to do"
        return (f"kd-ray label: {self.rows} rows -> {self.files} files in {self.seconds:.1f} s "
                f"({self.rows_per_s:.0f} rows/s; {self.truncated} truncated, {self.rejected} rejected) -> {self.output}")


def build_metadata(cfg: LabelConfig) -> dict[str, Any]:
    """Provenance stored in every part file (see kd_ray.soft_labels)."""
    teachers = [teacher_metadata(t) for t in cfg.teachers]
    first = teachers[0]
    label_names = None
    if cfg.corpus.label_column:
        label_names = [first["id2label"][str(i)] for i in range(len(first["id2label"]))]
        for name in cfg.corpus.label_names or []:
            if name not in label_names:
                raise KdRayUserError(
                    f"corpus.label_names has {name!r}, which teacher {first['name']!r} ({first['model']}) "
                    f"does not predict; its labels are {label_names}"
                )
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "kd_ray_version": __version__,
        "teachers": teachers,
        "label_task": first["task"] if cfg.corpus.label_column else None,
        "label_names": label_names,
        "normalize": cfg.corpus.normalize,
        "logits_dtype": cfg.output.logits_dtype,
        "corpus": cfg.corpus.path,
    }
    identity = {k: v for k, v in metadata.items() if k != "kd_ray_version"}
    identity["corpus_config"] = cfg.corpus.model_dump(mode="json")
    metadata["config_hash"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return metadata


class SoftLabelDatasink(Datasink):
    """Writes each write task's rows as one Parquet file (temp name, then rename).

    Rows a reader rejected go to ``_rejected/`` with their reason, never silently dropped.
    """

    def __init__(self, output: str, metadata: dict[str, Any], rows_per_file: int):
        self.output = output.rstrip("/")
        self.metadata = metadata
        self.rows_per_file = rows_per_file

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "SoftLabelWrite"

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, int]:
        fs, root = filesystem(self.output)
        schema = soft_label_schema(self.metadata)
        name = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp, final = f"{root}/.tmp-{name}", f"{root}/{name}"
        rows = truncated = 0
        rejected: list[pa.Table] = []
        with fs.open_output_stream(tmp) as f, parquet_writer(f, schema) as writer:
            for block in blocks:
                ok = block.column("reject_reason").is_null()
                if not pc.all(ok).as_py():
                    rejected.append(block.filter(pc.invert(ok)).select(["id", "text", "reject_reason"]))
                    block = block.filter(ok)
                if block.num_rows:
                    writer.write_table(block.select(schema.names).cast(schema))
                    rows += block.num_rows
                    truncated += sum(block.column("truncated").to_pylist())
        fs.move(tmp, final)
        n_rejected = 0
        if rejected:
            table = pa.concat_tables(rejected)
            n_rejected = table.num_rows
            fs.create_dir(f"{root}/{REJECTED_DIR}", recursive=True)
            pq.write_table(table, f"{root}/{REJECTED_DIR}/{name}", filesystem=fs)
        return {"file": name, "rows": rows, "rejected": n_rejected, "truncated": truncated}

    def on_write_complete(self, write_result) -> None:
        self.results = write_result.write_returns


def _read_manifest(fs: pafs.FileSystem, root: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def prepare_output(cfg: LabelConfig, metadata: dict[str, Any]) -> dict | None:
    """Returns the manifest if this exact labeling already finished; refuses to mix runs."""
    fs, root = filesystem(cfg.output.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)):
        manifest = _read_manifest(fs, root)
        if manifest and manifest.get("config_hash") == metadata["config_hash"]:
            return manifest  # this exact labeling is done
        if not cfg.output.overwrite:
            state = (f"finished labels of another config (hash {manifest.get('config_hash')})" if manifest
                     else "files of an unfinished or foreign run")
            raise KdRayUserError(
                f"output.path {cfg.output.path} already holds {state}; this config's hash is "
                f"{metadata['config_hash']}. Choose another output.path or set output.overwrite=true to replace it"
            )
        fs.delete_dir(root)
    elif info.type == pafs.FileType.File:
        raise KdRayUserError(f"output.path {cfg.output.path} is a file, not a folder")
    fs.create_dir(root, recursive=True)
    return None


def actor_count(cfg: LabelConfig) -> int:
    c = cfg.compute
    if c.concurrency:
        return c.concurrency
    resources = ray.cluster_resources()
    if c.num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // c.num_gpus))
    return max(1, int(resources.get("CPU", 1) // c.threads_per_actor))


def run_label(cfg: LabelConfig) -> LabelSummary:
    from kd_ray.runtime import init_ray

    start = time.perf_counter()
    metadata = build_metadata(cfg)  # validates teachers before any Ray work starts
    done = prepare_output(cfg, metadata)
    if done is not None:
        return LabelSummary(cfg.output.path, done["rows"], len(done["files"]), done["rejected"], done["truncated"],
                            0.0, skipped_existing=True)
    label_names = metadata["label_names"]
    label_to_index = {n: i for i, n in enumerate(label_names)} if label_names else None
    init_ray(cfg.ray)
    c = cfg.compute
    # One file is one read task; its rows are cut into blocks so that every actor gets work.
    ds = corpus_dataset(cfg.corpus, label_to_index, block_rows=c.block_rows)
    ds = ds.map_batches(
        TeacherLabeler,
        fn_constructor_kwargs={"teachers": metadata["teachers"], "batch_size": c.batch_size, "num_gpus": c.num_gpus,
                               "threads": c.threads_per_actor, "precision": c.precision,
                               "logits_dtype": cfg.output.logits_dtype},
        batch_size=c.block_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actor_count(cfg)),
        num_cpus=c.num_cpus,
        num_gpus=c.num_gpus or None,
        # A dead actor is replaced and its block redone: Ray Data's default for actor pools
        # (max_restarts=-1, max_task_retries=-1; setting them here is deprecated since Ray 2.60).
    )
    sink = SoftLabelDatasink(cfg.output.path, metadata, cfg.output.rows_per_file)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS})
    results = getattr(sink, "results", [])
    summary = LabelSummary(
        output=cfg.output.path,
        rows=sum(r["rows"] for r in results),
        files=sum(1 for r in results if r["rows"]),
        rejected=sum(r["rejected"] for r in results),
        truncated=sum(r["truncated"] for r in results),
        seconds=time.perf_counter() - start,
    )
    _remove_empty_parts(cfg.output.path, results)
    if summary.rows == 0:  # before validation, whose "no part files" would hide the reason
        where = f"; they are listed under {cfg.output.path}/{REJECTED_DIR}/" if summary.rejected else ""
        raise CorpusError(f"corpus {cfg.corpus.path} gave no rows to label ({summary.rejected} rejected{where})")
    try:
        validate_soft_labels(cfg.output.path, require_manifest=False)
    except SoftLabelError as e:
        hint = (f"\nids come from corpus.id_column={cfg.corpus.id_column!r}: each must be unique across all files"
                if cfg.corpus.id_column and "more than once" in str(e) else "")
        raise SoftLabelError(f"{e}{hint}\nno _manifest.json was written: this output is incomplete") from None
    manifest = {**asdict(summary), "files": sorted(r["file"] for r in results if r["rows"]),
                "config_hash": metadata["config_hash"], "rows_per_s": summary.rows_per_s}
    fs, root = filesystem(cfg.output.path)
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=2).encode())
    return summary


def _remove_empty_parts(output: str, results: list[dict]) -> None:
    fs, root = filesystem(output)
    for r in results:
        if not r["rows"]:
            fs.delete_file(f"{root}/{r['file']}")


def main(cfg: LabelConfig) -> LabelSummary:
    summary = run_label(cfg)
    print(summary.line(), flush=True)
    return summary


CONFIGS = {"label": LabelConfig}
ENTRY_POINTS = {"label": main}
