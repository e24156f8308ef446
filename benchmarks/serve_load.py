"""`kd-ray serve` under load on loopback, against a single-process onnxruntime HTTP server (CPU).

    python benchmarks/serve_load.py --model runs/demo/student_onnx/model.int8.onnx --max-length 64 \
        --out benchmarks/results/serve-load-2026-12-08.json

Each server answers POST {"text": ...} with each task's label and probabilities:

  plain   one process: Starlette on uvicorn, one onnxruntime session with every core's threads, each request
          tokenized and run as it comes (no batching), the answer built as kd-ray's
  kd-ray  `kd-ray serve` on a local Ray instance (--replicas replicas of --threads threads, dynamic batching up to
          --max-batch-size texts); --variants adds servers of other flags or environment, e.g.
          '{"kd-ray no wait": {"flags": ["--batch_wait_timeout_s", "0"]},
            "kd-ray throughput": {"flags": ["--batch_wait_timeout_s", "0"], "env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}}'

wrk (Debian's package: apt-get install wrk) sends the load from one thread, --concurrency connections each
posting one real tweet after another (the CSV's tweets, normalised, cycled), for --seconds after a --warmup;
requests/s and latency p50/p99 per level, as wrk measures them. The servers run one at a time; --rounds rounds
alternate them and the medians are reported. The load generator shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kd_ray.data.normalize import normalize_post


def plain_app(model: str, max_length: int, task: str):
    """The baseline server's ASGI app."""
    import numpy as np
    import onnxruntime as ort
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from transformers import AutoTokenizer

    from kd_ray.models.multitask import task_predictions
    from kd_ray.stages.predict import predictions_info

    tokenizer = AutoTokenizer.from_pretrained(Path(model).parent)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    tasks = predictions_info(model, task).tasks

    async def classify(request: Request) -> JSONResponse:
        text = (await request.json())["text"]
        batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
        logits = session.run(["logits"], {k: v for k, v in batch.items() if k in inputs})[0]
        answer = {}
        for name, (index, probs) in task_predictions(np.asarray(logits), tasks).items():
            answer[f"{name}_label"], answer[f"{name}_probs"] = tasks[name][int(index[0])], probs[0].tolist()
        return JSONResponse({"predictions": [answer], "labels": tasks})

    return Starlette(routes=[Route("/", classify, methods=["POST"])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    body = json.dumps({"text": "warming up"}).encode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}):\n{process.stdout.read()[-3000:]}")
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer in {timeout} s")


def start(server: str, args, port: int) -> subprocess.Popen:
    variant = args.variants.get(server, {})
    if server == "plain":
        command = [sys.executable, __file__, "--serve-plain", "--model", str(args.model), "--max-length",
                   str(args.max_length), "--task", args.task, "--port", str(port)]
    else:
        command = [str(Path(sys.executable).with_name("kd-ray")), "serve", "--model", str(args.model),
                   "--task", args.task, "--max_length", str(args.max_length), "--port", str(port),
                   "--replicas", str(args.replicas), "--threads_per_replica", str(args.threads),
                   "--num_cpus_per_replica", str(args.threads), "--max_batch_size", str(args.max_batch_size),
                   "--output", str(args.work / "serve"), *variant.get("flags", [])]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **variant.get("env", {})})


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def lua_script(texts: list[str], path: Path) -> Path:
    bodies = ",\n".join(json.dumps(json.dumps({"text": t})) for t in texts)
    path.write_text(f"""bodies = {{{bodies}}}
i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
""")
    return path


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "30s",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout

    def latency(p: str) -> float:
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M).groups()
        return float(value) * UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": latency("50"), "p99_ms": latency("99"), "non_2xx": int(errors.group(1)) if errors else 0,
            "requests": int(re.search(r"(\d+) requests in", out).group(1))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--texts", type=Path, default=Path("../shared/data/airline_tweets/Tweets.csv"))
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--variants", type=json.loads, default={}, help="more kd-ray servers: name -> flags, env")
    parser.add_argument("--work", type=Path, default=Path("runs/serve-load"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve-plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_plain:
        import uvicorn

        uvicorn.run(plain_app(str(args.model), args.max_length, args.task), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return 0
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk: apt-get install wrk")

    with args.texts.open(newline="", encoding="utf-8") as f:
        texts = [normalize_post(r["text"]) for r in csv.DictReader(f) if r["text"].strip()][:2000]
    args.work.mkdir(parents=True, exist_ok=True)
    script = lua_script(texts, Path(tempfile.mkdtemp()) / "posts.lua")
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = ["plain", "kd-ray", *args.variants]
    runs: dict[str, dict[int, list[dict]]] = {server: {c: [] for c in levels} for server in servers}
    for round_ in range(args.rounds):
        for server in servers:
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            process = start(server, args, port)
            try:
                wait_until_up(url, process)
                for c in levels:
                    wrk(url, script, c, args.warmup)
                    result = wrk(url, script, c, args.seconds)
                    runs[server][c].append(result)
                    print(f"round {round_} {server} c={c}: {result}", flush=True)
            finally:
                stop(process)
            time.sleep(3)
    summary = {server: {c: {k: statistics.median(r[k] for r in results) for k in results[0]}
                        for c, results in by_level.items()} for server, by_level in runs.items()}
    record = {"config": {**{k: str(v) for k, v in vars(args).items() if k not in ("serve_plain", "port")},
                         "cores": os.cpu_count(), "cpu": platform.processor(), "date": datetime.date.today().isoformat()},
              "median": summary, "runs": runs,
              "ratio_over_plain": {server: {c: summary[server][c]["requests_per_s"] / summary["plain"][c]["requests_per_s"]
                                            for c in levels} for server in servers[1:]}}
    print(json.dumps(record["median"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
