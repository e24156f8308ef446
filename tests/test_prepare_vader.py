"""jobs/prepare_vader.py: parsing quirks, label boundaries, dedupe, split, and a full build from a synthetic sdist."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_vader", REPO / "jobs" / "prepare_vader.py")
pv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pv)

FRACTIONS = {"train": 0.2, "validation": 0.1, "test": 0.15}


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ground_truth(source: str, n: int = 40) -> bytes:
    """n rows rated -3.9..+3.9, CRLF, no final newline, as in the real files."""
    lines = [f"{i}\t{-3.9 + 7.8 * i / (n - 1):.3f}\t{source} says thing {i}" for i in range(1, n + 1)]
    return "\r\n".join(lines).encode()


def make_sdist(path: Path) -> Path:
    """A vaderSentiment-3.3.2.tar.gz shaped archive: sdist -> nested hutto tarball -> 4 ground-truth files."""
    files = {name: ground_truth(source) for source, name in pv.SOURCES.items()}
    # quirks: a blank line, a tab inside the text, a cp1252 byte, a padded duplicate, a cross-source duplicate
    files[pv.SOURCES["tweets"]] += b"\r\n\r\n900\t1.5\tcaf\xe9\tand tab\r\n901\t2.0\t  tweets says thing 1  "
    files[pv.SOURCES["amazon"]] += b"\r\n9_1\t-2.0\ttweets says thing 2"
    nested = _tar_bytes({f"hutto_ICWSM_2014/{name}": data for name, data in files.items()})
    path.write_bytes(_tar_bytes({"vaderSentiment-3.3.2/setup.py": b"", f"vaderSentiment-3.3.2/{pv.NESTED}": nested}))
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def pool(n: int = 1000) -> list[dict]:
    sources, labels = list(pv.SOURCES), pv.LABELS
    return [{"id": f"s-{i}", "text": f"t{i}", "source": sources[i % 4], "label": labels[i * 7 % 3], "rating": 0.0}
            for i in range(n)]


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_label_boundaries(threshold):
    eps = 1e-9
    assert pv.label_for(-threshold, threshold) == "negative"
    assert pv.label_for(-threshold + eps, threshold) == "neutral"
    assert pv.label_for(0.0, threshold) == "neutral"
    assert pv.label_for(threshold - eps, threshold) == "neutral"
    assert pv.label_for(threshold, threshold) == "positive"
    assert pv.label_for(-4.0, threshold) == "negative" and pv.label_for(4.0, threshold) == "positive"


def test_parse_handles_crlf_blank_lines_tabs_and_cp1252():
    data = b"1\t0.5\thello\r\n\r\n2\t-1\tcaf\xe9\tbar \r\nbroken line\r\n5\t1.0\t  \r\n3_4\t2.25\t  padded  "
    stats = Counter()
    rows = pv.parse_ground_truth(data, "amazon", stats)
    assert [r["id"] for r in rows] == ["amazon-1", "amazon-2", "amazon-3_4"]
    assert [r["text"] for r in rows] == ["hello", "café\tbar", "padded"]
    assert [r["rating"] for r in rows] == [0.5, -1.0, 2.25]
    assert stats == Counter(blank_lines=1, decode_fallback=1, extra_tabs=1, malformed_lines=2)


def test_parse_rejects_repeated_ids():
    with pytest.raises(ValueError, match="'7' occurs twice"):
        pv.parse_ground_truth(b"7\t1\ta\r\n7\t2\tb", "tweets", Counter())


def test_dedupe_keeps_first_and_is_case_sensitive():
    rows = [{"text": t, "id": i} for i, t in enumerate(["a", "A", "a", "b", "A"])]
    assert [r["id"] for r in pv.dedupe(rows)] == [0, 1, 3]


def test_split_is_deterministic_disjoint_and_sized():
    rows = pool()
    first, again = pv.split_rows(pool(), FRACTIONS, seed=0), pv.split_rows(pool(), FRACTIONS, seed=0)
    assert {k: [r["id"] for r in v] for k, v in first.items()} == {k: [r["id"] for r in v] for k, v in again.items()}
    assert [r["id"] for r in pv.split_rows(pool(), FRACTIONS, seed=1)["train"]] != [r["id"] for r in first["train"]]
    ids = [r["id"] for split in first.values() for r in split]
    assert len(ids) == len(set(ids)) == len(rows)
    assert {k: len(v) for k, v in first.items()} == {"train": 200, "validation": 100, "test": 150, "transfer": 550}
    for name, split in first.items():  # each stratum gets its share, within rounding
        share = FRACTIONS.get(name, 0.55)
        for key, n in Counter((r["source"], r["label"]) for r in rows).items():
            got = sum((r["source"], r["label"]) == key for r in split)
            assert abs(got - share * n) <= 1.5, (name, key, got, share * n)


def test_build_from_synthetic_sdist(tmp_path, capsys):
    sdist = make_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    out = tmp_path / "vader"
    assert pv.main(["--out", str(out), "--sdist", str(sdist)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(pv.FILES + ["manifest.json"])
    splits = {name: read_csv(out / f"{name}.csv") for name in ("train", "validation", "test", "transfer_gold")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 32, "validation": 16, "test": 24, "transfer_gold": 89}
    transfer = read_csv(out / "transfer.csv")
    assert list(transfer[0]) == ["id", "text", "source"]
    assert [r["id"] for r in transfer] == [r["id"] for r in splits["transfer_gold"]]
    rows = [r for split in splits.values() for r in split]
    assert list(rows[0]) == pv.COLUMNS
    assert len({r["id"] for r in rows}) == len({r["text"] for r in rows}) == len(rows) == 161  # 4*40 + 3 - 2 dups
    assert {r["label"] for r in rows} == set(pv.LABELS) and {r["source"] for r in rows} == set(pv.SOURCES)
    assert next(r for r in rows if r["id"] == "tweets-900")["text"] == "café\tand tab"
    assert all(pv.label_for(float(r["rating"]), 1.0) == r["label"] for r in rows)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["read"] == {"rows": 163, "blank_lines": 1, "decode_fallback": 1, "duplicates_removed": 2,
                                "malformed_lines": 0,
                                "extra_tabs": 1}
    assert manifest["splits"]["train"]["rows"] == 32 and "Hutto" in manifest["citation"]
    assert len(manifest["sdist_sha256"]) == 64 and manifest["settings"]["threshold"] == 1.0

    capsys.readouterr()
    assert pv.main(["--out", str(out), "--sdist", str(sdist)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert pv.main(["--out", str(out), "--sdist", str(sdist), "--max-rows", "100", "--max-transfer", "20"]) == 0
    assert len(read_csv(out / "transfer.csv")) == 20 and len(read_csv(out / "train.csv")) == 20
    assert json.loads((out / "manifest.json").read_text())["read"]["transfer_dropped"] == 35


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit) as exc:
        pv.parse_args(["--out", "x", "--fractions", "train=0.9,validation=0.2,test=0.1", "--sources", "tweets,imdb"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--fractions" in err and "--sources" in err


def test_failed_download_explains_pypi_and_sdist(tmp_path, monkeypatch):
    monkeypatch.setattr(pv.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(SystemExit, match=r"(?s)PyPI must be reachable.*--sdist PATH"):
        pv.fetch_sdist(tmp_path)


def _real_sdist() -> Path | None:
    for path in (os.environ.get("KD_RAY_VADER_SDIST"), REPO / "data" / "cache" / pv.SDIST_NAME):
        if path and Path(path).is_file():
            return Path(path)
    return None


@pytest.mark.skipif(_real_sdist() is None, reason=f"set KD_RAY_VADER_SDIST or put {pv.SDIST_NAME} in data/cache/")
def test_build_from_real_sdist(tmp_path):
    out = tmp_path / "vader"
    assert pv.main(["--out", str(out), "--sdist", str(_real_sdist())]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["read"]["rows"] == 4200 + 3708 + 5190 + 10605
    assert manifest["pool"]["source"] == {"amazon": 3697, "movies": 10603, "nyt": 5119, "tweets": 4200}
    assert sum(s["rows"] for s in manifest["splits"].values()) == manifest["pool"]["rows"] == 23619
