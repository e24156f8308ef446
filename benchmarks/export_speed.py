"""A student served from `kd-ray export`'s files against PyTorch, on real tweets (CPU, no Ray).

    python benchmarks/export_speed.py --student runs/demo/student \
        --texts ../shared/data/airline_tweets/Tweets.csv --rows 1000 --repeats 3

Runs `kd-ray export` (optimizer, quantization sweep and, unless --no-trim, the trimmed vocabulary) into --work,
its parity texts the --rows tweets (a seeded sample of the CSV, normalised as the students were trained); the
vocabulary is trimmed to the CSV's other tweets (none equal to a sampled one), or to --trim-corpus (e.g. the soft
labels the student was distilled from). Then times, on those --rows tweets:

  pytorch        the HF student folder, PyTorch fp32
  onnx_fp32      model.onnx (fused by ONNX Runtime's transformer optimizer)
  onnx_int8      model.int8.onnx (the setting the export chose)
  trimmed_int8   trimmed/model.int8.onnx (its own tokenizer)

Throughput: rows/s at batch 64 with all cores' threads, texts sorted by length as kd-ray batches them; latency:
p50/p99 of one text at a time with one thread, over the first --latency-rows texts. Model time only: every model
gets the same tokenized inputs (its own tokenizer's), tokenized before the clock starts. Each figure is the median
of --repeats passes, the models alternating inside each pass; ratios are to PyTorch in the same run. Agreement:
argmax against PyTorch; macro-recall against the CSV's gold labels. If the export refuses a file (its parity
under --min-agreement), the refusal is recorded and the files it wrote are still timed. The load average before
and after is recorded: this 2-core machine is shared. Writes benchmarks/results/export-speed-<date>.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_ray.config import ExportConfig
from kd_ray.data.normalize import normalize_post
from kd_ray.errors import ModelError
from kd_ray.models.metrics import classification_metrics
from kd_ray.stages.export import FILES, REPORT, TRIMMED, cpu_has_vnni, run_export

LABELS = ["negative", "neutral", "positive"]


def sample_tweets(path: Path, rows: int, seed: int, label_column: str) -> tuple[list[str], list[int], list[str]]:
    """``rows`` tweets drawn without replacement (seeded), normalised, their gold label indices, and the texts of the
    other tweets (none equal to a drawn one)."""
    with path.open(newline="", encoding="utf-8") as f:
        records = [(normalize_post(r["text"]), LABELS.index(r[label_column])) for r in csv.DictReader(f)
                   if r["text"].strip()]
    drawn = set(random.Random(seed).sample(range(len(records)), rows))
    picked = [records[i] for i in sorted(drawn)]
    held_out = {t for t, _ in picked}
    rest = [t for i, (t, _) in enumerate(records) if i not in drawn and t not in held_out]
    return [t for t, _ in picked], [g for _, g in picked], rest


def batches(folder: Path, texts: list[str], max_length: int, batch_size: int) -> list[tuple[np.ndarray, dict]]:
    """(row indices, numpy inputs) of ``texts`` through the tokenizer in ``folder``, batches of alike lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    order = np.argsort([len(t) for t in texts], kind="stable")
    groups = [order[s:s + batch_size] for s in range(0, len(texts), batch_size)]
    return [(idx, dict(tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                                 return_tensors="np"))) for idx in groups]


def onnx_runner(file: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda batch: session.run(["logits"], {k: v for k, v in batch.items() if k in names})[0]


def torch_runner(folder: Path, threads: int):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

    def run(batch):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

    return run


def throughput_pass(run, feeds, rows: int) -> tuple[float, np.ndarray]:
    """rows/s of one pass over ``feeds`` (after a warm-up batch) and the logits in text order."""
    run(feeds[0][1])
    start = time.perf_counter()
    outputs = [run(batch) for _, batch in feeds]
    seconds = time.perf_counter() - start
    logits = np.empty((rows, outputs[0].shape[1]), np.float32)
    logits[np.concatenate([idx for idx, _ in feeds])] = np.concatenate(outputs)
    return rows / seconds, logits


def latency_pass(run, feeds) -> tuple[float, float]:
    """p50 and p99 milliseconds of one text at a time."""
    run(feeds[0][1])
    times = []
    for _, batch in feeds:
        start = time.perf_counter()
        run(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def export(args, parity: Path, trim_corpus: str) -> dict:
    """`kd-ray export` as the benchmark configures it: its report, seconds, and the refusal if it refused a file."""
    out = args.work / "export"
    overrides = {"model": args.student, "output": str(out), "parity": {"path": str(parity)},
                 "parity_rows": args.rows, "max_length": args.max_length, "min_agreement": args.min_agreement,
                 "trim_vocab": not args.no_trim}
    if not args.no_trim:
        overrides["trim_corpus"] = {"path": trim_corpus, "normalize": True}
    start, refused = time.perf_counter(), None
    try:
        run_export(ExportConfig.model_validate(overrides))
    except ModelError as e:
        refused = str(e)
    return {"seconds": round(time.perf_counter() - start, 1), "refused": refused, "trim_corpus": overrides.get(
        "trim_corpus"), "report": json.loads((out / REPORT).read_text())}


def models(args, out: Path) -> dict[str, tuple[str, Path, Path]]:
    """name -> (kind, model path, tokenizer folder)."""
    found = {"pytorch": ("torch", Path(args.student), Path(args.student)),
             "onnx_fp32": ("onnx", out / FILES["fp32"], out), "onnx_int8": ("onnx", out / FILES["int8"], out),
             "trimmed_int8": ("onnx", out / TRIMMED / FILES["int8"], out / TRIMMED)}
    return {name: spec for name, spec in found.items() if spec[1].exists()}  # what the export wrote


def measure(args, texts: list[str], gold: list[int]) -> dict:
    out = args.work / "export"
    threads = os.cpu_count() or 1
    specs = models(args, out)
    big = {n: batches(folder, texts, args.max_length, 64) for n, (_, _, folder) in specs.items()}
    one = {n: batches(folder, texts[:args.latency_rows], args.max_length, 1)
           for n, (_, _, folder) in specs.items()}
    runners = {n: (torch_runner if kind == "torch" else onnx_runner)(path, threads) for n, (kind, path, _) in specs.items()}
    single = {n: (torch_runner if kind == "torch" else onnx_runner)(path, 1) for n, (kind, path, _) in specs.items()}
    speed, p50, p99, logits = {n: [] for n in specs}, {n: [] for n in specs}, {n: [] for n in specs}, {}
    for _ in range(args.repeats):  # the models alternate inside each repeat
        for name in specs:
            rows_per_s, logits[name] = throughput_pass(runners[name], big[name], len(texts))
            speed[name].append(rows_per_s)
            a, b = latency_pass(single[name], one[name])
            p50[name].append(a)
            p99[name].append(b)
    results = {}
    for name, (_, path, _) in specs.items():
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
        quality = classification_metrics(logits[name], np.array(gold), LABELS)
        results[name] = {
            "rows_per_s": round(statistics.median(speed[name]), 1), "rows_per_s_runs": [round(s, 1) for s in speed[name]],
            "speedup_vs_pytorch": round(statistics.median(speed[name]) / statistics.median(speed["pytorch"]), 2),
            "latency_ms_p50": round(statistics.median(p50[name]), 3), "latency_ms_p99": round(statistics.median(p99[name]), 3),
            "latency_p50_vs_pytorch": round(statistics.median(p50["pytorch"]) / statistics.median(p50[name]), 2),
            "agreement_with_pytorch": float((logits[name].argmax(1) == logits["pytorch"].argmax(1)).mean()),
            "macro_recall": round(quality["macro_recall"], 4), "size_mb": round(size / 1e6, 2)}
    return results


def machine() -> dict:
    import onnxruntime
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "vnni": cpu_has_vnni(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="HF student folder")
    parser.add_argument("--texts", type=Path, default=Path("../shared/data/airline_tweets/Tweets.csv"))
    parser.add_argument("--label-column", default="airline_sentiment")
    parser.add_argument("--rows", type=int, default=1000, help="tweets timed and checked (the export's parity texts)")
    parser.add_argument("--latency-rows", type=int, default=300, help="texts timed one at a time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--min-agreement", type=float, default=0.99, help="export.min_agreement")
    parser.add_argument("--trim-corpus", help="export.trim_corpus.path (default: the CSV's other tweets)")
    parser.add_argument("--no-trim", action="store_true", help="skip the trimmed vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/export-speed"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.texts.is_file():
        sys.exit(f"needs the real tweets at {args.texts} (../shared/data next to the repository); absent here")
    from transformers import AutoConfig

    labels = AutoConfig.from_pretrained(args.student).id2label
    if [labels[i] for i in range(len(labels))] != LABELS:
        sys.exit(f"{args.student} predicts {labels}; the gold labels here are {LABELS}")
    texts, gold, rest = sample_tweets(args.texts, args.rows, args.seed, args.label_column)
    args.work.mkdir(parents=True, exist_ok=True)
    parity = args.work / "tweets.parquet"  # the sampled tweets, read by the export as its parity texts
    pq.write_table(pa.table({"text": texts}), parity)
    if args.trim_corpus is None:
        pq.write_table(pa.table({"text": rest}), args.work / "other-tweets.parquet")
    load_before = os.getloadavg()
    exported = export(args, parity, args.trim_corpus or str(args.work / "other-tweets.parquet"))
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date": datetime.date.today().isoformat(), "machine": machine(),
               "setup": {"student": args.student, "texts": str(args.texts), "rows": args.rows, "seed": args.seed,
                         "latency_rows": args.latency_rows, "repeats": args.repeats, "max_length": args.max_length,
                         "batch_size": 64, "threads": os.cpu_count()},
               "export": exported, "models": measure(args, texts, gold),
               "load_average": {"before": load_before, "after": os.getloadavg()}}
    out = args.out or Path(__file__).resolve().parent / "results" / f"export-speed-{results['date']}.json"
    out.write_text(json.dumps(results, indent=2))
    for name, r in results["models"].items():
        print(f"{name:13s} {r['rows_per_s']:8.1f} rows/s ({r['speedup_vs_pytorch']:.2f}x)  p50 {r['latency_ms_p50']:.2f} "
              f"ms  p99 {r['latency_ms_p99']:.2f} ms  agreement {r['agreement_with_pytorch']:.2%}  "
              f"macro-recall {r['macro_recall']:.4f}  {r['size_mb']:.1f} MB")
    if exported["refused"]:
        print(f"the export refused: {exported['refused']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
