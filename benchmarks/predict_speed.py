"""`kd-ray predict` against a plain onnxruntime loop over the same posts and threads, and a kill midway (CPU).

    python benchmarks/predict_speed.py --model runs/demo/student_onnx/model.int8.onnx --max-length 64 \
        --texts ../shared/data/airline_tweets/Tweets.csv --rows 1000000 --work runs/predict-speed \
        --out benchmarks/results/predict-speed-2026-12-08.json

Steps, each recorded in --out as it finishes (a rerun skips the finished ones: the benchmark resumes):

  corpus    one JSON Lines file of --rows posts (the CSV's tweets, normalised, cycled; ids t0, t1, ...)
  plain     a plain onnxruntime loop: read the file with pyarrow, batches of --batch-size posts in file order,
            the fast tokenizer, session.run with every core's threads, softmax and argmax, one Parquet file
  predict   `kd-ray predict` of the same file with its defaults (a local Ray instance, one single-threaded actor
            per core), timed from the command's start to its end (Ray's start included) and from its manifest
  agree     the two outputs' labels joined on id
  kill      `kd-ray predict` into a new folder, SIGKILLed (its whole process group) once about half the rows are
            committed, then the same command again: every id once, and what the rerun kept

Both runs use the same model file, max length and cores, one after the other, with nothing else running; the load
average is recorded. Ratios are kd-ray's rows/s over the plain loop's in the same run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kd_ray.data.normalize import normalize_post
from kd_ray.data.soft_labels import MANIFEST
from kd_ray.models.multitask import task_predictions
from kd_ray.stages.predict import predictions_info


def write_corpus(source: Path, rows: int, path: Path) -> dict:
    with source.open(newline="", encoding="utf-8") as f:
        texts = [normalize_post(r["text"]) for r in csv.DictReader(f) if r["text"].strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            out.write(json.dumps({"id": f"t{i}", "text": texts[i % len(texts)]}) + "\n")
    return {"rows": rows, "distinct_texts": len(texts), "bytes": path.stat().st_size, "source": str(source)}


def plain_loop(model: Path, corpus: Path, output: Path, *, max_length: int, batch_size: int, task: str) -> dict:
    """What a user writes without kd-ray: the whole file read, batches in file order, one session."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    start = time.perf_counter()
    table = pajson.read_json(corpus)
    ids, texts = table.column("id"), table.column("text").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(model.parent)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    tasks = predictions_info(str(model), task).tasks
    logits = []
    for s in range(0, len(texts), batch_size):
        batch = tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="np")
        logits.append(session.run(["logits"], {k: v for k, v in batch.items() if k in inputs})[0])
    columns = {"id": ids}
    for name, (index, probs) in task_predictions(np.concatenate(logits), tasks).items():
        columns[f"{name}_label"] = pa.array(np.asarray(tasks[name], dtype=object)[index], pa.string())
        columns[f"{name}_probs"] = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1])
    output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), output, compression="zstd")
    seconds = time.perf_counter() - start
    return {"rows": len(texts), "seconds": seconds, "rows_per_s": len(texts) / seconds,
            "threads": os.cpu_count(), "batch_size": batch_size}


def predict_command(model: Path, corpus: Path, output: Path, max_length: int, task: str) -> list[str]:
    return [str(Path(sys.executable).with_name("kd-ray")), "predict", "--model", str(model), "--task", task,
            "--max_length", str(max_length), "--corpus.path", str(corpus), "--corpus.id_column", "id",
            "--output.path", str(output)]


def run_predict(command: list[str], output: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"kd-ray predict failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    manifest = json.loads((output / MANIFEST).read_text())
    return {"rows": manifest["rows"], "seconds": seconds, "rows_per_s": manifest["rows"] / seconds,
            "manifest_seconds": manifest["seconds"], "manifest_rows_per_s": manifest["rows_per_s"],
            "files": len(manifest["files"]), "console": done.stdout.strip().splitlines()[-1]}


def committed_rows(output: Path) -> int:
    rows = 0
    for p in output.glob("part-*.parquet"):
        try:
            rows += pq.read_metadata(p).num_rows
        except (OSError, pa.ArrowInvalid):
            pass
    return rows


def kill_and_rerun(command: list[str], output: Path, rows: int) -> dict:
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    start = time.perf_counter()
    while committed_rows(output) < rows // 2 and first.poll() is None:
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = committed_rows(output)
    time.sleep(5)  # the local Ray instance's processes end with their driver
    second = run_predict(command, output)
    ids = pa.concat_tables(pq.read_table(p, columns=["id"]) for p in sorted(output.glob("part-*.parquet")))["id"]
    return {"killed_after_s": time.perf_counter() - start - second["seconds"], "committed_when_killed": killed_at,
            "rerun": second, "ids": len(ids), "distinct_ids": pc.count_distinct(ids).as_py()}


def agreement(plain: Path, predicted: Path, task: str) -> dict:
    a = pq.read_table(plain, columns=["id", f"{task}_label"])
    b = pa.concat_tables(pq.read_table(p, columns=["id", f"{task}_label"]) for p in sorted(predicted.glob("part-*")))
    joined = a.join(b, "id", right_suffix="_kd")
    same = pc.sum(pc.equal(joined[f"{task}_label"], joined[f"{task}_label_kd"])).as_py()
    return {"rows": joined.num_rows, "same_label": same, "agreement": same / joined.num_rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--texts", type=Path, default=Path("../shared/data/airline_tweets/Tweets.csv"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("runs/predict-speed"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", default="corpus,plain,predict,agree,kill")
    args = parser.parse_args()

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("config", {**{k: str(v) for k, v in vars(args).items()}, "cpu": platform.processor(),
                                  "cores": os.cpu_count(), "date": datetime.date.today().isoformat()})
    corpus = args.work / "corpus" / "posts.jsonl"
    command = predict_command(args.model, corpus, args.work / "predict", args.max_length, args.task)
    steps = {
        "corpus": lambda: write_corpus(args.texts, args.rows, corpus),
        "plain": lambda: plain_loop(args.model, corpus, args.work / "plain" / "predictions.parquet",
                                    max_length=args.max_length, batch_size=args.batch_size, task=args.task),
        "predict": lambda: run_predict(command, args.work / "predict"),
        "agree": lambda: agreement(args.work / "plain" / "predictions.parquet", args.work / "predict", args.task),
        "kill": lambda: kill_and_rerun(predict_command(args.model, corpus, args.work / "predict-kill",
                                                       args.max_length, args.task), args.work / "predict-kill",
                                       args.rows),
    }
    for name in args.steps.split(","):
        if name in results:
            print(f"{name}: done before, skipped")
            continue
        load = os.getloadavg()[0]
        print(f"{name}: running (load {load:.2f})", flush=True)
        results[name] = {**steps[name](), "load_before": load, "load_after": os.getloadavg()[0]}
        print(f"{name}: {json.dumps(results[name])[:400]}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    if "plain" in results and "predict" in results:
        results["ratio_predict_over_plain"] = results["predict"]["rows_per_s"] / results["plain"]["rows_per_s"]
        args.out.write_text(json.dumps(results, indent=2))
        print(f"kd-ray predict / plain loop: {results['ratio_predict_over_plain']:.3f}x rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
