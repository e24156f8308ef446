"""Reading corpora: find the input shards, then read one shard into checked, normalised rows.

Ray-free: ``list_shards`` runs on the driver, ``read_shard`` inside whatever runs it
(a Ray Data task in ``kd_ray.label``). Every row leaves here with a stable id, its
(optionally normalised) text, its gold label as an index into the teacher's label
order (or null), and ``reject_reason`` (null for good rows).
"""

from __future__ import annotations

import fnmatch
import io
from dataclasses import dataclass, replace
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kd_ray.config import CorpusConfig
from kd_ray.errors import CorpusError
from kd_ray.normalize import normalize_post
from kd_ray.storage import filesystem

EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
READ_ROWS = 65_536  # rows per Arrow batch while reading a file
ALREADY_LABELED = "already labeled"  # reject_reason of rows an interrupted run committed (kd_ray.label)
ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("reject_reason", pa.string()),
    ]
)




def task_label_column(task: str) -> str:
    """Column of a task's gold label index (multi-task), beside ``label`` (the first teacher's task)."""
    return f"label_{task}"


@dataclass(frozen=True)
class Shard:
    """One unit of reading: a whole file, or a row range of a Hugging Face dataset."""

    uri: str  # file path or URI; the dataset path / hub name for format "hf"
    name: str  # stable name used in derived ids
    format: str
    start: int = 0
    stop: int | None = None
    gold: bool = True  # False: a file of corpus.unlabeled_path, read without its gold labels


def _file_format(name: str, configured: str) -> str | None:
    if configured != "auto":
        return configured
    lower = name.lower()
    for comp in COMPRESSIONS:
        if lower.endswith(comp):
            lower = lower[: -len(comp)]
    for ext, fmt in EXTENSIONS.items():
        if lower.endswith(ext):
            return fmt
    return None


def _is_hf_dataset_dir(fs: pafs.FileSystem, path: str) -> bool:
    probes = fs.get_file_info([f"{path}/state.json", f"{path}/dataset_dict.json"])
    return any(p.type == pafs.FileType.File for p in probes)


def list_shards(cfg: CorpusConfig, hf_rows_per_shard: int = 50_000) -> list[Shard]:
    """Resolve ``cfg.path`` (file, folder, glob, URI, HF dataset, or a list of them), then
    ``cfg.unlabeled_path``, to shards."""
    if cfg.unlabeled_path is not None:
        unlabeled = cfg.model_copy(update={"path": cfg.unlabeled_path, "unlabeled_path": None})
        shards = (list_shards(cfg.model_copy(update={"unlabeled_path": None}), hf_rows_per_shard)
                  + [replace(s, gold=False) for s in list_shards(unlabeled, hf_rows_per_shard)])
        return _distinct_names(shards)
    if isinstance(cfg.path, list):
        return _distinct_names([s for p in cfg.path
                                for s in list_shards(cfg.model_copy(update={"path": p}), hf_rows_per_shard)])
    path = cfg.path.rstrip("/")
    if path.startswith("hf://") or cfg.format == "hf":
        return _hf_shards(cfg, hf_rows_per_shard)
    fs, base = filesystem(path)
    if any(ch in base for ch in "*?["):
        root = base[: min(base.index(ch) for ch in "*?[" if ch in base)].rsplit("/", 1)[0] or "."
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        candidates = [i for i in infos if i.is_file and fnmatch.fnmatch(i.path, base)]
    else:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"corpus.path {cfg.path!r} does not exist")
        if info.type == pafs.FileType.File:
            root, candidates = base.rsplit("/", 1)[0] if "/" in base else ".", [info]
        else:
            if _is_hf_dataset_dir(fs, base):
                return _hf_shards(cfg, hf_rows_per_shard)
            root = base
            candidates = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.is_file]
    shards, skipped = [], []
    for info in sorted(candidates, key=lambda i: i.path):
        rel = info.path[len(root):].lstrip("/") if info.path.startswith(root) else info.base_name
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files, _SUCCESS markers, _manifest.json
        fmt = _file_format(info.base_name, cfg.format)
        if fmt is None:
            skipped.append(info.path)
            continue
        uri = info.path if "://" not in cfg.path else f"{cfg.path.split('://')[0]}://{info.path}"
        shards.append(Shard(uri=uri, name=rel, format=fmt))
    if not shards:
        hint = f" (found only {skipped[:3]}; set corpus.format)" if skipped else ""
        raise CorpusError(f"corpus.path {cfg.path!r} matches no readable corpus files{hint}; "
                          f"allowed extensions: {sorted(EXTENSIONS)}")
    return shards


def _distinct_names(shards: list[Shard]) -> list[Shard]:
    names = [s.name for s in shards]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise CorpusError(f"corpus.path / corpus.unlabeled_path entries share the file names {clashes}, which would "
                          f"give rows the same derived ids; rename the files or set corpus.id_column")
    return shards


def _hf_shards(cfg: CorpusConfig, rows_per_shard: int) -> list[Shard]:
    dataset = _load_hf(cfg.path, cfg.split)
    n = len(dataset)
    name = cfg.path.removeprefix("hf://").rstrip("/").rsplit("/", 1)[-1] + f"[{cfg.split}]"
    return [Shard(uri=cfg.path, name=name, format="hf", start=s, stop=min(s + rows_per_shard, n))
            for s in range(0, n, rows_per_shard)]


def _load_hf(path: str, split: str):
    import datasets

    if path.startswith("hf://"):
        return datasets.load_dataset(path.removeprefix("hf://"), split=split)  # the ordinary hub call
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise CorpusError(f"dataset {path} has splits {sorted(loaded)}, not corpus.split={split!r}")
        loaded = loaded[split]
    return loaded


# ---------------------------------------------------------------------------- reading


def _read_tables(shard: Shard, cfg: CorpusConfig) -> Iterator[pa.Table]:
    """Raw Arrow tables of a shard, in row order."""
    if shard.format == "hf":
        dataset = _load_hf(shard.uri, cfg.split).with_format("arrow")
        for start in range(shard.start, shard.stop, READ_ROWS):
            yield dataset[start:min(start + READ_ROWS, shard.stop)]
        return
    fs, path = filesystem(shard.uri)
    try:
        if shard.format == "parquet":
            with fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS):
                    yield pa.Table.from_batches([batch])
        elif shard.format in ("csv", "tsv"):
            with fs.open_input_stream(path, compression="detect") as f:
                reader = pacsv.open_csv(
                    f,
                    read_options=pacsv.ReadOptions(block_size=1 << 22),
                    parse_options=pacsv.ParseOptions(delimiter="\t" if shard.format == "tsv" else ",",
                                                     newlines_in_values=True),
                    convert_options=pacsv.ConvertOptions(column_types=_string_columns(cfg)),
                )
                for batch in reader:
                    yield pa.Table.from_batches([batch])
        elif shard.format == "jsonl":
            with fs.open_input_stream(path, compression="detect") as f:
                yield pajson.read_json(f)
        elif shard.format == "text":
            yield _read_text_lines(fs, path, shard.name)
        else:
            raise CorpusError(f"{shard.uri}: unknown corpus.format {shard.format!r}")
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{shard.uri}: cannot read as {shard.format}: {e}") from e


def _string_columns(cfg: CorpusConfig) -> dict[str, pa.DataType]:
    # ids and texts stay strings even when they look like numbers
    return {c: pa.string() for c in (cfg.text_column, cfg.id_column) if c}


def _read_text_lines(fs: pafs.FileSystem, path: str, name: str) -> pa.Table:
    with fs.open_input_stream(path, compression="detect") as f:
        raw = f.read()
    texts = []
    for line_no, line in enumerate(io.BytesIO(raw), start=1):
        try:
            texts.append(line.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}: line {line_no} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return pa.table({"text": pa.array(texts, pa.string())})


def read_shard(shard: Shard, cfg: CorpusConfig, label_to_index: dict[str, int] | None,
               task_labels: dict[str, dict[str, int]] | None = None) -> Iterator[pa.Table]:
    """Yield checked rows of ``shard`` with columns ``ROW_SCHEMA``, then ``label_<task>`` per task_labels.

    label_to_index: gold label name -> index in the teacher's label order.
    task_labels: task -> its label_to_index, for the gold columns in cfg.task_label_columns.
    """
    text_col = "text" if shard.format == "text" else cfg.text_column
    row0 = shard.start
    emitted = 0
    seen_ids: dict[str, int] = {}  # id -> first row, to name both rows of a duplicate
    for table in _read_tables(shard, cfg):
        if cfg.limit is not None:
            table = table.slice(0, max(0, cfg.limit - emitted))
        if table.num_rows == 0:
            continue
        yield _check_rows(table, shard, cfg, text_col, row0, label_to_index, seen_ids, task_labels or {})
        row0 += table.num_rows
        emitted += table.num_rows
        if cfg.limit is not None and emitted >= cfg.limit:
            return


def _missing_column(shard: Shard, table: pa.Table, column: str, field_name: str) -> CorpusError:
    return CorpusError(
        f"{shard.uri}: has no column {column!r} (corpus.{field_name}); its columns are {table.column_names}"
    )


def _check_rows(table: pa.Table, shard: Shard, cfg: CorpusConfig, text_col: str, row0: int,
                label_to_index: dict[str, int] | None, seen_ids: dict[str, int],
                task_labels: dict[str, dict[str, int]]) -> pa.Table:
    """The rows of one Arrow batch as ``ROW_SCHEMA`` (plus ``label_<task>`` columns), bad rows marked."""
    if text_col not in table.column_names:
        raise _missing_column(shard, table, text_col, "text_column")
    texts = table.column(text_col)
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise CorpusError(f"{shard.uri}: column {text_col!r} (corpus.text_column) holds {texts.type}, not text")
    ids = _row_ids(table, shard, cfg, row0, seen_ids)
    text_list, reasons = _texts(texts.to_pylist(), cfg)
    bad_column = [text_col] * table.num_rows
    # gold labels: the first task's in `label`, the other tasks' in `label_<task>`
    golds = {"label": (cfg.label_column, "label_column", label_to_index)}
    golds.update({task_label_column(task): (cfg.task_label_columns.get(task), f"task_label_columns.{task}", index)
                  for task, index in task_labels.items()})
    gold_idx = {out: _gold_indices(table, shard, cfg, spec, reasons, bad_column) for out, spec in golds.items()}
    if cfg.bad_rows == "error":
        for i, reason in enumerate(reasons):
            if reason:
                raise CorpusError(
                    f"{shard.uri}: row {row0 + i} (id {ids[i]!r}) has {reason} in column {bad_column[i]!r}; fix the "
                    f"row or set corpus.bad_rows=skip to set such rows aside under _rejected/"
                )
    rows = pa.table(
        [pa.array(ids, pa.string()), pa.array(text_list, pa.string()),
         pa.array(gold_idx.pop("label"), pa.int32()), pa.array(reasons, pa.string())],
        schema=ROW_SCHEMA,
    )
    for out, values in gold_idx.items():
        rows = rows.append_column(pa.field(out, pa.int32()), pa.array(values, pa.int32()))
    return rows


def _row_ids(table: pa.Table, shard: Shard, cfg: CorpusConfig, row0: int, seen_ids: dict[str, int]) -> list[str]:
    """corpus.id_column's ids, checked non-null and unique in the shard; else '<file>:<row>'."""
    if not cfg.id_column:
        return [f"{shard.name}:{row0 + i}" for i in range(table.num_rows)]
    if cfg.id_column not in table.column_names:
        raise _missing_column(shard, table, cfg.id_column, "id_column")
    ids = pc.cast(table.column(cfg.id_column), pa.string())
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise CorpusError(f"{shard.uri}: row {row0 + row} has a null id in column {cfg.id_column!r}")
    ids = ids.to_pylist()
    for i, row_id in enumerate(ids):
        first = seen_ids.setdefault(row_id, row0 + i)
        if first != row0 + i:
            raise CorpusError(f"{shard.uri}: rows {first} and {row0 + i} have the same id {row_id!r} in column "
                              f"{cfg.id_column!r} (corpus.id_column); ids must be unique")
    return ids


def _texts(text_list: list, cfg: CorpusConfig) -> tuple[list, list[str | None]]:
    """The texts (normalised if asked) and why each bad one is bad (None for good ones)."""
    reasons: list[str | None] = [None] * len(text_list)
    for i, text in enumerate(text_list):
        if text is None:
            reasons[i] = "null text"
        elif not text.strip():
            reasons[i] = "empty text"
        elif len(text) > cfg.max_text_chars:
            reasons[i] = f"a text of {len(text):,} characters (over corpus.max_text_chars={cfg.max_text_chars:,})"
        elif cfg.normalize:
            text_list[i] = normalize_post(text)
    return text_list, reasons


def _gold_indices(table: pa.Table, shard: Shard, cfg: CorpusConfig, spec: tuple, reasons: list,
                  bad_column: list) -> list[int | None]:
    """One gold column's label indices; an unknown label marks its row bad (in ``reasons``, ``bad_column``)."""
    column, field_name, to_index = spec
    gold: list[int | None] = [None] * table.num_rows
    # text files have no columns; the files of corpus.unlabeled_path keep their gold hidden
    if not column or shard.format == "text" or not shard.gold:
        return gold
    if column not in table.column_names and not cfg.partial_labels:
        raise _missing_column(shard, table, column, field_name)
    raw_labels = table.column(column).to_pylist() if column in table.column_names else []
    for i, raw in enumerate(raw_labels):
        if raw is None or raw == "" or to_index is None:
            continue
        name = _label_name(raw, cfg)
        if name is None or name not in to_index:
            if not reasons[i]:
                reasons[i], bad_column[i] = f"gold label {raw!r} not in {list(to_index)}", column
        else:
            gold[i] = to_index[name]
    return gold


def _label_name(raw, cfg: CorpusConfig) -> str | None:
    if isinstance(raw, bool):
        raw = int(raw)
    if isinstance(raw, (int, float)) or (isinstance(raw, str) and raw.lstrip("-").isdigit() and cfg.label_names):
        if not cfg.label_names:
            return str(raw)
        i = int(raw)
        return cfg.label_names[i] if 0 <= i < len(cfg.label_names) else None
    return str(raw)
