"""Split the US airline tweets (Twitter US Airline Sentiment, Figure Eight / Kaggle) for kd-ray runs.

    python jobs/prepare_airline.py --csv Tweets.csv --out data/airline

Reads ``text``, ``airline_sentiment`` (3 classes, every row) and ``negativereason`` (10 classes,
only on negative tweets) and writes to ``--out``:

    labeled.csv      id, text, sentiment, reason   25 %: fine-tunes the teachers
    transfer.csv     id, text                      55 %: gold hidden; the teachers label it
    validation.csv   id, text, sentiment, reason   10 %: epoch scores and tuning
    test.csv         id, text, sentiment, reason   10 %: the final table only
    manifest.json    counts and the file's sha256

``reason`` is empty where the tweet has none. Texts are normalised first (@user, http: what
kd-ray's corpus.normalize does), and a text that occurs more than once is dropped entirely (a
text with two labels would be guessed), so no text is in two splits. Splits are stratified by
sentiment with seed 0. ``tweet_id`` is not used: a spreadsheet mangled it (``5.70306E+17``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from kd_ray.data.normalize import normalize_post  # noqa: E402

SENTIMENTS = ["negative", "neutral", "positive"]
REASONS = ["Bad Flight", "Can't Tell", "Cancelled Flight", "Customer Service Issue", "Damaged Luggage",
           "Flight Attendant Complaints", "Flight Booking Problems", "Late Flight", "Lost Luggage", "longlines"]
FRACTIONS = {"labeled": 0.25, "transfer": 0.55, "validation": 0.10, "test": 0.10}


def airline_splits(csv_path: str | Path, seed: int = 0) -> dict[str, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    raw = pd.read_csv(csv_path, keep_default_na=False)
    missing = {"text", "airline_sentiment", "negativereason"} - set(raw.columns)
    if missing:
        raise SystemExit(f"{csv_path}: no column(s) {sorted(missing)}; expected the Kaggle Tweets.csv")
    frame = pd.DataFrame({"text": raw["text"].map(normalize_post), "sentiment": raw["airline_sentiment"],
                          "reason": raw["negativereason"]})
    frame = frame[frame["text"].str.len() > 0].drop_duplicates("text", keep=False)
    rest, test = train_test_split(frame, test_size=FRACTIONS["test"], stratify=frame["sentiment"], random_state=seed)
    rest, validation = train_test_split(rest, test_size=FRACTIONS["validation"] / (1 - FRACTIONS["test"]),
                                        stratify=rest["sentiment"], random_state=seed)
    labeled, transfer = train_test_split(rest, test_size=FRACTIONS["transfer"] / (FRACTIONS["labeled"] + FRACTIONS["transfer"]),
                                         stratify=rest["sentiment"], random_state=seed)
    splits = {"labeled": labeled, "transfer": transfer, "validation": validation, "test": test}
    return {name: split.reset_index(drop=True).assign(id=lambda f, n=name: [f"{n}-{i}" for i in range(len(f))])
            for name, split in splits.items()}


def write_splits(csv_path: str | Path, out: str | Path, seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, frame in airline_splits(csv_path, seed).items():
        columns = ["id", "text"] if name == "transfer" else ["id", "text", "sentiment", "reason"]
        frame[columns].to_csv(out / f"{name}.csv", index=False)
        counts[name] = {"rows": len(frame), "with_reason": int((frame["reason"] != "").sum())}
    manifest = {"source": str(csv_path), "sha256": hashlib.sha256(Path(csv_path).read_bytes()).hexdigest(),
                "seed": seed, "fractions": FRACTIONS, "splits": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True, help="Tweets.csv of Twitter US Airline Sentiment")
    parser.add_argument("--out", default="data/airline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = write_splits(args.csv, args.out, args.seed)
    print(json.dumps(manifest["splits"]), "->", args.out)


if __name__ == "__main__":
    main()
