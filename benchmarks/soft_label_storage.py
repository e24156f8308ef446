"""Bytes per row of a soft-label folder, column by column, for each logits dtype kd-ray offers.

    python benchmarks/soft_label_storage.py runs/demo/soft_labels --out benchmarks/results/soft_label_storage.json

Rewrites the folder's rows with kd-ray's own schema and writer (``soft_labels.parquet_writer``:
zstd, logits BYTE_STREAM_SPLIT-encoded) and, for comparison, with pyarrow's default encodings
(dictionary, then plain), for each `output.logits_dtype` (float32, float16), and reads each
column's compressed size from the Parquet footer. The baseline is what the logits would cost raw (classes x 4 bytes)
and as a JSON list in a text column, the plain way to stash them next to a post.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_ray.data.soft_labels import logits_column, parquet_writer, read_soft_label_info, soft_label_schema


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over row groups."""
    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + column.total_compressed_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("soft_labels", help="A soft-label folder written by `kd-ray label`")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    info = read_soft_label_info(args.soft_labels)
    table = pa.concat_tables(pq.read_table(f) for f in info.files)
    rows = table.num_rows
    teacher = info.teacher()
    classes = len(teacher["id2label"])
    logits = table.column(logits_column(teacher["name"])).combine_chunks()
    values = logits.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(rows, classes)
    report = {"folder": args.soft_labels, "rows": rows, "classes": classes, "teachers": len(info.teachers),
              "mean_text_bytes": float(np.mean([len(t.encode()) for t in table.column("text").to_pylist()])),
              "raw_float32_bytes_per_row": 4 * classes, "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            schema = soft_label_schema({**info.metadata.stored(), "logits_dtype": dtype})
            rows_in_schema = table.select(schema.names).cast(schema)
            for writer_name, open_writer in (
                    ("kd-ray", lambda path: parquet_writer(path, schema)),
                    ("pyarrow defaults", lambda path: pq.ParquetWriter(path, schema, compression="zstd"))):
                path = Path(tmp) / f"{dtype}-{writer_name}.parquet"
                with open_writer(path) as writer:
                    writer.write_table(rows_in_schema)
                sizes = column_bytes(path)
                back = pq.read_table(path).column(logits_column(teacher["name"])).combine_chunks()
                restored = back.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(rows, classes)
                report["dtypes"][f"{dtype}, {writer_name}"] = {
                    "bytes_per_row": {k: v / rows for k, v in sizes.items()},
                    "beyond_text_bytes_per_row": sum(v for k, v in sizes.items() if k != "text") / rows,
                    "logits_bytes_per_row": sizes[logits_column(teacher["name"])] / rows,
                    "max_abs_logit_error": float(np.abs(restored - values).max()),
                    "argmax_changed": int((restored.argmax(1) != values.argmax(1)).sum()),
                }
        json_path = Path(tmp) / "json.parquet"  # baseline: logits as a JSON string column
        as_json = pa.array([json.dumps(row) for row in values.tolist()])
        pq.write_table(pa.table({"logits_json": as_json}), json_path, compression="zstd")
        report["json_text_column_bytes_per_row"] = column_bytes(json_path)["logits_json"] / rows

    print(f"{args.soft_labels}: {rows} rows, {classes} classes, mean text {report['mean_text_bytes']:.0f} bytes")
    print(f"{'dtype, writer':<28}{'logits B/row':>13}{'all but text B/row':>20}{'max |error|':>13}{'argmax changed':>16}")
    for dtype, m in report["dtypes"].items():
        print(f"{dtype:<28}{m['logits_bytes_per_row']:>13.2f}{m['beyond_text_bytes_per_row']:>20.2f}"
              f"{m['max_abs_logit_error']:>13.2g}{m['argmax_changed']:>16}")
    print(f"baselines: raw float32 {report['raw_float32_bytes_per_row']} B/row; logits as JSON text, zstd: "
          f"{report['json_text_column_bytes_per_row']:.2f} B/row")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
