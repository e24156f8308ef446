"""`kd-ray label`: shard a corpus over teacher actors with Ray Data; write soft labels as Parquet.

read shards (tasks: a file, or a byte range / row-group run of a big one) -> blocks of
``block_rows`` -> tokenize (tasks of their own, ``compute.tokenize``; or inside the actors) ->
TeacherLabeler (actor pool: sort, pad, run the model) -> SoftLabelDatasink (part files written
under a temporary name, then renamed) -> checks -> ``_manifest.json``. The manifest is written
last: a folder without one is an unfinished run.

Each part file stores its rows as one row group per corpus shard and lists the shards, with its
counts (rows, truncated, non-finite logits, gold label ranges), in its footer. So the driver
never holds anything that grows with the corpus: resuming and checking read footers, and each
shard's read task (resuming) or check task (duplicates) reads only that shard's row groups.

Resuming: ``_run.json`` holds the config hash while a run writes. Rerunning the same config
into a folder that has it but no manifest keeps every committed part file (a part file is
either complete or absent: it appears by rename), and labels only the rows that its shard's
row groups do not hold; the rows the interruption caught in flight (at most the blocks being
labeled and the part files being written) are labeled again. Part files are the checkpoint:
there is no second record to fall out of step with them. (Ray Data's own ``CheckpointConfig``
keeps a separate id log and, for a custom datasink like this one, commits it after the write:
at least once, not exactly once.)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.context import ShuffleStrategy

from kd_ray import __version__
from kd_ray.config import LabelConfig
from kd_ray.console import say
from kd_ray.data.augment import SEPARATOR, resolve_mask_token
from kd_ray.data.corpus import ALREADY_LABELED, SHARD_COLUMN, Shard, estimated_rows, list_shards
from kd_ray.data.growth import corpus_growth, file_records
from kd_ray.data.ray_data import committed_ids, corpus_dataset, parquet_files_dataset
from kd_ray.data.soft_labels import (MANIFEST, METADATA_KEY, PART_KEY, REJECTED_DIR, REJECTED_SCHEMA, SCHEMA_VERSION,
                                     PredictionsInfo, SoftLabelMetadata, TeacherInfo, add_shard_groups, parquet_writer,
                                     part_stats, read_soft_label_info, soft_label_schema, stats_problems)
from kd_ray.data.storage import filesystem, read_json, write_json
from kd_ray.errors import CorpusError, KdRayUserError, SoftLabelError
from kd_ray.models.teacher import TeacherLabeler, make_teacher, tokenize_batch
from kd_ray.runtime import init_ray

WRITE_TASK_CPUS = 0.1  # writing mostly waits on I/O; keep the CPUs for the teachers
READ_TASK_CPUS = 1.0  # a whole CPU, as a repartition asks: then Ray fuses the cut into blocks of block_rows into the
# read task (with less, the repartition runs as an operator of its own, copying every block through the object store)
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
    kept_rows: int = 0  # rows (labeled or rejected) already in the folder, kept by this run
    grew: str = ""  # what the corpus gained since a finished labeling of this config (kd_ray.data.growth.Growth.line)
    command: str = "label"  # 'predict': a model's predictions

    @property
    def rows_per_s(self) -> float:
        """Rows this run labeled per second."""
        return (self.rows + self.rejected - self.kept_rows) / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        if self.skipped_existing:
            return (f"kd-ray {self.command}: {self.output} already holds {self.rows} rows labeled with this config; "
                    "nothing to do")
        kept = ("grew: {} rows kept from the folder's labeling" if self.grew
                else "resumed: {} rows kept from the interrupted run")
        resumed = (f"; {kept.format(self.kept_rows)}, "
                   f"{self.rows + self.rejected - self.kept_rows} done now" if self.kept_rows else "")
        return (f"kd-ray {self.command}: {self.rows} rows -> {self.files} files in {self.seconds:.1f} s "
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


def build_metadata(cfg: LabelConfig, predictions: PredictionsInfo | None = None) -> SoftLabelMetadata:
    """Provenance stored in every part file (see kd_ray.data.soft_labels); with ``predictions``, a prediction
    folder's."""
    teachers = [make_teacher(t, hash_weights=True).info for t in cfg.teachers]
    first = teachers[0]
    label_names = first.labels if cfg.corpus.label_column else None
    unknown = [name for name in cfg.corpus.label_names or [] if name not in first.labels]
    if label_names is not None and unknown:
        raise KdRayUserError(f"corpus.label_names has {unknown[0]!r}, which teacher {first.name!r} ({first.model}) "
                             f"does not predict; its labels are {label_names}")
    task_labels = task_label_names(teachers, cfg.corpus.task_label_columns, first_task=first.task)
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "kd_ray_version": __version__,
        "teachers": [t.model_dump(exclude_unset=True) for t in teachers],
        "gold": ({first.task: label_names} if label_names else {}) | task_labels,
        "normalize": cfg.corpus.normalize,
        "logits_dtype": cfg.output.logits_dtype,
        "corpus": cfg.corpus.path,
        "unlabeled_corpus": cfg.corpus.unlabeled_path,
    }
    if predictions is not None:
        metadata["predictions"] = predictions.model_dump()
    if cfg.augment.copies:  # only then, so that the hash of runs without copies stays what it was
        metadata["augment"] = {**cfg.augment.model_dump(), "separator": SEPARATOR,
                               "mask_token": resolve_mask_token(cfg.augment, first.model, cfg.teachers[0].revision)}
    identity = {k: v for k, v in metadata.items() if k != "kd_ray_version"}
    identity["corpus_config"] = cfg.corpus.model_dump(mode="json")
    metadata["config_hash"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return SoftLabelMetadata.model_validate(metadata)


def _write_part(fs: pafs.FileSystem, folder: str, name: str, table: pa.Table, schema: pa.Schema,
                stats: dict[str, Any]) -> None:
    """Write ``table`` (with its ``shard`` column) as one row group per corpus shard to ``folder/name``, committed
    by renaming a temporary file; the footer lists the shards in row-group order beside ``stats``, so that
    resuming and checking read footers only."""
    shards = pc.unique(table.column(SHARD_COLUMN)).to_pylist()
    with fs.open_output_stream(f"{folder}/.tmp-{name}") as f, parquet_writer(f, schema) as writer:
        for key in shards:
            rows = table.filter(pc.equal(table.column(SHARD_COLUMN), key))
            writer.write_table(rows.select(schema.names).cast(schema), row_group_size=rows.num_rows)
        writer.add_key_value_metadata({PART_KEY: json.dumps({**stats, "shards": shards})})
    fs.move(f"{folder}/.tmp-{name}", f"{folder}/{name}")


class SoftLabelDatasink(Datasink):
    """Writes each write task's rows as one Parquet file, committed by renaming a temporary file.

    A part file's name ends in a digest of its ids and the config, so a write task that Ray retries after
    it had already committed rewrites the same file instead of adding a copy. Rows a reader
    rejected go to ``_rejected/`` (committed before the part file) with their reason, never
    silently dropped; rows an interrupted run already committed (ALREADY_LABELED) are counted.
    """

    def __init__(self, output: str, metadata: SoftLabelMetadata, rows_per_file: int):
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
        table = self.metadata.as_stored(pa.concat_tables(list(blocks)))
        digest = hashlib.blake2b(self.metadata.config_hash.encode(), digest_size=8)  # same rows, same config
        ids = table.column("id").combine_chunks()
        if len(ids):  # the ids' bytes and lengths, in order, without making Python strings of them
            offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset:ids.offset + len(ids) + 1]
            digest.update((offsets - offsets[0]).tobytes())
            digest.update(ids.buffers()[2][int(offsets[0]):int(offsets[-1])])
        reasons = table.column("reject_reason")
        done = pc.fill_null(pc.equal(reasons, ALREADY_LABELED), False)
        rejected = table.filter(pc.and_(reasons.is_valid(), pc.invert(done)))
        table = table.filter(reasons.is_null())
        name = f"part-{ctx.task_idx:05d}-{digest.hexdigest()}.parquet"
        if rejected.num_rows:
            fs.create_dir(f"{root}/{REJECTED_DIR}", recursive=True)
            _write_part(fs, f"{root}/{REJECTED_DIR}", name, rejected, REJECTED_SCHEMA, {"rows": rejected.num_rows})
        if table.num_rows:
            _write_part(fs, root, name, table, soft_label_schema(self.metadata), part_stats(table, self.metadata))
            print(f"kd-ray {self.metadata.command}: wrote {name} ({table.num_rows:,} rows"
                  f"{f', {rejected.num_rows:,} set aside' if rejected.num_rows else ''})",
                  flush=True)  # a write task's progress line: Ray forwards it to the driver
        return {"rows": table.num_rows, "rejected": rejected.num_rows, "already_labeled": pc.sum(done).as_py() or 0}

    def on_write_complete(self, write_result) -> None:
        self.results = write_result.write_returns


def _part_files(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    """The committed part files in ``folder`` (none where it does not exist)."""
    return [info for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            if info.is_file and info.base_name.startswith("part-") and info.base_name.endswith(".parquet")]


def _written_schema_version(fs: pafs.FileSystem, root: str) -> int:
    """The soft-label schema version of a folder's committed part files (this version if it has none)."""
    for info in _part_files(fs, root):
        try:
            meta = pq.read_schema(info.path, filesystem=fs).metadata or {}
        except (pa.ArrowInvalid, OSError):
            return SCHEMA_VERSION  # not a part file of any version; the caller names the folder's state
        return json.loads(meta.get(METADATA_KEY, b"{}")).get("schema_version", SCHEMA_VERSION)
    return SCHEMA_VERSION


def prepare_output(cfg: LabelConfig, metadata: SoftLabelMetadata) -> tuple[dict | None, bool]:
    """(manifest, resume): the manifest if this exact labeling already finished; resume=True
    if an interrupted run of this exact config left committed files to keep. Refuses to mix
    runs of different configs."""
    fs, root = filesystem(cfg.output.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise KdRayUserError(f"output.path {cfg.output.path} is a file, not a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)):
        manifest = read_json(fs, f"{root}/{MANIFEST}")
        if manifest and manifest.get("config_hash") == metadata.config_hash:
            return manifest, False  # this exact labeling is done
        run = None if manifest else read_json(fs, f"{root}/{RUN_STATE}")
        old = _written_schema_version(fs, root) if run is not None else SCHEMA_VERSION
        if old != SCHEMA_VERSION and not cfg.output.overwrite:
            raise KdRayUserError(
                f"output.path {cfg.output.path} holds an unfinished run of an earlier kd-ray, with soft-label schema "
                f"version {old}; this kd-ray writes version {SCHEMA_VERSION} and cannot resume it. Set "
                f"output.overwrite=true to label it again, or choose another output.path")
        same = run is not None and run.get("config_hash") == metadata.config_hash
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
            raise KdRayUserError(f"output.path {cfg.output.path} already holds {state}; this config's hash is "
                                 f"{metadata.config_hash}. Choose another output.path or set output.overwrite=true "
                                 f"to replace it")
        fs.delete_dir(root)
    _start_run(cfg, metadata)
    return None, False


def _start_run(cfg: LabelConfig, metadata: SoftLabelMetadata) -> None:
    """Mark the folder as written by a run of this config (``_run.json``) until its manifest replaces the mark."""
    fs, root = filesystem(cfg.output.path)
    fs.create_dir(root, recursive=True)
    write_json(fs, f"{root}/{RUN_STATE}", {"config_hash": metadata.config_hash, "started": time.time()})


@dataclass
class Parts:
    """What a folder's committed part files hold, from their footers alone (no row is read)."""

    shards: dict[str, list[list]]  # shard key -> [[part file, [row groups]], ...], labeled and rejected files
    rows: int = 0
    files: int = 0
    rejected: int = 0
    truncated: int = 0
    problems: list[str] = field(default_factory=list)  # non-finite logits, gold labels out of range


def read_parts(output: str, metadata: SoftLabelMetadata) -> Parts:
    """Merge the footers of the committed part and rejected files; delete uncommitted temporary files
    (their rows are labeled again). Memory grows with the files, not with the rows."""
    fs, root = filesystem(output)
    parts = Parts(shards={})
    for folder in (root, f"{root}/{REJECTED_DIR}"):
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.is_file and info.base_name.startswith(".tmp-"):  # cut short by an interruption, or retried by Ray
                fs.delete_file(info.path)
        for info in _part_files(fs, folder):
            try:
                stats = json.loads(pq.read_metadata(info.path, filesystem=fs).metadata[PART_KEY])
            except (pa.ArrowInvalid, OSError, KeyError) as e:
                raise SoftLabelError(f"{info.path} is not a part file this run wrote ({e!r}); something else changed "
                                     f"the folder. Delete the file to relabel its rows") from None
            add_shard_groups(parts.shards, info.path, stats)
            if folder != root:
                parts.rejected += stats["rows"]
                continue
            parts.rows, parts.files, parts.truncated = (parts.rows + stats["rows"], parts.files + 1,
                                                        parts.truncated + stats["truncated"])
            parts.problems += stats_problems(info.path, stats, metadata)
    return parts


def balanced_block_rows(rows: int | None, actors: int, block_rows: int) -> int:
    """Rows per block: at most ``block_rows``, and the corpus's ``rows`` (an estimate; None: unknown)
    cut into a multiple of ``actors`` blocks of about the same size, so that the actors finish their
    last blocks together. Blocks of exactly block_rows leave one actor labeling the last of them
    alone, and smaller blocks, though they shorten that tail, waste more on padding."""
    if not rows or rows <= 0:
        return block_rows
    rounds = math.ceil(rows / (actors * block_rows))
    return max(1, math.ceil(rows / (actors * rounds)))


def actor_count(cfg: LabelConfig) -> int:
    c = cfg.compute
    if c.concurrency:
        return c.concurrency
    resources = ray.cluster_resources()
    if c.num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // c.num_gpus))
    return max(1, int(resources.get("CPU", 1) // c.threads_per_actor))


def run_label(cfg: LabelConfig, predictions: PredictionsInfo | None = None) -> LabelSummary:
    """Label ``cfg.corpus`` into ``cfg.output.path``; with ``predictions``, write its one model's predictions."""
    start = time.perf_counter()
    metadata = build_metadata(cfg, predictions)  # validates teachers before any Ray work starts
    command = metadata.command
    done, resume = prepare_output(cfg, metadata)
    shards, grew = list_shards(cfg.corpus), None
    kept = read_parts(cfg.output.path, metadata) if resume else None
    if done is not None:  # this config finished here: label what the corpus gained since, if anything
        grew = _growth(cfg, metadata, shards, done)
        if grew is None:  # changed, and output.overwrite: labeled again from scratch
            done = None
        elif not grew.shards:
            return LabelSummary(cfg.output.path, done["rows"], len(done["files"]), done["rejected"],
                                done["truncated"], 0.0, skipped_existing=True, command=command)
        else:
            say(f"kd-ray {command}: corpus grew: {grew.line()}; labeling them into {cfg.output.path}")
            kept = read_parts(cfg.output.path, metadata)
            _start_run(cfg, metadata)
    elif kept is not None:
        say(f"kd-ray {command}: resuming: {cfg.output.path} holds {kept.rows} rows in {kept.files} committed files "
            f"(and {kept.rejected} rejected rows) from an interrupted run of this config; they are kept and "
            f"only the other rows are labeled")
    init_ray(cfg.ray)
    sink = SoftLabelDatasink(cfg.output.path, metadata, cfg.output.rows_per_file)
    labeled_dataset(cfg, metadata, kept, grew.shards if grew else shards).write_datasink(
        sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS})
    results = getattr(sink, "results", [])
    parts = read_parts(cfg.output.path, metadata)  # this run's files and the kept ones, from their footers
    kept_rows = kept.rows + kept.rejected if kept else 0
    written = sum(r["rows"] + r["rejected"] for r in results)
    in_scope = committed_rows(kept, [s.key for s in grew.shards]) if grew else kept_rows
    already_labeled = sum(r["already_labeled"] for r in results)
    if kept and already_labeled != in_scope:
        _fail(cfg.output.path, f"the corpus gave {already_labeled} rows whose ids the interrupted run committed, "
              f"which committed {in_scope}: the corpus changed since, or its ids are not unique")
    if parts.rows + parts.rejected != kept_rows + written:
        parts.problems.append(f"the part files hold {parts.rows + parts.rejected} rows (labeled and rejected), the "
                              f"write tasks wrote {written} and {kept_rows} were kept")
    summary = LabelSummary(output=cfg.output.path, rows=parts.rows, files=parts.files, rejected=parts.rejected,
                           truncated=parts.truncated, seconds=time.perf_counter() - start, kept_rows=kept_rows,
                           grew=grew.line() if grew else "", command=command)
    changed = set(grew.new_files + grew.appended) if grew else None  # (the record of every other file stands)
    corpus = {**(done or {}).get("corpus", {}),
              **file_records([s for s in shards if changed is None or s.name in changed])}
    _commit(cfg, metadata, summary, parts, corpus)
    return summary


def _growth(cfg: LabelConfig, metadata: SoftLabelMetadata, shards: list[Shard], done: dict):
    """What the corpus gained since this config's finished labeling (kd_ray.data.growth), or None when it changed
    in a way only a new labeling covers and output.overwrite asks for one (the folder is then emptied)."""
    labeled = done.get("shards")
    if labeled is None:  # a manifest from before kd-ray recorded the shard plan: the part files' footers hold it
        labeled = read_parts(cfg.output.path, metadata).shards
    try:
        return corpus_growth(cfg.corpus, shards, done.get("corpus", {}), set(labeled), cfg.output.path)
    except CorpusError as e:
        if not cfg.output.overwrite:
            raise
        say(f"kd-ray {metadata.command}: {str(e).splitlines()[0]}; output.overwrite is set: labeling it again from scratch")
        fs, root = filesystem(cfg.output.path)
        fs.delete_dir(root)
        _start_run(cfg, metadata)
        return None


def committed_rows(parts: Parts, keys: list[str]) -> int:
    """Rows (labeled and rejected) that ``parts`` hold for the shards ``keys``: their row groups' counts, from
    the footers of the files that hold them."""
    rows, footers = 0, {}
    for key in keys:
        for file, groups in parts.shards.get(key, []):
            if file not in footers:
                fs, path = filesystem(file)
                footers[file] = pq.read_metadata(path, filesystem=fs)
            rows += sum(footers[file].row_group(g).num_rows for g in groups)
    return rows


def labeled_dataset(cfg: LabelConfig, metadata: SoftLabelMetadata, kept: Parts | None,
                    shards: list[Shard]) -> ray.data.Dataset:
    """``shards`` of the corpus read into blocks (one read task per file or part of a big file) and run
    through the teacher actors."""
    c = cfg.compute
    first, *others = metadata.tasks
    index = {task: {n: i for i, n in enumerate(names)} for task, names in metadata.gold_labels.items()}
    label_to_index, task_labels = index.get(first), {task: index[task] for task in others if task in index}
    actors = actor_count(cfg)
    rows = estimated_rows(shards)
    block_rows = balanced_block_rows(rows and rows * (1 + cfg.augment.copies), actors, c.block_rows)
    ds = corpus_dataset(cfg.corpus, label_to_index, block_rows=block_rows, num_cpus=READ_TASK_CPUS,
                        committed=kept.shards if kept else {},
                        task_labels=task_labels, augment=cfg.augment if cfg.augment.copies else None,
                        mask_token=(metadata.augment or {}).get("mask_token"), shards=shards)
    if c.tokenize == "stage":
        ds = ds.map_batches(tokenize_batch, fn_kwargs={"teachers": metadata.teachers}, batch_size=None,
                            batch_format="pyarrow", num_cpus=c.tokenize_cpus)
    return ds.map_batches(
        TeacherLabeler,
        fn_constructor_kwargs={"teachers": metadata.teachers, "batch_size": c.batch_size,
                               "batch_tokens": c.batch_tokens, "num_gpus": c.num_gpus,
                               "threads": c.threads_per_actor, "precision": c.precision,
                               "logits_dtype": cfg.output.logits_dtype, "predictions": metadata.predictions},
        batch_size=block_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=c.num_cpus,
        num_gpus=c.num_gpus or None,
        # A dead actor is replaced and its block redone: Ray Data's default for actor pools
        # (max_restarts=-1, max_task_retries=-1; setting them here is deprecated since Ray 2.60).
    )


@ray.remote(num_cpus=WRITE_TASK_CPUS)
def _shard_duplicates(groups: str) -> list[str]:
    """Ids that one shard's rows hold more than once (a write retried or resumed wrongly), from its row groups."""
    ids = committed_ids(groups)
    if ids is None or pc.count_distinct(ids).as_py() == len(ids):
        return []
    counts = pc.value_counts(ids)
    return [f"id {v!r} appears more than once ({n} rows)"
            for v, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()) if n > 1][:5]


def _duplicate_ids(parts: Parts, id_column: str | None) -> list[str]:
    """Duplicates, found without gathering ids: one task per shard checks its own rows. Derived ids of
    different shards differ by construction (file name, then byte range or row); ids from
    corpus.id_column are also compared across shards, grouped by Ray Data's sort-based shuffle (its
    default hash shuffle first starts aggregator actors: 10 s for 400 ids on 2 CPUs, against 1 s)."""
    problems = [p for found in ray.get([_shard_duplicates.remote(json.dumps(g)) for g in parts.shards.values()])
                for p in found]
    if id_column and not problems and len(parts.shards) > 1:
        files = sorted({file for groups in parts.shards.values() for file, _ in groups})
        ids = parquet_files_dataset(files, ["id"], num_cpus=WRITE_TASK_CPUS)
        ids.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # this dataset's own context
        repeated = ids.groupby("id").count().map_batches(lambda t: t.filter(pc.greater(t.column("count()"), 1)),
                                                         batch_format="pyarrow")
        problems += [f"id {r['id']!r} appears more than once ({r['count()']} rows)" for r in repeated.take(5)]
    return problems


def _commit(cfg: LabelConfig, metadata: SoftLabelMetadata, summary: LabelSummary, parts: Parts,
            corpus: dict[str, dict]) -> None:
    """Check the whole folder from its footers and per-shard tasks, and write its manifest (the run's
    completion marker, with ``corpus``: the record of every input file, kd_ray.data.growth), or mark it failed."""
    fs, root = filesystem(cfg.output.path)
    if summary.rows == 0:  # before the checks, whose "no part files" would hide the reason
        where = f"; they are listed under {cfg.output.path}/{REJECTED_DIR}/" if summary.rejected else ""
        raise CorpusError(f"corpus {cfg.corpus.path} gave no rows to label ({summary.rejected} rejected{where})")
    try:
        read_soft_label_info(cfg.output.path)  # every file's schema and metadata
    except SoftLabelError as e:
        parts.problems.append(str(e))
    duplicates = _duplicate_ids(parts, cfg.corpus.id_column)
    if parts.problems or duplicates:
        hint = (f"\nids come from corpus.id_column={cfg.corpus.id_column!r}: each must be unique across all files"
                if cfg.corpus.id_column and duplicates else "")
        _fail(cfg.output.path, f"soft labels at {cfg.output.path} failed validation:\n  "
              + "\n  ".join((parts.problems + duplicates)[:20]) + hint)
    files = sorted(info.base_name for info in _part_files(fs, root))
    manifest = {**asdict(summary), "files": files, "config_hash": metadata.config_hash,
                "rows_per_s": summary.rows_per_s, "corpus": corpus, "shards": sorted(parts.shards)}
    write_json(fs, f"{root}/{MANIFEST}", manifest)
    fs.delete_file(f"{root}/{RUN_STATE}")


def _fail(output: str, message: str) -> None:
    """Mark the run as failed, so that a rerun does not resume it, and raise."""
    fs, root = filesystem(output)
    state = read_json(fs, f"{root}/{RUN_STATE}") or {}
    write_json(fs, f"{root}/{RUN_STATE}", {**state, "failed": message.splitlines()[0][:300]})
    raise SoftLabelError(f"{message}\nno {MANIFEST} was written: this output is incomplete; fix the input and "
                         f"rerun with output.overwrite=true")


def main(cfg: LabelConfig) -> LabelSummary:
    summary = run_label(cfg)
    say(summary.line())
    return summary


ENTRY_POINTS = {"label": main}
