"""Reading corpora: find the input shards, then read one shard into checked, normalised rows.

Ray-free: ``list_shards`` runs on the driver, ``read_shard`` inside whatever runs it
(a Ray Data task in ``kd_ray.stages.label``). A file over ``corpus.split_bytes`` is several shards:
line-aligned byte ranges (a range owns the records that start in it), or runs of Parquet row
groups; each is streamed in bounded memory. Every row leaves here with a stable id, its
(optionally normalised) text, its gold label as an index into the teacher's label
order (or null), and ``reject_reason`` (null for good rows).
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kd_ray.config import CorpusConfig
from kd_ray.data.normalize import normalize_post
from kd_ray.data.storage import filesystem
from kd_ray.errors import CorpusError

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
              ".csv": "csv", ".tsv": "tsv", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
LINE_FORMATS = ("jsonl", "csv", "tsv", "text")  # one record per line (a CSV's quoted field may hold newlines)
READ_ROWS = 65_536  # rows per Arrow batch while reading a Parquet file or dataset
CHUNK_BYTES = 8 << 20  # bytes of whole records parsed at a time from a line file
SNIFF_BYTES = 1 << 20  # bytes of a big CSV checked for quoted newlines before it is split
ALREADY_LABELED = "already labeled"  # reject_reason of rows an interrupted run committed (kd_ray.stages.label)
SHARD_COLUMN = "shard"  # while labeling: the key of the shard a row was read from (kd_ray.stages.label)
ROW_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.int32()),
                        ("reject_reason", pa.string())])


def task_label_column(task: str) -> str:
    """Column of a task's gold label index (multi-task), beside ``label`` (the first teacher's task)."""
    return f"label_{task}"


@dataclass(frozen=True)
class Shard:
    """One unit of reading: a whole file, a part of a big file, or a row range of a Hugging Face dataset.

    ``start``/``stop`` count rows for format "hf", row groups for Parquet and bytes for the line
    formats (a byte range owns the records that start inside it); ``stop=None`` reads to the end."""

    uri: str  # file path or URI; the dataset path / hub name for format "hf"
    name: str  # stable name used in derived ids
    format: str
    start: int = 0
    stop: int | None = None
    gold: bool = True  # False: a file of corpus.unlabeled_path, read without its gold labels
    size: int | None = None  # bytes of the file the shard covers, where known (estimated_rows)
    file_size: int | None = None  # the whole file's bytes and modification time, where known: what a rerun
    mtime_ns: int | None = None  # compares to find a file that grew or changed (kd_ray.data.growth)

    @property
    def key(self) -> str:
        """Names the shard among a run's shards: a resumed run finds each shard's committed rows by it."""
        return self.name if self.stop is None else f"{self.name}[{self.start}:{self.stop}]"

    @staticmethod
    def file_of(key: str) -> str:
        """The file name a shard ``key`` names (the inverse of ``key`` up to the range)."""
        return re.sub(r"\[\d+:\d+\]$", "", key)

    @property
    def by_bytes(self) -> bool:
        """Rows are records of a line file, placed by byte offset (else by row number)."""
        return self.format in LINE_FORMATS

    def byte_ranges(self, start: int, step: int) -> list[Shard]:
        """The file's bytes from ``start`` to its end as shards of at most ``step`` bytes each."""
        bounds = [*range(start, self.file_size, step), self.file_size]
        return [replace(self, start=a, stop=b, size=b - a) for a, b in zip(bounds, bounds[1:])]


def _file_format(name: str, configured: str) -> str | None:
    if configured != "auto":
        return configured
    lower = name.lower()
    for comp in COMPRESSIONS:
        lower = lower.removesuffix(comp)
    return next((fmt for ext, fmt in EXTENSIONS.items() if lower.endswith(ext)), None)


def list_shards(cfg: CorpusConfig, hf_rows_per_shard: int = 50_000) -> list[Shard]:
    """Resolve ``cfg.path`` (file, folder, glob, URI, HF dataset, or a list of them), then
    ``cfg.unlabeled_path``, to shards."""
    if cfg.unlabeled_path is not None:
        unlabeled = cfg.model_copy(update={"path": cfg.unlabeled_path, "unlabeled_path": None})
        return _distinct_names(list_shards(cfg.model_copy(update={"unlabeled_path": None}), hf_rows_per_shard)
                               + [replace(s, gold=False) for s in list_shards(unlabeled, hf_rows_per_shard)])
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
            if any(p.is_file for p in fs.get_file_info([f"{base}/state.json", f"{base}/dataset_dict.json"])):
                return _hf_shards(cfg, hf_rows_per_shard)  # a folder written by datasets' save_to_disk
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
        shards += _split(Shard(uri=uri, name=rel, format=fmt, size=info.size, file_size=info.size,
                               mtime_ns=info.mtime_ns), cfg)
    if not shards:
        hint = f" (found only {skipped[:3]}; set corpus.format)" if skipped else ""
        raise CorpusError(f"corpus.path {cfg.path!r} matches no readable corpus files{hint}; "
                          f"allowed extensions: {sorted(EXTENSIONS)}")
    return shards


def _split(shard: Shard, cfg: CorpusConfig) -> list[Shard]:
    """A file over corpus.split_bytes as several shards (byte ranges, or runs of Parquet row groups)."""
    if (not cfg.split_bytes or cfg.limit is not None or shard.size is None or shard.size <= cfg.split_bytes
            or shard.uri.lower().endswith(COMPRESSIONS)):  # a compressed stream cannot be entered in the middle
        return [shard]
    if shard.format == "parquet":
        return _row_group_runs(shard, cfg.split_bytes)
    if shard.format in ("csv", "tsv") and _has_quoted_newlines(shard):
        return [shard]
    return shard.byte_ranges(0, cfg.split_bytes)


def _row_group_runs(shard: Shard, split_bytes: int) -> list[Shard]:
    fs, path = filesystem(shard.uri)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    runs, start, size = [], 0, 0
    total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) or 1
    for i in range(meta.num_row_groups):
        size += meta.row_group(i).total_byte_size
        if size >= split_bytes or i == meta.num_row_groups - 1:  # its share of the file's bytes
            runs.append(replace(shard, start=start, stop=i + 1, size=round((shard.size or 0) * size / total)))
            start, size = i + 1, 0
    return runs if len(runs) > 1 else [shard]


def estimated_rows(shards: list[Shard]) -> int | None:
    """About how many records ``shards`` hold: their bytes times the records per byte of the first
    shard of each format (its Parquet footer, or the lines in its first SNIFF_BYTES), so that a corpus
    of any size costs one small read per format; exact for Hugging Face row ranges. None where it
    cannot be told (a compressed file, an unknown size, an empty sample)."""
    rows, per_byte = 0.0, {}
    for shard in shards:
        if shard.format == "hf":
            rows += shard.stop - shard.start
            continue
        if shard.size is None or shard.uri.lower().endswith(COMPRESSIONS):
            return None
        if shard.format not in per_byte:
            per_byte[shard.format] = _records_per_byte(shard)
        if not per_byte[shard.format]:
            return None
        rows += shard.size * per_byte[shard.format]
    return round(rows)


def _records_per_byte(shard: Shard) -> float | None:
    fs, path = filesystem(shard.uri)
    with fs.open_input_file(path) as f:
        if shard.format == "parquet":
            return pq.ParquetFile(f).metadata.num_rows / f.size() if f.size() else None  # the whole file's
        f.seek(shard.start)
        head = f.read(SNIFF_BYTES)
    lines = head.count(b"\n") + (not head.endswith(b"\n") and len(head) < SNIFF_BYTES and bool(head))
    return lines / len(head) if head else None


def _has_quoted_newlines(shard: Shard) -> bool:
    """Whether the first SNIFF_BYTES of a CSV hold a quoted field that spans lines: then the file
    is read whole (a byte range cannot know whether it starts inside quotes)."""
    fs, path = filesystem(shard.uri)
    with fs.open_input_file(path) as f:
        head = f.read(SNIFF_BYTES)
    head = head[:head.rfind(b"\n") + 1]
    return len(_record_ends(head, quoted=True)) != head.count(b"\n")


def _distinct_names(shards: list[Shard]) -> list[Shard]:
    clashes = sorted(name for name, n in Counter(s.name for s in shards).items() if n > 1)
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


def _read_tables(shard: Shard, cfg: CorpusConfig) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Raw Arrow tables of a shard, in order, each with its rows' positions: row numbers, or
    byte offsets in a line file (what derived ids and error messages name)."""
    if shard.by_bytes:
        yield from _line_tables(shard, cfg)
        return
    if shard.format == "hf":
        dataset = _load_hf(shard.uri, cfg.split).with_format("arrow")
        for start in range(shard.start, shard.stop, READ_ROWS):
            table = dataset[start:min(start + READ_ROWS, shard.stop)]
            yield table, np.arange(start, start + table.num_rows)
        return
    fs, path = filesystem(shard.uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            groups = range(shard.start, shard.stop or pf.metadata.num_row_groups)
            row = sum(pf.metadata.row_group(i).num_rows for i in range(shard.start))
            for batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=groups):
                yield pa.Table.from_batches([batch]), np.arange(row, row + batch.num_rows)
                row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{shard.uri}: cannot read as parquet: {e}") from e


def _line_tables(shard: Shard, cfg: CorpusConfig) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """A line file's byte range, streamed CHUNK_BYTES of whole records at a time."""
    fs, path = filesystem(shard.uri)
    quoted = shard.format in ("csv", "tsv")
    header, start = _csv_header(fs, path, shard) if quoted else (None, shard.start)
    stop = shard.stop if shard.stop is not None else float("inf")
    try:
        with _open_at(fs, path, start) as f:
            for offset, chunk, starts in _record_chunks(f, start, stop, quoted=quoted, split=shard.stop is not None,
                                                        uri=shard.uri):
                table, starts = _parse_chunk(chunk, offset, starts, shard, header, cfg)
                yield table, offset + starts
    except OSError as e:
        raise CorpusError(f"{shard.uri}: cannot read as {shard.format}: {e}") from e


def _open_at(fs: pafs.FileSystem, path: str, start: int):
    if start == 0:
        return fs.open_input_stream(path, compression="detect")
    f = fs.open_input_file(path)
    f.seek(start - 1)  # from the byte before: a range starting right after a newline starts with a record
    return f


def _csv_header(fs: pafs.FileSystem, path: str, shard: Shard) -> tuple[list[str], int]:
    """A CSV's column names, and where the range's reading starts (after the header for the first range)."""
    with _open_at(fs, path, 0) as f:
        _, chunk, starts = next(_record_chunks(f, 0, float("inf"), quoted=True, split=False, uri=shard.uri),
                                (0, b"", [0]))
    end = starts[1] if len(starts) > 1 else len(chunk)
    try:
        names = pacsv.read_csv(pa.BufferReader(chunk[:end]), parse_options=_csv_parse(shard.format)).column_names
    except pa.ArrowInvalid as e:
        raise CorpusError(f"{shard.uri}: cannot read the CSV header: {e}") from e
    return names, max(shard.start, int(end))


def _csv_parse(fmt: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)


def _record_ends(buf: bytes, *, quoted: bool) -> np.ndarray:
    """Positions of the newlines that end a record: every newline, or in a CSV those outside quotes
    (an even count of quote characters before them; an escaped quote is doubled, so it keeps the count even)."""
    raw = np.frombuffer(buf, np.uint8)
    newlines = np.flatnonzero(raw == 10)
    return newlines[np.searchsorted(np.flatnonzero(raw == 34), newlines) % 2 == 0] if quoted else newlines


def _record_chunks(f, start: int, stop: float, *, quoted: bool, split: bool,
                   uri: str) -> Iterator[tuple[int, bytes, np.ndarray]]:
    """(offset, bytes, record starts within them) for the whole records that start in [start, stop)."""
    pos, buf = start, b""
    if start > 0:  # the record running into the range belongs to the range before it
        pos -= 1
        while True:
            data = f.read(CHUNK_BYTES)
            if not data:
                return
            cut = data.find(b"\n")
            if cut >= 0:
                pos, buf = pos + cut + 1, data[cut + 1:]
                break
            pos += len(data)
    eof = False
    while pos < stop and (buf or not eof):
        data = b"" if eof else f.read(CHUNK_BYTES)
        eof, buf = not data, buf + data
        ends = _record_ends(buf, quoted=quoted)
        if split and quoted and len(ends) != buf.count(b"\n"):
            first = int(np.setdiff1d(np.flatnonzero(np.frombuffer(buf, np.uint8) == 10), ends)[0])
            raise CorpusError(f"{uri}: a quoted field spans lines near byte {pos + first}, so this file cannot be read "
                              f"in byte ranges; set corpus.split_bytes: null to read such files whole")
        cut = len(buf) if eof else (int(ends[-1]) + 1 if len(ends) else 0)
        if cut == 0:
            continue
        starts = np.concatenate([[0], ends[ends + 1 < cut] + 1])
        inside = starts < stop - pos
        if not inside.all():
            cut, starts, eof = int(starts[~inside][0]), starts[inside], True
        if len(starts) and cut:
            yield pos, buf[:cut], starts
        pos, buf = pos + cut, buf[cut:]
        if eof and not inside.all():
            return


def _parse_chunk(chunk: bytes, offset: int, starts: np.ndarray, shard: Shard, header: list[str] | None,
                 cfg: CorpusConfig) -> tuple[pa.Table, np.ndarray]:
    """Whole records -> (table, starts of the records that became rows). JSON Lines skips blank
    lines and CSV empty ones, as pyarrow's readers do."""
    where, fmt = f"{shard.uri}: bytes {offset}-{offset + len(chunk)}", shard.format
    try:
        if fmt == "text":
            return pa.table({"text": _text_lines(chunk, starts, offset, shard.uri)}), starts
        block = pa.BufferReader(chunk)
        if fmt == "jsonl":
            table = pajson.read_json(block, read_options=pajson.ReadOptions(use_threads=False,
                                                                              block_size=len(chunk) + 1))
            starts = _non_blank(chunk, starts, b" \t\r\n")
        else:
            # ids and texts stay strings even when they look like numbers
            strings = pacsv.ConvertOptions(column_types={c: pa.string() for c in (cfg.text_column, cfg.id_column) if c})
            table = pacsv.read_csv(block, read_options=pacsv.ReadOptions(column_names=header, use_threads=False,
                                                                            block_size=len(chunk) + 1),
                                   parse_options=_csv_parse(fmt), convert_options=strings)
            starts = _non_blank(chunk, starts, b"\r\n")
    except pa.ArrowInvalid as e:
        raise CorpusError(f"{where}: cannot read as {fmt}: {e}") from e
    if table.num_rows != len(starts):
        raise CorpusError(f"{where}: {len(starts)} records gave {table.num_rows} {fmt} rows")
    return table, starts


def _non_blank(chunk: bytes, starts: np.ndarray, blank: bytes) -> np.ndarray:
    """The starts of records holding a byte other than those in ``blank``: one bool per byte (not the
    positions of every filled byte, 8 bytes each, which made an 8 MiB chunk cost ~200 MiB)."""
    filled = ~np.isin(np.frombuffer(chunk, np.uint8), np.frombuffer(blank, np.uint8))
    return starts[np.logical_or.reduceat(filled, starts)]


def _text_lines(chunk: bytes, starts: np.ndarray, offset: int, uri: str) -> pa.Array:
    ends = np.append(starts[1:], len(chunk))
    lines = pa.array([chunk[a:b].rstrip(b"\r\n") for a, b in zip(starts.tolist(), ends.tolist())], pa.binary())
    try:
        return lines.cast(pa.string())
    except pa.ArrowInvalid:
        for a, line in zip(starts.tolist(), lines.to_pylist()):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{uri}: the line at byte {offset + a} is not valid UTF-8 ({e.reason} at byte "
                                  f"{e.start} of the line)") from None
        raise


def read_shard(shard: Shard, cfg: CorpusConfig, label_to_index: dict[str, int] | None,
               task_labels: dict[str, dict[str, int]] | None = None) -> Iterator[pa.Table]:
    """Yield checked rows of ``shard`` with columns ``ROW_SCHEMA``, then ``label_<task>`` per task_labels.

    label_to_index: gold label name -> index in the teacher's label order.
    task_labels: task -> its label_to_index, for the gold columns in cfg.task_label_columns.
    """
    text_col = "text" if shard.format == "text" else cfg.text_column
    emitted = 0
    seen_ids: dict[str, int] = {}  # id -> position of its first row, to name both rows of a duplicate
    for table, positions in _read_tables(shard, cfg):
        if cfg.limit is not None:
            table, positions = table.slice(0, max(0, cfg.limit - emitted)), positions[:max(0, cfg.limit - emitted)]
        if table.num_rows == 0:
            continue
        yield _check_rows(table, shard, cfg, text_col, positions, label_to_index, seen_ids, task_labels or {})
        emitted += table.num_rows
        if cfg.limit is not None and emitted >= cfg.limit:
            return


def _missing_column(shard: Shard, table: pa.Table, column: str, field_name: str) -> CorpusError:
    return CorpusError(f"{shard.uri}: has no column {column!r} (corpus.{field_name}); "
                       f"its columns are {table.column_names}")


def _where(shard: Shard, position: int) -> str:
    return f"the row at byte {position}" if shard.by_bytes else f"row {position}"


def _check_rows(table: pa.Table, shard: Shard, cfg: CorpusConfig, text_col: str, positions: np.ndarray,
                label_to_index: dict[str, int] | None, seen_ids: dict[str, int],
                task_labels: dict[str, dict[str, int]]) -> pa.Table:
    """The rows of one Arrow batch as ``ROW_SCHEMA`` (plus ``label_<task>`` columns), bad rows marked."""
    if text_col not in table.column_names:
        raise _missing_column(shard, table, text_col, "text_column")
    texts = table.column(text_col)
    if pa.types.is_null(texts.type):
        texts = texts.cast(pa.string())
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise CorpusError(f"{shard.uri}: column {text_col!r} (corpus.text_column) holds {texts.type}, not text")
    ids = _row_ids(table, shard, cfg, positions, seen_ids)
    texts, reasons = _texts(texts, cfg)
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
                    f"{shard.uri}: {_where(shard, positions[i])} (id {ids[i].as_py()!r}) has {reason} in column "
                    f"{bad_column[i]!r}; fix the row or set corpus.bad_rows=skip to set such rows aside under _rejected/"
                )
    rows = pa.table([ids, texts, pa.array(gold_idx.pop("label"), pa.int32()), pa.array(reasons, pa.string())],
                    schema=ROW_SCHEMA)
    for out, values in gold_idx.items():
        rows = rows.append_column(pa.field(out, pa.int32()), pa.array(values, pa.int32()))
    return rows


def _row_ids(table: pa.Table, shard: Shard, cfg: CorpusConfig, positions: np.ndarray,
             seen_ids: dict[str, int]) -> pa.Array:
    """corpus.id_column's ids, checked non-null and unique in the shard; else derived from each row's
    place in its file: '<file>:<row>' (Parquet, datasets) or '<file>@<byte offset>' (line files)."""
    if not cfg.id_column:
        prefix = f"{shard.name}@" if shard.by_bytes else f"{shard.name}:"
        return pc.binary_join_element_wise(prefix, pa.array(positions).cast(pa.string()), "")
    if cfg.id_column not in table.column_names:
        raise _missing_column(shard, table, cfg.id_column, "id_column")
    ids = pc.cast(table.column(cfg.id_column), pa.string()).combine_chunks()
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise CorpusError(f"{shard.uri}: {_where(shard, positions[row])} has a null id in column {cfg.id_column!r}")
    for position, row_id in zip(positions.tolist(), ids.to_pylist()):
        first = seen_ids.setdefault(row_id, position)
        if first != position:
            what = "the rows at bytes" if shard.by_bytes else "rows"
            raise CorpusError(f"{shard.uri}: {what} {first} and {position} have the same id {row_id!r} in column "
                              f"{cfg.id_column!r} (corpus.id_column); ids must be unique")
    return ids


def _texts(texts: pa.ChunkedArray, cfg: CorpusConfig) -> tuple[pa.Array, list[str | None]]:
    """The texts (normalised if asked) and why each bad one is bad (None for good ones)."""
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    lengths = pc.utf8_length(texts)
    reasons: list[str | None] = [None] * len(texts)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)
    bad = pc.or_kleene(pc.or_kleene(pc.is_null(texts), blank), pc.greater(lengths, cfg.max_text_chars))
    for i in np.flatnonzero(bad.to_numpy(zero_copy_only=False)):
        if not texts[i].is_valid:
            reasons[i] = "null text"
        elif blank[i].as_py():
            reasons[i] = "empty text"
        else:
            reasons[i] = (f"a text of {lengths[i].as_py():,} characters (over corpus.max_text_chars="
                          f"{cfg.max_text_chars:,})")
    if cfg.normalize:
        texts = pa.array([normalize_post(t) if t is not None and r is None else t
                          for t, r in zip(texts.to_pylist(), reasons)], pa.string())
    return texts, reasons


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
    if cfg.label_names and (isinstance(raw, (int, float)) or (isinstance(raw, str) and raw.lstrip("-").isdigit())):
        i = int(raw)
        return cfg.label_names[i] if 0 <= i < len(cfg.label_names) else None
    return str(raw)
