"""`kd-ray label` (Ray Data, actors, Parquet out) against a plain single-process transformers
loop on the same machine, the same model, texts, batch size, max length and cores.

    python benchmarks/label_throughput.py --texts ../shared/data/airline_tweets/Tweets.csv \
        --model data/models/all-MiniLM-L6-v2 --corpus tweets --rows 50000 --repeats 2 \
        --out benchmarks/results/label-cpu-tweets.json

Corpora (--corpus): 'tweets' repeats the --texts to --rows rows (real post lengths);
'uniform' gives every row the same number of tokens (--tokens; nothing to gain from
sorting, so it measures Ray's overhead); 'mixed' is --long-share rows of ~max-length
tokens among short ones of --tokens (the case bucketing is for).

Both sides are whole commands timed from the outside, each in its own fresh process, A/B
alternating over --repeats (medians reported):
  kd-ray   `kd-ray label --config ...`: starts its own local Ray, reads the corpus Parquet,
           labels with the default actor pool (one single-thread actor per core), writes
           soft-label Parquet and checks it
  plain    `python benchmarks/label_throughput.py plain ...`: reads the same Parquet,
           loops over it in file order with tokenizer(batch, padding=True) and
           torch.set_num_threads(cores), writes the logits as Parquet
Reported: rows/s and real tokens/s of the whole command and of the labeling loop alone
(kd-ray: its summary's seconds; plain: the loop), padding efficiency (real / padded tokens),
and the fraction of this machine's fp32 matmul peak (a 2048^3 matmul on the same threads,
measured before and after the runs; the larger) that the model's useful FLOPs reach (FLOPs of the encoder on the real
tokens only; see teacher_inference.flops_per_sequence).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent

from teacher_inference import flops_per_sequence, matmul_peak, padding_efficiency, read_texts

LABELS = 3


def synthetic_texts(tokenizer, rows: int, tokens: int, long_share: float, long_tokens: int, seed: int) -> list[str]:
    """Texts of whole-word vocabulary entries: each word is one token, so a text of k words has k + 2."""
    rng = np.random.default_rng(seed)
    words = np.array([w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 2])
    sizes = np.where(rng.random(rows) < long_share, long_tokens - 2, tokens - 2)
    return [" ".join(rng.choice(words, size=k)) for k in sizes]


def prepare(args, work: Path) -> tuple[Path, Path, np.ndarray]:
    """The corpus Parquet, a model folder (MiniLM-L6 encoder, random 3-class head) and token lengths."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model_dir = work / "teacher"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=LABELS, id2label={0: "negative", 1: "neutral", 2: "positive"},
            label2id={"negative": 0, "neutral": 1, "positive": 2})
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if args.corpus == "tweets":
        texts = read_texts(args.texts, args.rows)
    else:
        share = args.long_share if args.corpus == "mixed" else 0.0
        texts = synthetic_texts(tokenizer, args.rows, args.tokens, share, args.max_length, seed=0)
    corpus = work / f"corpus-{args.corpus}-{args.rows}.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts}), corpus)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]])
    return corpus, model_dir, lengths


def run_kd_ray(args, work: Path, corpus: Path, model_dir: Path, run: int) -> dict:
    out = work / "kd-ray-out"
    config = {
        "corpus": {"path": str(corpus), "id_column": "id"},
        "teachers": [{"model": str(model_dir), "name": "teacher", "task": "sentiment", "max_length": args.max_length}],
        "compute": {"batch_size": args.batch_size, "block_rows": args.block_rows},
        "output": {"path": str(out), "overwrite": True},
        "ray": {"num_cpus": args.cores},
    }
    cfg_path = work / "label.json"
    cfg_path.write_text(json.dumps(config))
    shutil.rmtree(out, ignore_errors=True)  # outside the timed command
    start = time.perf_counter()
    with open(work / f"kd-ray-{run}.log", "w") as log:
        flags = [part for item in args.set for part in ("--" + item.partition("=")[0], item.partition("=")[2])]
        subprocess.run([str(Path(sys.executable).parent / "kd-ray"), "label", "--config", str(cfg_path), *flags],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"wall_s": wall, "loop_s": manifest["seconds"], "output": str(out)}


def run_plain(args, work: Path, corpus: Path, model_dir: Path, run: int) -> dict:
    out = work / "plain-out.parquet"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "plain", "--corpus-file", str(corpus), "--model", str(model_dir),
                             "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                             "--cores", str(args.cores), "--output", str(out)],
                            check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "loop_s": json.loads(result.stdout.strip().splitlines()[-1])["loop_s"], "output": str(out)}


def plain_main(argv: list[str]) -> None:
    """The baseline: what one writes without kd-ray."""
    parser = argparse.ArgumentParser()
    for flag in ("--corpus-file", "--model", "--output"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--cores", type=int, required=True)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.cores)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    table = pq.read_table(args.corpus_file)
    texts = table.column("text").to_pylist()
    start = time.perf_counter()
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), args.batch_size):
            enc = tokenizer(texts[s:s + args.batch_size], truncation=True, max_length=args.max_length,
                            padding=True, return_tensors="pt")
            out.append(model(**enc).logits.float().numpy())
    loop_s = time.perf_counter() - start
    logits = np.concatenate(out)
    pq.write_table(pa.table({"id": table.column("id"),
                             "logits": pa.FixedSizeListArray.from_arrays(logits.ravel(), logits.shape[1])}),
                   args.output)
    print(json.dumps({"loop_s": loop_s}))


def agreement(kd_ray_out: str, plain_out: str) -> dict:
    """Same rows, same predictions: kd-ray's output joined to the plain loop's by id."""
    kd = pq.read_table(kd_ray_out, columns=["id", "teacher_logits"]).to_pandas().set_index("id")
    plain = pq.read_table(plain_out).to_pandas().set_index("id")
    joined = plain.join(kd, how="outer")
    a, b = np.stack(joined["logits"].to_numpy()), np.stack(joined["teacher_logits"].to_numpy())
    return {"rows_plain": len(plain), "rows_kd_ray": len(kd), "same_ids": bool(set(kd.index) == set(plain.index)),
            "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "max_abs_logit_diff": float(np.abs(a - b).max())}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        return plain_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=Path, help="CSV with a 'text' column, or one text per line (--corpus tweets)")
    parser.add_argument("--model", required=True, help="Encoder folder (MiniLM-L6); a random 3-class head is added")
    parser.add_argument("--corpus", choices=["tweets", "uniform", "mixed"], default="tweets")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--tokens", type=int, default=24, help="tokens per short synthetic row")
    parser.add_argument("--long-share", type=float, default=0.1, help="share of max-length rows ('mixed')")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--block-rows", type=int, default=8192, help="kd-ray's compute.block_rows (its default; "
                        "kd-ray evens the blocks out over its actors, kd_ray.stages.label.balanced_block_rows)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="kd-ray label's config "
                        "overrides, e.g. compute.threads_per_actor=2 (passed as its --KEY VALUE flags)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-label"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.corpus == "tweets" and not args.texts:
        parser.error("--corpus tweets needs --texts")

    import torch
    from transformers import AutoConfig

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus, model_dir, lengths = prepare(args, work)
    torch.set_num_threads(args.cores)
    peaks = [matmul_peak("cpu")[0]]  # measured again after the runs; the larger one is the peak
    useful_flops = float(flops_per_sequence(AutoConfig.from_pretrained(model_dir), lengths).sum())
    runs = {"plain": [], "kd-ray": []}
    for r in range(args.repeats):  # alternate, so that machine noise hits both alike
        for name, fn in (("plain", run_plain), ("kd-ray", run_kd_ray)):
            runs[name].append(fn(args, work, corpus, model_dir, r))
            print(f"repeat {r}: {name:<7} wall {runs[name][-1]['wall_s']:.1f} s, loop {runs[name][-1]['loop_s']:.1f} s",
                  flush=True)
    peaks.append(matmul_peak("cpu")[0])
    peak = max(peaks)
    rows, tokens = len(lengths), float(lengths.sum())
    from kd_ray.stages.label import balanced_block_rows

    block_rows = balanced_block_rows(rows, args.cores, args.block_rows)  # one 1-thread actor per core
    result = {}
    for name, rs in runs.items():
        wall, loop = statistics.median(r["wall_s"] for r in rs), statistics.median(r["loop_s"] for r in rs)
        result[name] = {"wall_s": [r["wall_s"] for r in rs], "loop_s": [r["loop_s"] for r in rs],
                        "rows_per_s": rows / wall, "tokens_per_s": tokens / wall, "loop_rows_per_s": rows / loop,
                        "fraction_of_peak": useful_flops / wall / peak,
                        "padding_efficiency": padding_efficiency(lengths, args.batch_size,
                                                                 block_rows if name == "kd-ray" else None)}
    speedup = result["kd-ray"]["rows_per_s"] / result["plain"]["rows_per_s"]
    report = {"machine": f"{platform.processor() or platform.machine()}, {args.cores} cores", "date": time.strftime("%Y-%m-%d"),
              "corpus": args.corpus, "rows": rows, "mean_tokens": float(lengths.mean()),
              "batch_size": args.batch_size, "block_rows": args.block_rows, "block_rows_balanced": block_rows,
              "max_length": args.max_length,
              "kd_ray_overrides": args.set,
              "matmul_peak_flops": peak, "matmul_peak_before_after": peaks, "useful_flops": useful_flops, "results": result,
              "speedup_kd_ray_vs_plain": speedup,
              "loop_speedup": result["kd-ray"]["loop_rows_per_s"] / result["plain"]["loop_rows_per_s"],
              "check": agreement(runs["kd-ray"][-1]["output"], runs["plain"][-1]["output"]),
              "command": " ".join(sys.argv)}
    print(f"{args.corpus}: {rows} rows, {lengths.mean():.1f} tokens/row, batch {args.batch_size}, "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s on {args.cores} threads")
    print(f"{'':<8}{'rows/s':>9}{'tokens/s':>10}{'loop rows/s':>13}{'pad eff':>9}{'% peak':>8}")
    for name, m in result.items():
        print(f"{name:<8}{m['rows_per_s']:>9.1f}{m['tokens_per_s']:>10.0f}{m['loop_rows_per_s']:>13.1f}"
              f"{m['padding_efficiency']:>9.2f}{100 * m['fraction_of_peak']:>7.1f}%")
    print(f"kd-ray / plain: {speedup:.2f}x whole command, {report['loop_speedup']:.2f}x labeling loop; "
          f"check: {report['check']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
