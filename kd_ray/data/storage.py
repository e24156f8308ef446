"""Paths that work the same on a laptop and on a cluster."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an s3:// / gs:// / hdfs:// URI.

    Local paths come back absolute: Ray workers run in other working directories.
    """
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def absolute_if_local(path: str | None) -> str | None:
    """A model or data path made absolute when it exists here; hub ids and URIs pass unchanged."""
    if path is None or "://" in path or not os.path.exists(os.path.expanduser(path)):
        return path
    return os.path.abspath(os.path.expanduser(path))
