"""`kd-ray label`: shard a corpus over teacher actors with Ray Data; write soft labels as Parquet.

read shards (tasks) -> blocks of ``block_rows`` (streaming repartition) -> TeacherLabeler
(actor pool) -> SoftLabelDatasink (part files written under a temporary name, then renamed)
-> validation -> ``_manifest.json``. The manifest is written last: a folder without one
is an unfinished run.

Resuming: ``_run.json`` holds the config hash while a run writes. Rerunning the same config
into a folder that has it but no manifest keeps every committed part file (a part file is
either complete or absent: it appears by rename), reads their ids, and labels only the
other rows; the rows the interruption caught in flight (at most the blocks being labeled
and the part files being written) are labeled again. Part files are the checkpoint: there is
no second record to fall out of step with them. (Ray Data's own ``CheckpointConfig`` keeps a
separate id log and, for a custom datasink like this one, commits it after the write: at
least once, not exactly once.)
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
from kd_ray.augment import SEPARATOR, resolve_mask_token
from kd_ray.config import LabelConfig
from kd_ray.console import say
from kd_ray.errors import CorpusError, KdRayUserError, SoftLabelError
from kd_ray.ray_data import corpus_dataset
from kd_ray.storage import filesystem
from kd_ray.corpus import ALREADY_LABELED
from kd_ray.soft_labels import (MANIFEST, REJECTED_DIR, SCHEMA_VERSION, TeacherInfo, parquet_writer,
                                soft_label_schema, validate_soft_labels)
from kd_ray.teacher import TeacherLabeler, teacher_metadata

WRITE_TASK_CPUS = 0.1  # writing mostly waits on I/O; keep the CPUs for the teachers
RUN_STATE = "_run.json"  # config hash of the run writing into the folder; replaced by _manifest.json at the end


@dataclass
class LabelSummary:
    output: str
    rows: int
    files: int
    rejected: int
    truncated: int
    seconds: float
    skipped_existing: bool = False
    kept_rows: int = 0  # rows (labeled or rejected) an interrupted run had committed, kept by this one

    @property
    def rows_per_s(self) -> float:
        """Rows this run labeled per second."""
        return (self.rows + self.rejected - self.kept_rows) / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        if self.skipped_existing:
            return f"kd-ray label: {self.output} already holds {self.rows} rows labeled with this config; nothing to do"
        resumed = (f"; resumed: {self.kept_rows} rows kept from the interrupted run, "
                   f"{self.rows + self.rejected - self.kept_rows} done now" if self.kept_rows else "")
        return (f"kd-ray label: {self.rows} rows -> {self.files} files in {self.seconds:.1f} s "
                f"({self.rows_per_s:.0f} rows/s; {self.truncated} truncated, {self.rejected} rejected{resumed}) "
                f"-> {self.output}")


def task_label_names(teachers: list[TeacherInfo], task_label_columns: dict[str, str], *,
                     first_task: str) -> dict[str, list[str]]:
    """Label names of each gold column beyond the first task's, from that task's teachers.

    Teachers of one task must agree on their labels and their order: their logits are averaged
    and one student head learns from them."""
    by_task: dict[str, list[str]] = {}
    for t in teachers:
        if by_task.setdefault(t.task, t.labels) != t.labels:
            other = next(o for o in teachers if o.task == t.task)
            raise KdRayUserError(
                f"teachers {other.name!r} and {t.name!r} are both for task {t.task!r} but predict different "
                f"labels ({by_task[t.task]} vs {t.labels}); teachers of one task need the same id2label, in the same "
                f"order, or give them different tasks (teachers.N.task)")
    if first_task in task_label_columns:
        raise KdRayUserError(f"corpus.task_label_columns names {first_task!r}, the first teacher's task, whose gold "
                             f"column is corpus.label_column; list only the other tasks there")
    missing = sorted(set(task_label_columns) - set(by_task))
    if missing:
        raise KdRayUserError(f"corpus.task_label_columns names tasks {missing} that no teacher labels; the teachers' "
                             f"tasks are {sorted(by_task)} (teachers.N.task)")
    return {task: by_task[task] for task in task_label_columns}


def build_metadata(cfg: LabelConfig) -> dict[str, Any]:
    """Provenance stored in every part file (see kd_ray.soft_labels)."""
    teachers = [teacher_metadata(t) for t in cfg.teachers]
    first = teachers[0]
    label_names = None
    if cfg.corpus.label_column:
        label_names = first.labels
        for name in cfg.corpus.label_names or []:
            if name not in label_names:
                raise KdRayUserError(
                    f"corpus.label_names has {name!r}, which teacher {first.name!r} ({first.model}) "
                    f"does not predict; its labels are {label_names}"
                )
    task_labels = task_label_names(teachers, cfg.corpus.task_label_columns, first_task=first.task)
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "kd_ray_version": __version__,
        "teachers": [t.model_dump() for t in teachers],
        "label_task": first.task if cfg.corpus.label_column else None,
        "label_names": label_names,
        "task_labels": task_labels,
        "normalize": cfg.corpus.normalize,
        "logits_dtype": cfg.output.logits_dtype,
        "corpus": cfg.corpus.path,
        "unlabeled_corpus": cfg.corpus.unlabeled_path,
    }
    if cfg.augment.copies:  # only then, so that the hash of runs without copies stays what it was
        metadata["augment"] = {**cfg.augment.model_dump(), "separator": SEPARATOR,
                               "mask_token": resolve_mask_token(cfg.augment, first.model, cfg.teachers[0].revision)}
    identity = {k: v for k, v in metadata.items() if k != "kd_ray_version"}
    identity["corpus_config"] = cfg.corpus.model_dump(mode="json")
    metadata["config_hash"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return metadata


class SoftLabelDatasink(Datasink):
    """Writes each write task's rows as one Parquet file, committed by renaming a temporary file.

    A part file's name ends in a digest of its ids and the config, so a write task that Ray retries after
    it had already committed rewrites the same file instead of adding a copy. Rows a reader
    rejected go to ``_rejected/`` (committed before the part file) with their reason, never
    silently dropped; rows an interrupted run already committed (ALREADY_LABELED) are counted.
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

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, Any]:
        fs, root = filesystem(self.output)
        schema = soft_label_schema(self.metadata)
        tmp = f"{root}/.tmp-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        digest = hashlib.blake2b(self.metadata["config_hash"].encode(), digest_size=8)  # same rows, same config
        rows = truncated = already = 0
        rejected: list[pa.Table] = []
        with fs.open_output_stream(tmp) as f, parquet_writer(f, schema) as writer:
            for block in blocks:
                digest.update("\n".join(block.column("id").to_pylist()).encode())
                reasons = block.column("reject_reason")
                done = pc.fill_null(pc.equal(reasons, ALREADY_LABELED), False)
                already += pc.sum(done).as_py() or 0
                bad = pc.and_(reasons.is_valid(), pc.invert(done))
                if pc.any(bad).as_py():
                    rejected.append(block.filter(bad).select(["id", "text", "reject_reason"]))
                block = block.filter(reasons.is_null())
                if block.num_rows:
                    writer.write_table(block.select(schema.names).cast(schema))
                    rows += block.num_rows
                    truncated += pc.sum(block.column("truncated")).as_py() or 0
        name = f"part-{ctx.task_idx:05d}-{digest.hexdigest()}.parquet"
        n_rejected = 0
        if rejected:
            table = pa.concat_tables(rejected)
            n_rejected = table.num_rows
            fs.create_dir(f"{root}/{REJECTED_DIR}", recursive=True)
            rejected_tmp = f"{root}/{REJECTED_DIR}/.tmp-{name}"
            pq.write_table(table, rejected_tmp, filesystem=fs)
            fs.move(rejected_tmp, f"{root}/{REJECTED_DIR}/{name}")
        if rows:
            fs.move(tmp, f"{root}/{name}")
            print(f"kd-ray label: wrote {name} ({rows:,} rows{f', {n_rejected:,} set aside' if n_rejected else ''})",
                  flush=True)  # a write task's progress line: Ray forwards it to the driver
        else:
            fs.delete_file(tmp)
        return {"rows": rows, "rejected": n_rejected, "truncated": truncated, "already_labeled": already}

    def on_write_complete(self, write_result) -> None:
        self.results = write_result.write_returns


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None


def _write_json(fs: pafs.FileSystem, path: str, value: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(value, indent=2).encode())


def prepare_output(cfg: LabelConfig, metadata: dict[str, Any]) -> tuple[dict | None, bool]:
    """(manifest, resume): the manifest if this exact labeling already finished; resume=True
    if an interrupted run of this exact config left committed files to keep. Refuses to mix
    runs of different configs."""
    fs, root = filesystem(cfg.output.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise KdRayUserError(f"output.path {cfg.output.path} is a file, not a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)):
        manifest = _read_json(fs, f"{root}/{MANIFEST}")
        if manifest and manifest.get("config_hash") == metadata["config_hash"]:
            return manifest, False  # this exact labeling is done
        run = None if manifest else _read_json(fs, f"{root}/{RUN_STATE}")
        same = run is not None and run.get("config_hash") == metadata["config_hash"]
        if same and not run.get("failed") and not cfg.output.overwrite:
            return None, True
        if not cfg.output.overwrite:
            if manifest:
                state = f"finished labels of another config (hash {manifest.get('config_hash')})"
            elif same:
                state = f"a run of this config that failed validation ({run['failed']})"
            elif run:
                state = f"an unfinished run of another config (hash {run.get('config_hash')})"
            else:
                state = "files that `kd-ray label` did not write"
            raise KdRayUserError(
                f"output.path {cfg.output.path} already holds {state}; this config's hash is "
                f"{metadata['config_hash']}. Choose another output.path or set output.overwrite=true to replace it"
            )
        fs.delete_dir(root)
    fs.create_dir(root, recursive=True)
    _write_json(fs, f"{root}/{RUN_STATE}", {"config_hash": metadata["config_hash"], "started": time.time()})
    return None, False


@dataclass
class Committed:
    """What an interrupted run left: ids of its committed rows (labeled or rejected) and counts."""

    ids: pa.Array
    rows: int
    files: int
    rejected: int
    truncated: int


def _remove_temporary_files(fs: pafs.FileSystem, root: str) -> None:
    """Delete ``.tmp-*`` files: writes an interruption cut short, or of write tasks Ray retried."""
    for folder in (root, f"{root}/{REJECTED_DIR}"):
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.is_file and info.base_name.startswith(".tmp-"):
                fs.delete_file(info.path)


def committed_rows(output: str) -> Committed:
    """Read the ids of committed part files and rejected files; delete uncommitted temporary files
    (their rows are labeled again)."""
    fs, root = filesystem(output)
    _remove_temporary_files(fs, root)
    ids, rows, files, rejected, truncated = [], 0, 0, 0, 0
    for folder in (root, f"{root}/{REJECTED_DIR}"):
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if not (info.is_file and info.base_name.startswith("part-") and info.base_name.endswith(".parquet")):
                continue
            columns = ["id", "truncated"] if folder == root else ["id"]
            try:
                table = pq.read_table(info.path, columns=columns, filesystem=fs)
            except (pa.ArrowInvalid, OSError) as e:
                raise SoftLabelError(f"{info.path} cannot be read ({e}); it was committed by an earlier run of this "
                                     f"config, so something else changed it. Delete it to relabel its rows") from None
            ids.append(table.column("id").combine_chunks())
            if folder == root:
                rows, files = rows + table.num_rows, files + 1
                truncated += pc.sum(table.column("truncated")).as_py() or 0
            else:
                rejected += table.num_rows
    all_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    return Committed(all_ids, rows, files, rejected, truncated)


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
    done, resume = prepare_output(cfg, metadata)
    if done is not None:
        return LabelSummary(cfg.output.path, done["rows"], len(done["files"]), done["rejected"], done["truncated"],
                            0.0, skipped_existing=True)
    kept = committed_rows(cfg.output.path) if resume else None
    if kept is not None:
        say(f"kd-ray label: resuming: {cfg.output.path} holds {kept.rows} rows in {kept.files} committed files "
              f"(and {kept.rejected} rejected rows) from an interrupted run of this config; they are kept and "
              f"only the other rows are labeled")
    init_ray(cfg.ray)
    sink = SoftLabelDatasink(cfg.output.path, metadata, cfg.output.rows_per_file)
    labeled_dataset(cfg, metadata, kept).write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS})
    results = getattr(sink, "results", [])
    fs, root = filesystem(cfg.output.path)
    kept_rows = kept.rows + kept.rejected if kept else 0
    seen_again = sum(r["already_labeled"] for r in results)
    if kept and seen_again != len(kept.ids):
        _fail(fs, root, f"the corpus gave {seen_again} rows whose ids the interrupted run committed, which "
              f"committed {len(kept.ids)}: the corpus changed since, or its ids are not unique")
    summary = LabelSummary(
        output=cfg.output.path,
        rows=sum(r["rows"] for r in results) + (kept.rows if kept else 0),
        files=sum(1 for r in results if r["rows"]) + (kept.files if kept else 0),
        rejected=sum(r["rejected"] for r in results) + (kept.rejected if kept else 0),
        truncated=sum(r["truncated"] for r in results) + (kept.truncated if kept else 0),
        seconds=time.perf_counter() - start,
        kept_rows=kept_rows,
    )
    _remove_temporary_files(fs, root)
    _commit(cfg, metadata, summary)
    return summary


def labeled_dataset(cfg: LabelConfig, metadata: dict[str, Any], kept: Committed | None) -> ray.data.Dataset:
    """The corpus read into blocks (one read task per file) and run through the teacher actors."""
    c = cfg.compute
    label_names = metadata["label_names"]
    label_to_index = {n: i for i, n in enumerate(label_names)} if label_names else None
    # One file is one read task; its rows are cut into blocks so that every actor gets work.
    task_labels = {task: {n: i for i, n in enumerate(names)} for task, names in metadata["task_labels"].items()}
    ds = corpus_dataset(cfg.corpus, label_to_index, block_rows=c.block_rows,
                        done_ids=ray.put(kept.ids) if kept is not None and len(kept.ids) else None,
                        task_labels=task_labels, augment=cfg.augment if cfg.augment.copies else None,
                        mask_token=metadata.get("augment", {}).get("mask_token"))
    return ds.map_batches(
        TeacherLabeler,
        fn_constructor_kwargs={"teachers": [TeacherInfo.model_validate(t) for t in metadata["teachers"]],
                               "batch_size": c.batch_size, "num_gpus": c.num_gpus, "threads": c.threads_per_actor,
                               "precision": c.precision, "logits_dtype": cfg.output.logits_dtype},
        batch_size=c.block_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actor_count(cfg)),
        num_cpus=c.num_cpus,
        num_gpus=c.num_gpus or None,
        # A dead actor is replaced and its block redone: Ray Data's default for actor pools
        # (max_restarts=-1, max_task_retries=-1; setting them here is deprecated since Ray 2.60).
    )


def _commit(cfg: LabelConfig, metadata: dict[str, Any], summary: LabelSummary) -> None:
    """Validate the folder and write its manifest (the run's completion marker), or mark it failed."""
    fs, root = filesystem(cfg.output.path)
    if summary.rows == 0:  # before validation, whose "no part files" would hide the reason
        where = f"; they are listed under {cfg.output.path}/{REJECTED_DIR}/" if summary.rejected else ""
        raise CorpusError(f"corpus {cfg.corpus.path} gave no rows to label ({summary.rejected} rejected{where})")
    try:
        validate_soft_labels(cfg.output.path, require_manifest=False)
    except SoftLabelError as e:
        hint = (f"\nids come from corpus.id_column={cfg.corpus.id_column!r}: each must be unique across all files"
                if cfg.corpus.id_column and "more than once" in str(e) else "")
        _fail(fs, root, f"{e}{hint}")
    files = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                   if i.is_file and i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    manifest = {**asdict(summary), "files": files, "config_hash": metadata["config_hash"],
                "rows_per_s": summary.rows_per_s}
    _write_json(fs, f"{root}/{MANIFEST}", manifest)
    fs.delete_file(f"{root}/{RUN_STATE}")


def _fail(fs: pafs.FileSystem, root: str, message: str) -> None:
    """Mark the run as failed, so that a rerun does not resume it, and raise."""
    state = _read_json(fs, f"{root}/{RUN_STATE}") or {}
    _write_json(fs, f"{root}/{RUN_STATE}", {**state, "failed": message.splitlines()[0][:300]})
    raise SoftLabelError(f"{message}\nno {MANIFEST} was written: this output is incomplete; fix the input and "
                         f"rerun with output.overwrite=true")


def main(cfg: LabelConfig) -> LabelSummary:
    summary = run_label(cfg)
    say(summary.line())
    return summary


ENTRY_POINTS = {"label": main}
