"""The console: kd-ray's own lines for the person running it; everything else in a log file.

``kd-ray <stage>`` is quiet by default: Ray's, Ray Data's and the libraries' output, and every
worker's, goes to a log file (``quiet``); the console shows kd-ray's lines: stages starting and
ending, progress, the result, and, on failure, the error and where the log is. Progress that Ray
workers print (training steps, files written) reaches the driver through Ray's log forwarding,
so it shows under `ray job submit` too. ``--verbose`` or ``KD_RAY_VERBOSE=1`` keeps everything
on the console, as Ray prints it. Library calls (``run_distill`` ...) print as plain ``print``.
"""

from __future__ import annotations

import io
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

VERBOSE_ENV = "KD_RAY_VERBOSE"
# A line a worker printed, as the driver receives it: Ray's "(ActorName pid=123) " prefix, maybe coloured, maybe
# after the cursor moves of a progress bar
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FORWARDED = re.compile(r"^(?:\([^)]*pid=\d+[^)]*\))?\s*(kd-ray \S+: .*)$")
_streams: tuple[TextIO, TextIO, TextIO] | None = None  # (console out, console err, log) while quiet


def say(text: str, *, err: bool = False) -> None:
    """Print one of kd-ray's own lines (or a table), to stderr with ``err``: on the console, and in the log
    while quiet."""
    if _streams is None:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
        return
    for stream in (_streams[1 if err else 0], _streams[2]):
        stream.write(text + "\n")
        stream.flush()


class _Tee(io.TextIOBase):
    """sys.stdout/sys.stderr while quiet: all text to the log; kd-ray's forwarded lines also to the console."""

    def __init__(self, log: TextIO, console: TextIO):
        self.log, self.console, self.pending, self.last = log, console, "", None

    def write(self, text: str) -> int:
        self.log.write(text)
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            match = _FORWARDED.match(_ANSI.sub("", line.split("\r")[-1]))
            if match and match.group(1) != self.last:  # Ray may hand the driver a worker's line twice
                self.last = match.group(1)
                self.console.write(self.last + "\n")
                self.console.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False


def log_path(output: str, stage: str) -> Path:
    """Where a stage's log goes: in the run folder for `kd-ray run`; beside a stage's output folder (which
    the stage replaces or checks) otherwise; in the working directory for an output on s3:// or gs://."""
    if "://" in output:
        return Path(f"kd-ray-{stage}.log").resolve()
    out = Path(output).resolve()
    return out / "kd-ray.log" if stage == "run" else out.with_name(f"{out.name}.kd-ray-{stage}.log")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextmanager
def quiet(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2 too: Ray's and native libraries'
    writes) to ``path``; kd-ray's lines still reach the console."""
    global _streams
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # Ray would batch alike progress lines, numbers aside
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(path, "a", buffering=1, encoding="utf-8")
    console = [os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8") for fd in saved]
    streams = sys.stdout, sys.stderr
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = _Tee(log, console[0])
    _streams = console[0], console[1], log
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = streams
        _streams = None
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for stream in (*console, log):
            stream.close()
