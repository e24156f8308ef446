"""The soft-label Parquet format: its schema, its metadata, and the checks its readers run.

A soft-label folder holds ``part-*.parquet`` files, ``_manifest.json`` and, when rows
were skipped, ``_rejected/``. Every part file has these columns:

==================  ==============================  ===============================================
column              type                            meaning
==================  ==============================  ===============================================
``id``              string, not null                stable row id, unique in the folder
``text``            string, not null                the text the teacher saw (normalised if asked)
``label``           int32, nullable                 one task: its gold label as an index into its
                                                    labels (``gold`` in the metadata); null when the
                                                    row has none
``label_<task>``    int32, nullable                 several tasks: each task's gold label, same rules
``<name>_logits``   fixed_size_list<float32|16, C>  raw logits of teacher ``<name>`` (no softmax,
                                                    so the temperature is chosen at training time)
``<name>_representation``  fixed_size_list<float16, H>  optional (``teachers.N.representation``): the
                                                    teacher's sentence representation, its last hidden
                                                    states mean-pooled over real tokens ('mean') or its
                                                    first token's ('cls'); H = its hidden size, so
                                                    2 * H bytes a row before compression (768 for
                                                    MiniLM-L6, 1,536 for a base model)
``truncated``       bool                            the text was longer than a teacher's max_length
==================  ==============================  ===============================================

Without ``corpus.id_column`` a row's id is derived from its place: ``<file>:<row>`` in a Parquet file
or dataset, ``<file>@<byte offset of its line>`` in a JSON Lines, CSV/TSV or text file (schema
version 2; version 1 numbered those rows too, which a byte range read by its own task cannot know).

Each part file has a key-value metadata entry ``kd_ray`` holding JSON: ``schema_version``,
``kd_ray_version``, ``teachers`` (per teacher: ``name``, ``task``, ``model``,
``weights_sha256``, ``id2label``, ``max_length``, ``representation``: null or its ``pooling``, ``layer``
and ``width``), ``gold`` (task -> the label names its gold column indexes, for the tasks whose gold
the corpus had), ``normalize``,
``logits_dtype``, ``corpus`` and ``config_hash``; and, in its footer, ``kd_ray_part``: the corpus
shard of each row group and the file's counts (see kd_ray.stages.label). ``SoftLabelMetadata`` reads
and checks it. Schemas 1 and 2 (still read) kept the first teacher's task's gold in ``label`` whatever the
number of tasks (``label_task``, ``label_names``) and the other tasks' in ``label_<task>`` (``task_labels``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from kd_ray.data.corpus import READ_ROWS, task_label_column
from kd_ray.data.storage import filesystem, read_json
from kd_ray.errors import SoftLabelError

PART_KEY = b"kd_ray_part"  # a part file's footer entry: the corpus shard of each row group, and the file's counts
# 3: every task's gold in its own column 'label_<task>' (one task: 'label'), their names in `gold`;
# 2: a line file's derived row ids are '<file>@<byte offset>' (1: '<file>:<row>'), and the first task's gold is in
# 'label' (label_task, label_names), the others' in 'label_<task>' (task_labels)
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # soft labels of every version train a student
METADATA_KEY = b"kd_ray"
MANIFEST = "_manifest.json"
REJECTED_DIR = "_rejected"


class ModelInfo(BaseModel):
    """A sequence classifier's provenance, as ``kd_ray.models.teacher.describe_model`` reads it."""

    model_config = ConfigDict(frozen=True)

    model: str
    revision: str | None = None
    weights_sha256: str | None = None
    id2label: dict[str, str]
    architecture: str | None = None

    @property
    def labels(self) -> list[str]:
        """Label names in output order."""
        return [self.id2label[str(i)] for i in range(len(self.id2label))]


class RepresentationInfo(BaseModel):
    """A teacher's stored sentence representation: how it was pooled, from which layer, its width."""

    model_config = ConfigDict(frozen=True)

    pooling: str  # 'mean': over real tokens; 'cls': the first token
    layer: str = "last"  # the encoder's last hidden states
    width: int  # the teacher's hidden size
    dtype: str = "float16"


class TeacherInfo(ModelInfo):
    """One entry of the metadata's ``teachers``: a labeling run's teacher and its provenance. Stored with the
    fields it was given (``model_dump(exclude_unset=True)``): a field a teacher does not use stays out."""

    name: str
    task: str
    max_length: int
    representation: RepresentationInfo | None = None
    kind: str = "classifier"  # 'llm': a prompted causal LM; its logits are label-word log-probabilities
    prompt: str | None = None
    prompt_sha256: str | None = None
    verbalizer: dict[str, list[str]] | None = None  # label -> its words
    label_token_ids: list[list[int]] | None = None  # label -> its words' tokens
    calibration: dict | None = None
    chat: bool = False  # the prompt went into the LM's chat template

    @property
    def column(self) -> str:
        return logits_column(self.name)

    @property
    def representation_columns(self) -> tuple[str, ...]:
        """The column of its stored representation, if it has one."""
        return (representation_column(self.name),) if self.representation else ()


class PredictionsInfo(BaseModel):
    """A prediction folder's (`kd-ray predict`): each task's labels, in the order of the model's joint output, and
    what is stored besides each task's label and probabilities."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: dict[str, list[str]]
    logits: bool = False
    text: bool = False

    def columns(self, task: str) -> tuple[str, str]:
        """The columns of a task's predicted label and of its probabilities."""
        return f"{task}_label", f"{task}_probs"


class SoftLabelMetadata(BaseModel):
    """The ``kd_ray`` metadata of every part file, typed: what labeling stores and every reader reads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int
    kd_ray_version: str | None = None
    teachers: list[TeacherInfo]
    gold: dict[str, list[str]] | None = None  # task -> the label names its gold indexes (schema 3)
    label_task: str | None = None  # schemas 1, 2: the task whose gold is in column 'label',
    label_names: list[str] | None = None  # its label names,
    task_labels: dict[str, list[str]] | None = None  # and task -> label names of each other 'label_<task>' column
    normalize: bool = False
    logits_dtype: str = "float32"
    corpus: str | list[str] | None = None
    unlabeled_corpus: str | list[str] | None = None
    augment: dict[str, Any] | None = None
    predictions: PredictionsInfo | None = None  # a prediction folder: the model's labels and probabilities per task
    config_hash: str

    def stored(self) -> dict[str, Any]:
        """The JSON-ready dict as labeling wrote it (keys it left out stay out, so hashes are unchanged)."""
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def tasks(self) -> list[str]:
        """The teachers' tasks, in teacher order."""
        return list(dict.fromkeys(t.task for t in self.teachers))

    @property
    def gold_labels(self) -> dict[str, list[str]]:
        """Task -> the label names of its gold column, for the tasks whose gold the files carry."""
        if self.schema_version >= 3:
            return self.gold or {}
        first = {self.label_task: self.label_names} if self.label_task and self.label_names else {}
        return first | (self.task_labels or {})

    def gold_column(self, task: str) -> str | None:
        """The column holding task ``task``'s gold labels, if these soft labels have one."""
        if self.schema_version >= 3:
            return None if task not in self.tasks else "label" if len(self.tasks) == 1 else task_label_column(task)
        if self.label_task == task:
            return "label"
        return task_label_column(task) if task in (self.task_labels or {}) else None

    @property
    def gold_columns(self) -> list[str]:
        """The gold columns of the files, in order."""
        if self.predictions:
            return []
        if self.schema_version >= 3:
            return [self.gold_column(task) for task in self.tasks]
        return ["label", *(task_label_column(task) for task in self.task_labels or {})]

    def gold_sizes(self) -> dict[str, int]:
        """Each gold column of a task with gold labels, and how many labels its task has."""
        return {self.gold_column(task): len(names) for task, names in self.gold_labels.items()}

    def as_stored(self, rows: pa.Table) -> pa.Table:
        """Rows as the corpus reader gives them (the first teacher's task's gold in 'label', another task's in
        'label_<task>') with the gold columns of the files: renamed, and null where the corpus has none."""
        read = {self.tasks[0]: "label"} | {task: task_label_column(task) for task in self.tasks[1:]}
        for task in self.tasks if not self.predictions else ():
            column, stored = read[task], self.gold_column(task)
            if column in rows.column_names:
                rows = rows.rename_columns([stored if n == column else n for n in rows.column_names])
            else:
                rows = rows.append_column(stored, pa.nulls(rows.num_rows, pa.int32()))
        return rows

    @property
    def command(self) -> str:
        """The command that writes such a folder."""
        return "predict" if self.predictions else "label"

    @property
    def value_columns(self) -> list[str]:
        """The files' float columns: the teachers' logits (a prediction folder's only if kept) and representations,
        each predicted task's probabilities."""
        p = self.predictions
        columns = [c for t in self.teachers for c in ((t.column,) if not p or p.logits else ())
                   + t.representation_columns]
        return columns + [p.columns(task)[1] for task in p.tasks] if p else columns


def logits_column(teacher_name: str) -> str:
    return f"{teacher_name}_logits"


def representation_column(teacher_name: str) -> str:
    return f"{teacher_name}_representation"


def soft_label_schema(metadata: SoftLabelMetadata | dict[str, Any]) -> pa.Schema:
    """Arrow schema of a part file for the teachers described in ``metadata``."""
    metadata = SoftLabelMetadata.model_validate(metadata)
    value_type = pa.float16() if metadata.logits_dtype == "float16" else pa.float32()
    predictions = metadata.predictions
    fields = [pa.field("id", pa.string(), nullable=False)]
    if not predictions or predictions.text:
        fields.append(pa.field("text", pa.string(), nullable=False))
    fields += [pa.field(column, pa.int32()) for column in metadata.gold_columns]
    for task, labels in (predictions.tasks if predictions else {}).items():
        label, probs = predictions.columns(task)
        fields += [pa.field(label, pa.string(), nullable=False),
                   pa.field(probs, pa.list_(pa.float32(), len(labels)), nullable=False)]
    for t in metadata.teachers:
        if t.column in metadata.value_columns:
            fields.append(pa.field(t.column, pa.list_(value_type, len(t.id2label)), nullable=False))
        if t.representation:
            fields.append(pa.field(representation_column(t.name), pa.list_(pa.float16(), t.representation.width),
                                   nullable=False))
    fields.append(pa.field("truncated", pa.bool_(), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata.stored(), sort_keys=True)})


REJECTED_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("text", pa.string()),
                             pa.field("reject_reason", pa.string(), nullable=False)])  # files under _rejected/


def parquet_writer(sink, schema: pa.Schema) -> pq.ParquetWriter:
    """How part files are written: zstd, and the float columns (logits, representations, probabilities)
    BYTE_STREAM_SPLIT-encoded (dictionary encoding of floats only wastes space; benchmarks/soft_label_storage.py)."""
    logits = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type)]
    return pq.ParquetWriter(sink, schema, compression="zstd",
                            use_dictionary=[f.name for f in schema if f.name not in logits],
                            column_encoding={f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in logits})


@dataclass
class SoftLabelInfo:
    """What a soft-label folder holds, from its files' metadata."""

    path: str
    files: list[str]
    metadata: SoftLabelMetadata
    num_rows: int
    files_digest: str = ""  # the part files' names, sizes and modification times: a relabeled folder differs
    # corpus shard key -> [[part file, [row group, ...]], ...] (a file without a kd-ray footer: [[file, None]] under
    # its own name): what `read_units` reads, per shard, not per row
    shards: dict[str, list] = field(default_factory=dict)

    def read_units(self) -> list[list]:
        """The folder's rows as read units in a fixed order: one per corpus shard, by shard key, each the row
        groups of every part file that hold the shard's rows. Which file a row landed in, and where in it,
        follows the order labeling tasks finished in; which shard it belongs to does not."""
        return [self.shards[key] for key in sorted(self.shards)]

    @property
    def teachers(self) -> list[TeacherInfo]:
        return self.metadata.teachers

    def teacher(self, name: str | None = None) -> TeacherInfo:
        for t in self.teachers:
            if name in (None, t.name):
                return t
        raise SoftLabelError(f"soft labels at {self.path} have no teacher named {name!r}; they hold "
                             f"{[t.name for t in self.teachers]}")


def list_part_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, root = filesystem(path)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise SoftLabelError(f"soft-label folder {path} does not exist")
    selector = pafs.FileSelector(root, recursive=False)
    files = sorted(
        f.path for f in fs.get_file_info(selector) if f.is_file and f.base_name.startswith("part-") and f.base_name.endswith(".parquet")
    )
    if not files:
        raise SoftLabelError(f"soft-label folder {path} holds no part-*.parquet files; was `kd-ray label` run into it?")
    return fs, files


def _file_metadata(fs: pafs.FileSystem, file: str) -> tuple[SoftLabelMetadata, int, pa.Schema, dict | None]:
    """(kd-ray metadata, rows, schema, footer entry PART_KEY or None) of a part file."""
    try:
        with fs.open_input_file(file) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            num_rows = pf.metadata.num_rows
            footer = (pf.metadata.metadata or {}).get(PART_KEY)
    except (pa.ArrowInvalid, OSError) as e:
        raise SoftLabelError(f"{file} is not a readable Parquet file ({e})") from e
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SoftLabelError(f"{file} has no kd_ray metadata: it was not written by `kd-ray label`")
    version = json.loads(raw).get("schema_version")
    if version not in READABLE_VERSIONS:
        raise SoftLabelError(f"{file} has soft-label schema version {version}, this kd-ray reads versions "
                             f"{list(READABLE_VERSIONS)}")
    try:
        meta = SoftLabelMetadata.model_validate_json(raw)
    except ValidationError as e:
        raise SoftLabelError(f"{file}: its kd_ray metadata is not what `kd-ray label` writes: {e}") from None
    return meta, num_rows, schema, json.loads(footer) if footer else None


def add_shard_groups(shards: dict[str, list], file: str, footer: dict | None) -> None:
    """Add ``file``'s row groups to ``shards`` (shard key -> [[file, [row group, ...]], ...]) from its footer."""
    if footer is None:
        shards[file.rsplit("/", 1)[-1]] = [[file, None]]
        return
    for group, key in enumerate(footer["shards"]):
        files = shards.setdefault(key, [])
        if not files or files[-1][0] != file:
            files.append([file, []])
        files[-1][1].append(group)


def _check_representation(file: str, schema: pa.Schema, teacher: TeacherInfo) -> None:
    """A stored representation is as wide as its metadata says: the width a student's projection maps to."""
    if not teacher.representation:
        return
    column, width = representation_column(teacher.name), teacher.representation.width
    if column not in schema.names:
        raise SoftLabelError(f"{file} has no column {column!r}, though its metadata says teacher {teacher.name!r} "
                             "stored its representation there")
    size = getattr(schema.field(column).type, "list_size", None)
    if size != width:
        raise SoftLabelError(f"{file}: column {column!r} holds {schema.field(column).type}, but teacher "
                             f"{teacher.name!r}'s metadata gives its representation width {width}, the width a "
                             f"student's projection maps to; relabel the folder")


def read_soft_label_info(path: str) -> SoftLabelInfo:
    """Read and cross-check the metadata of every part file (cheap: footers only)."""
    fs, files = list_part_files(path)
    first_meta, total, shards = None, 0, {}
    for file in files:
        meta, rows, schema, footer = _file_metadata(fs, file)
        add_shard_groups(shards, file, footer)
        if first_meta is None:
            first_meta = meta
        elif meta.teachers != first_meta.teachers or meta.config_hash != first_meta.config_hash:
            raise SoftLabelError(f"{file} was labeled by a different teacher or config than {files[0]}; do not mix runs")
        for t in meta.teachers:
            _check_representation(file, schema, t)
        expected = soft_label_schema(meta).remove_metadata()
        if not schema.remove_metadata().equals(expected):
            raise SoftLabelError(f"{file} has schema\n{schema.remove_metadata()}\nexpected\n{expected}")
        total += rows
    stats = [(f.base_name, f.size, f.mtime_ns) for f in fs.get_file_info(files)]
    digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
    return SoftLabelInfo(path=path, files=files, metadata=first_meta, num_rows=total, files_digest=digest,
                         shards=shards)


def _iter_tables(fs: pafs.FileSystem, files: list[str], columns: list[str] | None = None):
    for file in files:
        with fs.open_input_file(file) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS, columns=columns):
                yield file, pa.Table.from_batches([batch])


def _duplicate_ids(fs: pafs.FileSystem, files: list[str]) -> list[str]:
    """Ids in more than one row, in memory that stays small as folders grow: one 8-byte hash
    per row (not the ids themselves), then a second pass over the rows whose hashes collide."""
    hashes = np.concatenate([np.fromiter((hash(i) for i in t.column("id").to_pylist()), np.int64, t.num_rows)
                             for _, t in _iter_tables(fs, files, ["id"])] or [np.empty(0, np.int64)])
    hashes.sort()
    suspects = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    problems, first_seen = [], {}
    if suspects:
        for file, t in _iter_tables(fs, files, ["id"]):
            for row_id in t.column("id").to_pylist():
                if hash(row_id) in suspects:
                    if row_id in first_seen:
                        problems.append(f"{file}: id {row_id!r} appears more than once (also in {first_seen[row_id]})")
                    first_seen.setdefault(row_id, file)
    return problems


def part_stats(table: pa.Table, metadata: SoftLabelMetadata) -> dict[str, Any]:
    """What the final check needs of a part file's rows: counts, non-finite logits (and representations),
    gold label ranges."""
    return {
        "rows": table.num_rows,
        "truncated": pc.sum(table.column("truncated")).as_py() or 0,
        "nonfinite": {c: int(pc.sum(pc.invert(pc.is_finite(pc.list_flatten(table.column(c))))).as_py() or 0)
                      for c in metadata.value_columns},
        "gold": {c: [pc.min(table.column(c)).as_py(), pc.max(table.column(c)).as_py()] for c in metadata.gold_sizes()},
    }


def stats_problems(file: str, stats: dict[str, Any], metadata: SoftLabelMetadata) -> list[str]:
    """What is wrong with a part file's rows, from their stats: non-finite logits or representations, gold
    label indices outside their task's labels. The one check of rows that labeling's final check (from the
    footers) and `kd-ray validate` (from the rows) both make."""
    sizes = metadata.gold_sizes()
    return ([f"{file}: {n} NaN/Inf values in {column}" for column, n in stats["nonfinite"].items() if n]
            + [f"{file}: gold label index outside 0..{sizes[c] - 1} in column {c!r}"
               for c, (lo, hi) in stats["gold"].items() if hi is not None and (lo < 0 or hi >= sizes[c])])


def validate_soft_labels(path: str, *, require_manifest: bool = True) -> dict[str, Any]:
    """Full check of a folder: metadata, schema, row count vs manifest, unique ids, finite logits.

    Streams the files; memory grows by 8 bytes per row (the id check), not with the texts."""
    info = read_soft_label_info(path)
    fs, _ = filesystem(path)
    problems = _duplicate_ids(fs, info.files)
    columns = ["truncated", *info.metadata.gold_sizes(), *info.metadata.value_columns]
    for file, table in _iter_tables(fs, info.files, columns):  # checked as labeling checks the footers' stats
        problems += [p for p in stats_problems(file, part_stats(table, info.metadata), info.metadata)
                     if p not in problems]
        if len(problems) > 20:
            break
    manifest_rows = (read_json(fs, f"{filesystem(path)[1]}/{MANIFEST}") or {}).get("rows")
    if require_manifest and manifest_rows is None:
        problems.append(f"{path}/{MANIFEST} is missing: the labeling run did not finish")
    if require_manifest and manifest_rows is not None and manifest_rows != info.num_rows:
        problems.append(f"manifest says {manifest_rows} rows, the part files hold {info.num_rows}")
    if problems:
        raise SoftLabelError(f"soft labels at {path} failed validation:\n  " + "\n  ".join(problems[:20]))
    return {"path": path, "files": len(info.files), "rows": info.num_rows, "teachers": [t.name for t in info.teachers]}


def validate_main(argv: list[str]) -> int:
    """`kd-ray validate FOLDER [FOLDER ...]`"""
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: kd-ray validate SOFT_LABEL_FOLDER [...]", file=sys.stderr)
        return 2
    for path in argv:
        summary = validate_soft_labels(path)
        print(f"ok: {summary['rows']} rows in {summary['files']} files, teachers {summary['teachers']} ({path})")
    return 0


ENTRY_POINTS = {"validate": validate_main}
