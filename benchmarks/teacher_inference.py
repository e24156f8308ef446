"""Teacher labeling speed of kd-ray's labeler core against plain transformers loops, and
teacher-vs-student latency at batch 1 and 64. Runs on CPU or GPU; no Ray (that cost is
measured by the labeling benchmark), so it also runs where only torch and transformers are.

    python benchmarks/teacher_inference.py --texts ../shared/data/airline_tweets/Tweets.csv \
        --tokenizer data/models/all-MiniLM-L6-v2 --teacher-size minilm --rows 50000 \
        --device cpu --batch-size 64 --out benchmarks/results/inference-cpu-minilm.json

Labeling (same texts, batch size and max length; A/B runs alternate, medians of --repeats):
  plain-fp32   a transformers loop in corpus order, tokenizer(batch, padding=True), fp32
  plain-amp    the same under bf16 autocast (GPU only): the fair GPU baseline
  kd-ray       kd_ray.models.teacher.TeacherLabeler over Arrow blocks of --block-rows rows: texts
               sorted by token length inside each block, bf16 autocast on GPU, fp32 on CPU
Reported: rows/s, real tokens/s, padding efficiency (real / padded tokens), and useful FLOP/s
(the model's FLOPs on the real tokens) as a fraction of a matmul peak measured in the same run.

Models have random weights (speed does not depend on their values): 'minilm' is the
tokenizer folder's own config (MiniLM-L6: 6 layers, hidden 384), 'base' the BERT-base shape
(12 layers, hidden 768; the size of MPNet-base, RoBERTa-base). The student keeps
--student-layers layers of the teacher's shape, as `student.kind: cut` does.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from kd_ray.config import TeacherConfig
from kd_ray.models.teacher import TeacherLabeler

LABELS = 3


def read_texts(path: Path, rows: int) -> list[str]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            texts = [r["text"] for r in csv.DictReader(f) if r.get("text")]
    else:
        texts = [line.rstrip("\n") for line in path.open(encoding="utf-8") if line.strip()]
    return (texts * (rows // len(texts) + 1))[:rows]


def model_config(tokenizer_dir: str, size: str, layers: int | None = None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tokenizer_dir, num_labels=LABELS)
    if size == "base":
        config.update({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072})
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def save_random_model(folder: Path, tokenizer_dir: str, config) -> Path:
    """A model folder TeacherLabeler can load: random weights of ``config`` plus the tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    config.architectures = ["BertForSequenceClassification"]
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def flops_per_sequence(config, length: np.ndarray) -> np.ndarray:
    """Forward FLOPs of an encoder on sequences of ``length`` tokens (matmuls only)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    dense = 2 * n * (4 * h * h + 2 * h * i)  # per token: QKV + output projections, feed-forward
    attention = 4 * n * h  # per token and per attended token: QK^T and attention x V
    return length * dense + length * length * attention


def padding_efficiency(lengths: np.ndarray, batch_size: int, block_rows: int | None,
                       batch_tokens: int | None = None) -> float:
    """Real tokens / padded tokens when batches are cut in corpus order (block_rows None) or,
    as kd-ray does, from each block sorted by length (kd_ray.models.inference.length_groups)."""
    from kd_ray.models.inference import length_groups

    if block_rows is None:
        return float(lengths.sum() / sum(b.max() * len(b) for b in np.array_split(
            lengths, range(batch_size, len(lengths), batch_size))))
    padded = 0
    for s in range(0, len(lengths), block_rows):
        block = lengths[s:s + block_rows]
        padded += sum(int(block[g].max()) * len(g) for g in length_groups(block, batch_size, batch_tokens))
    return float(lengths.sum() / padded)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str) -> tuple[float, str]:
    """FLOP/s of a large matmul in the dtype inference uses here (fp32 on CPU, bf16 on GPU)."""
    dtype, n = (torch.bfloat16, 8192) if device == "cuda" else (torch.float32, 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times), str(dtype).replace("torch.", "")


def plain_loop(model, tokenizer, texts, batch_size, max_length, device, amp: bool) -> np.ndarray:
    out = []
    context = torch.autocast(device, dtype=torch.bfloat16) if amp else torch.autocast(device, enabled=False)
    with torch.inference_mode(), context:
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(device)
            out.append(model(**enc).logits.float().cpu().numpy())
    return np.concatenate(out)


def kd_ray_labeler(labeler: TeacherLabeler, texts, block_rows) -> np.ndarray:
    out = []
    for s in range(0, len(texts), block_rows):
        chunk = texts[s:s + block_rows]
        table = pa.table({"id": [str(i) for i in range(len(chunk))], "text": chunk,
                          "label": pa.nulls(len(chunk), pa.int32()), "reject_reason": pa.nulls(len(chunk), pa.string())})
        logits = labeler(table).column("teacher_logits").combine_chunks()
        out.append(logits.flatten().to_numpy().reshape(len(chunk), -1))
    return np.concatenate(out)


def latency(model, tokenizer, texts, batch_size, max_length, device, calls: int) -> dict:
    """Per-call milliseconds (tokenizing included, as a service sees it) and rows/s."""
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else torch.autocast(device, enabled=False)
    times = []
    with torch.inference_mode(), amp:
        for c in range(calls + 3):
            batch = texts[c * batch_size:(c + 1) * batch_size]
            start = time.perf_counter()
            enc = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            model(**enc).logits.float().cpu()
            sync(device)
            if c >= 3:  # warm-up calls excluded
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"batch_size": batch_size, "ms_median": median * 1e3, "ms_p90": float(np.percentile(times, 90)) * 1e3,
            "rows_per_s": batch_size / median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=Path, required=True, help="CSV with a 'text' column, or one text per line")
    parser.add_argument("--tokenizer", required=True, help="Folder with the tokenizer and base config (MiniLM-L6)")
    parser.add_argument("--teacher-size", choices=["minilm", "base"], default="minilm")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--block-rows", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, nargs="*", default=[], help="also kd-ray with compute.batch_tokens "
                        "N (padded tokens per forward pass; rows up to --token-batch-rows): one variant per N")
    parser.add_argument("--token-batch-rows", type=int, default=1024, help="compute.batch_size of the --batch-tokens "
                        "variants: the most rows a batch of short posts grows to")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-inference"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    device = args.device
    texts = read_texts(args.texts, args.rows)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]])
    teacher_cfg = model_config(args.tokenizer, args.teacher_size)
    folder = save_random_model(args.work_dir / f"teacher-{args.teacher_size}", args.tokenizer, teacher_cfg)
    labeler = TeacherLabeler([TeacherConfig(model=str(folder), max_length=args.max_length)],
                             batch_size=args.batch_size, num_gpus=1 if device == "cuda" else 0, threads=args.threads)
    model = labeler.teachers[0][1]  # the same weights for every variant
    peak, peak_dtype = matmul_peak(device)
    useful_flops = float(flops_per_sequence(teacher_cfg, lengths).sum())

    variants = {"plain-fp32": lambda t: plain_loop(model, tokenizer, t, args.batch_size, args.max_length, device, False),
                "kd-ray": lambda t: kd_ray_labeler(labeler, t, args.block_rows)}
    batching = {"plain-fp32": (args.batch_size, None, None), "kd-ray": (args.batch_size, args.block_rows, None)}
    for tokens in args.batch_tokens:  # the same saved weights, batches cut by padded tokens
        by_tokens = TeacherLabeler([TeacherConfig(model=str(folder), max_length=args.max_length)],
                                   batch_size=args.token_batch_rows, batch_tokens=tokens,
                                   num_gpus=1 if device == "cuda" else 0, threads=args.threads)
        variants[f"kd-ray-tokens{tokens}"] = lambda t, lab=by_tokens: kd_ray_labeler(lab, t, args.block_rows)
        batching[f"kd-ray-tokens{tokens}"] = (args.token_batch_rows, args.block_rows, tokens)
    if device == "cuda":
        variants["plain-amp"] = lambda t: plain_loop(model, tokenizer, t, args.batch_size, args.max_length, device, True)
    for run in variants.values():  # warm-up: CUDA kernels, allocator, tokenizer caches
        run(texts[:1024])
    times = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.repeats):  # alternate the variants so machine noise hits them alike
        for name, run in variants.items():
            sync(device)
            start = time.perf_counter()
            outputs[name] = run(texts)
            sync(device)
            times[name].append(time.perf_counter() - start)
    labeling = {}
    for name in variants:
        seconds = statistics.median(times[name])
        labeling[name] = {"seconds_median": seconds, "seconds": times[name], "rows_per_s": len(texts) / seconds,
                          "tokens_per_s": float(lengths.sum()) / seconds,
                          "useful_flops_per_s": useful_flops / seconds, "fraction_of_peak": useful_flops / seconds / peak,
                          "padding_efficiency": padding_efficiency(lengths, *batching.get(name, batching["plain-fp32"]))}
    for name in variants:
        labeling[name]["speedup_vs_plain_fp32"] = labeling[name]["rows_per_s"] / labeling["plain-fp32"]["rows_per_s"]
        labeling[name]["argmax_agreement_with_fp32"] = float(
            (outputs[name].argmax(1) == outputs["plain-fp32"].argmax(1)).mean())
        labeling[name]["max_abs_logit_diff_vs_fp32"] = float(np.abs(outputs[name] - outputs["plain-fp32"]).max())

    student_cfg = model_config(args.tokenizer, args.teacher_size, layers=args.student_layers)
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_config(student_cfg).to(device).eval()
    lat = {}
    for name, m in (("teacher", model), ("student", student)):
        lat[name] = {"params": sum(p.numel() for p in m.parameters()),
                     "batch_1": latency(m, tokenizer, texts, 1, args.max_length, device, calls=200),
                     "batch_64": latency(m, tokenizer, texts, 64, args.max_length, device, calls=30)}
    for b in ("batch_1", "batch_64"):
        lat["student"][b]["speedup_vs_teacher"] = lat["student"][b]["rows_per_s"] / lat["teacher"][b]["rows_per_s"]

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "threads": args.threads if device == "cpu" else None, "torch": torch.__version__,
              "rows": len(texts), "mean_tokens": float(lengths.mean()), "batch_size": args.batch_size,
              "block_rows": args.block_rows, "max_length": args.max_length, "teacher_size": args.teacher_size,
              "teacher_params": lat["teacher"]["params"], "matmul_peak_flops": peak, "matmul_peak_dtype": peak_dtype,
              "labeling": labeling, "latency": lat, "command": " ".join(sys.argv)}
    print(f"{report['device']}: {len(texts)} rows, {lengths.mean():.1f} tokens/row, teacher {args.teacher_size} "
          f"({report['teacher_params'] / 1e6:.1f} M), batch {args.batch_size}, matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s ({peak_dtype})")
    print(f"{'labeling':<12}{'rows/s':>10}{'tokens/s':>11}{'pad eff':>9}{'% peak':>8}{'vs fp32':>9}{'agree':>8}")
    for name, m in labeling.items():
        print(f"{name:<12}{m['rows_per_s']:>10.0f}{m['tokens_per_s']:>11.0f}{m['padding_efficiency']:>9.2f}"
              f"{100 * m['fraction_of_peak']:>7.1f}%{m['speedup_vs_plain_fp32']:>8.2f}x{m['argmax_agreement_with_fp32']:>8.3f}")
    print(f"{'latency':<12}{'params':>10}{'b1 ms':>9}{'b1 rows/s':>11}{'b64 ms':>9}{'b64 rows/s':>12}")
    for name, m in lat.items():
        print(f"{name:<12}{m['params'] / 1e6:>9.1f}M{m['batch_1']['ms_median']:>9.2f}{m['batch_1']['rows_per_s']:>11.0f}"
              f"{m['batch_64']['ms_median']:>9.1f}{m['batch_64']['rows_per_s']:>12.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
