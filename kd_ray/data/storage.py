"""Paths that work the same on a laptop and on a cluster."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an s3:// / gs:// / hdfs:// URI.

    Local paths come back absolute: Ray workers run in other working directories.
    """
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    """A JSON file's object; None where there is no readable one."""
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None


def write_json(fs: pafs.FileSystem, path: str, value: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(value, indent=2).encode())


def absolute_if_local(path: str | None) -> str | None:
    """A model or data path made absolute when it exists here; hub ids and URIs pass unchanged."""
    if path is None or "://" in path or not os.path.exists(os.path.expanduser(path)):
        return path
    return os.path.abspath(os.path.expanduser(path))
