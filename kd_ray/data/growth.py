"""A corpus that grows: what a finished labeling read, and what a rerun of it must label.

``_manifest.json`` records each input file a labeling read (size, modification time and, for a line
file, a digest of its last bytes) and the shards it was read as. A rerun of the same config compares
today's listing with that record, per file (never per row): a new file is labeled, a line file that
grew by appended records has its new byte range labeled, and a file that shrank, changed in place
or vanished is refused by name. Pure functions of the listing and the record; kd_ray.stages.label acts on them.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kd_ray.config import CorpusConfig
from kd_ray.data.corpus import COMPRESSIONS, LINE_FORMATS, Shard
from kd_ray.data.storage import filesystem
from kd_ray.errors import CorpusError

TAIL_BYTES = 4096  # a line file's last bytes, digested: an append keeps them, an edit near the end does not
TAIL_READERS = 16


def _appendable(shard: Shard) -> bool:
    return shard.format in LINE_FORMATS and not shard.uri.lower().endswith(COMPRESSIONS)


def tail_digest(uri: str, size: int) -> str:
    """sha256 of the file's bytes [size - TAIL_BYTES, size), and whether they end a line ('\\n' last)."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read(min(size, TAIL_BYTES))
    return hashlib.sha256(tail).hexdigest()[:32] + ("|nl" if tail.endswith(b"\n") else "")


def file_records(shards: list[Shard]) -> dict[str, dict]:
    """Per input file (by its name in derived ids): its uri, format, size, modification time and tail digest
    (line files; read by a pool of threads: on object stores each is a request of its own)."""
    first = {}
    for shard in shards:
        if shard.format != "hf":
            first.setdefault(shard.name, shard)
    appendable = [s for s in first.values() if _appendable(s) and s.file_size]
    with ThreadPoolExecutor(max_workers=TAIL_READERS) as pool:
        tails = dict(zip((s.name for s in appendable), pool.map(lambda s: tail_digest(s.uri, s.file_size), appendable)))
    return {name: {"uri": s.uri, "format": s.format, "size": s.file_size, "mtime_ns": s.mtime_ns,
                   "tail": tails.get(name)} for name, s in first.items()}


@dataclass
class Growth:
    """What changed in a corpus since its labeling: the shards to label now, and what to tell the user."""

    shards: list[Shard] = field(default_factory=list)
    new_files: list[str] = field(default_factory=list)
    appended: list[str] = field(default_factory=list)

    def line(self) -> str:
        counts = [(len(self.new_files), "new file{}"), (len(self.appended), "file{} with appended records")]
        return ", ".join(f"{n:,} {what.format('s' * (n != 1))}" for n, what in counts if n)


def corpus_growth(cfg: CorpusConfig, shards: list[Shard], recorded: dict[str, dict], labeled_keys: set[str],
                  output: str) -> Growth:
    """The shards of ``shards`` (today's listing) that the labeling recorded as ``recorded`` (file records)
    and ``labeled_keys`` (shard keys in its part files) did not read. Raises CorpusError naming every file
    that shrank, changed in place or vanished."""
    by_file: dict[str, list[Shard]] = {}
    for shard in shards:
        by_file.setdefault(shard.name, []).append(shard)
    labeled_files = {Shard.file_of(key) for key in labeled_keys}
    problems, growth = [], Growth()
    for name, old in recorded.items():
        shard = by_file.get(name, [None])[0]
        if shard is None:
            problems.append(f"{old['uri']} was labeled but is gone")
        elif (shard.file_size, shard.mtime_ns) == (old["size"], old["mtime_ns"]):
            continue
        elif (shard.file_size or 0) > old["size"] and (old["tail"] or "").endswith("|nl") and _appendable(shard) \
                and tail_digest(shard.uri, old["size"]) == old["tail"]:
            growth.appended.append(name)
            # the new bytes, as shards whose keys differ from every range of the first labeling (all end by old size)
            growth.shards += shard.byte_ranges(old["size"], cfg.split_bytes or shard.file_size - old["size"])
        else:
            how = "shrank" if (shard.file_size or 0) < old["size"] else "changed in place"
            problems.append(f"{shard.uri} {how} since it was labeled ({old['size']:,} bytes then, "
                            f"{shard.file_size or 0:,} now)")
    for name, file_shards in by_file.items():
        if name in recorded:
            continue
        if file_shards[0].format == "hf":  # a dataset is labeled whole: rows it did not have then are a change
            unseen = [s.key for s in file_shards if s.key not in labeled_keys]
            if unseen:
                problems.append(f"{file_shards[0].uri} holds rows {unseen[:3]} that its labeling did not read")
        elif name not in labeled_files:  # (a folder labeled before kd-ray kept a corpus record: the rest is assumed
            growth.new_files.append(name)  # unchanged, as it was then)
            growth.shards += file_shards
    if problems:
        raise CorpusError(f"the corpus of {output} changed since it was labeled:\n  " + "\n  ".join(problems[:20])
                          + "\nRestore the files, or set output.overwrite: true to label the corpus again from scratch "
                            "(on top of a finished folder only new files and records appended to line files are "
                            "labeled)")
    return growth
