"""Quality and GPU speed with a realistic teacher: MPNet-base distilled into a 2-layer MiniLM student.

    python benchmarks/quality.py --dataset airline --prepare-only --out runs/quality   # the splits
    python benchmarks/quality_gpu.py --teacher <all-mpnet-base-v2 folder> --student <all-MiniLM-L6-v2 folder> \
        --data runs/quality/airline/data --seeds 0 1 2 --out benchmarks/results/quality-gpu-airline.json

For a machine with one GPU and no Ray: it runs kd-ray's Ray-free core (``kd_ray.models.losses``,
``kd_ray.models.students``, ``kd_ray.models.metrics``) in a plain single-GPU loop, on the same airline splits
as ``quality.py``. Per seed:
  teacher         all-mpnet-base-v2 (12 layers, hidden 768) fine-tuned on the labeled split
  student_alpha0  2 layers cut from all-MiniLM-L6-v2 (hidden 384), trained on the labeled split only
  student_kd      the same student distilled on labeled + transfer teacher logits, T and alpha chosen
                  on validation from a small grid (seed 0; reused for the other seeds)
Speed: rows/s of the model alone on pre-tokenized, length-sorted batches of 512 in bf16 autocast
(median of 5 passes over 20,000 test texts, models alternating), and end to end with tokenization.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

from kd_ray.models.losses import compute_loss
from kd_ray.models.metrics import agreement, classification_metrics
from kd_ray.models.students import count_parameters, cut_student_from_teacher

LABELS = ["negative", "neutral", "positive"]
MAX_LENGTH = 64
DEVICE = "cuda"  # --device cpu: a smoke run of this script where there is no GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def encode(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]


def batches(ids: list[list[int]], order: np.ndarray, batch_size: int, pad_id: int):
    """Length-sorted windows of 32 batches, cut into padded (input_ids, attention_mask, rows) batches."""
    window = batch_size * 32
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(ids[i]))
        for b in range(0, len(chunk), batch_size):
            rows = np.array(chunk[b:b + batch_size])
            width = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for j, i in enumerate(rows):
                x[j, :len(ids[i])] = torch.tensor(ids[i])
            yield x, (x != pad_id).long(), rows


def train(model, tok, texts, gold, teacher_logits, *, kind, temperature, alpha, epochs, lr, seed, batch_size=32):
    """Gold-only rows when teacher_logits is None; otherwise kd-ray's distillation loss on every row."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = encode(tok, texts)
    model.to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    steps = epochs * -(-len(texts) // batch_size)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(0.06 * steps), num_training_steps=steps)
    gold_t = torch.as_tensor(gold, device=DEVICE)
    teacher_t = None if teacher_logits is None else torch.as_tensor(teacher_logits, device=DEVICE)
    for _ in range(epochs):
        all_batches = list(batches(ids, rng.permutation(len(texts)), batch_size, tok.pad_token_id))
        for b in rng.permutation(len(all_batches)):
            x, mask, rows = all_batches[b]
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                logits = model(input_ids=x.to(DEVICE), attention_mask=mask.to(DEVICE)).logits
            rows_t = torch.as_tensor(rows, device=DEVICE)
            if teacher_t is None:
                loss = torch.nn.functional.cross_entropy(logits.float(), gold_t[rows_t], ignore_index=-100)
            else:
                loss = compute_loss(kind, logits, teacher_t[rows_t], gold_t[rows_t], temperature=temperature,
                                    alpha=alpha)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return model.eval()


@torch.inference_mode()
def predict(model, ids: list[list[int]], pad_id: int, batch_size: int = 512) -> np.ndarray:
    out = np.empty((len(ids), model.config.num_labels), dtype=np.float32)
    for x, mask, rows in batches(ids, np.arange(len(ids)), batch_size, pad_id):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out[rows] = model(input_ids=x.to(DEVICE), attention_mask=mask.to(DEVICE)).logits.float().cpu().numpy()
    return out


@torch.inference_mode()
def rows_per_s(models: dict, texts: list[str], batch_size: int, repeats: int = 7) -> dict:
    """Model-only (pre-tokenized, batches on the GPU before the clock starts) and end-to-end rows/s."""
    prepared = {}
    for name, (model, tok) in models.items():
        ids = encode(tok, texts)
        prepared[name] = [(x.to(DEVICE), m.to(DEVICE)) for x, m, _ in batches(ids, np.arange(len(ids)), batch_size,
                                                                              tok.pad_token_id)]
    times = {n: {"model": [], "end_to_end": []} for n in models}
    for _ in range(repeats + 1):  # the first pass warms up kernels and is dropped
        for name, (model, tok) in models.items():
            sync()
            start = time.perf_counter()
            for x, m in prepared[name]:
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    model(input_ids=x, attention_mask=m).logits.float()
            sync()
            times[name]["model"].append(time.perf_counter() - start)
            start = time.perf_counter()
            predict(model, encode(tok, texts), tok.pad_token_id, batch_size)
            sync()
            times[name]["end_to_end"].append(time.perf_counter() - start)
    return {n: {k: len(texts) / statistics.median(v[1:]) for k, v in t.items()} for n, t in times.items()}


def load(folder: str):
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, help="rows per split (a smoke run)")
    parser.add_argument("--timing-rows", type=int, default=20_000)
    parser.add_argument("--timing-batch", type=int, default=2048)
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--temperature", type=float, help="with --alpha: skip the validation grid")
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--extra-transfer", nargs="*", default=[],
                        help="CSV files whose 'text' column is added to the transfer set, unlabeled")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    read = lambda n: pd.read_csv(Path(args.data) / f"{n}.csv", keep_default_na=False).head(args.limit)  # noqa: E731
    labeled, transfer, validation, test = (read(n) for n in ("labeled", "transfer", "validation", "test"))
    to_index = {n: i for i, n in enumerate(LABELS)}
    extra = [t for f in args.extra_transfer for t in pd.read_csv(f, keep_default_na=False)["text"]]
    held_out = set(validation["text"]) | set(test["text"])
    extra = [t for t in dict.fromkeys(extra) if t and t not in held_out][: (args.limit or len(extra))]
    train_texts = list(labeled["text"]) + list(transfer["text"]) + extra
    train_gold = np.array(list(labeled["label"].map(to_index)) + [-100] * (len(transfer) + len(extra)))
    val_gold, test_gold = validation["label"].map(to_index).to_numpy(), test["label"].map(to_index).to_numpy()
    timing_texts = (list(test["text"]) * (args.timing_rows // len(test) + 1))[:args.timing_rows]
    results, grid_choice = [], None
    for seed in args.seeds:
        t0 = time.perf_counter()
        teacher, ttok = load(args.teacher)
        teacher = train(teacher, ttok, list(labeled["text"]), train_gold[:len(labeled)], None, kind=None,
                        temperature=None, alpha=None, epochs=3, lr=3e-5, seed=seed)
        soft = predict(teacher, encode(ttok, train_texts), ttok.pad_token_id)
        teacher_s = time.perf_counter() - t0

        def student(logits, temperature=2.0, alpha=0.7, texts=train_texts, gold=train_gold):
            base, stok = load(args.student)
            model = cut_student_from_teacher(base, 2)
            return train(model, stok, texts, gold, logits, kind="kl", temperature=temperature, alpha=alpha,
                         epochs=args.student_epochs, lr=2e-4, seed=seed, batch_size=32 if len(texts) < 20_000 else 64), stok

        def score(model, tok, texts, gold):
            return classification_metrics(predict(model, encode(tok, list(texts)), tok.pad_token_id), gold, LABELS)

        if grid_choice is None and args.temperature is not None:
            grid_choice = {"temperature": args.temperature, "alpha": args.alpha, "validation_macro_recall": None}
        if grid_choice is None:  # T and alpha on validation, once
            grid = {}
            for temperature in (1.0, 2.0, 4.0):
                for alpha in (0.5, 0.7, 0.9):
                    model, stok = student(soft, temperature, alpha)
                    grid[f"{temperature},{alpha}"] = score(model, stok, validation["text"], val_gold)["macro_recall"]
            best = max(grid, key=grid.get)
            grid_choice = {"temperature": float(best.split(",")[0]), "alpha": float(best.split(",")[1]),
                           "validation_macro_recall": grid}
            print("grid:", json.dumps(grid_choice), flush=True)
        kd, stok = student(soft, grid_choice["temperature"], grid_choice["alpha"])
        alpha0, _ = student(None, texts=list(labeled["text"]), gold=train_gold[:len(labeled)])
        models = {"teacher": (teacher, ttok), "student_kd": (kd, stok), "student_alpha0": (alpha0, stok)}
        row = {"seed": seed, "teacher_train_and_label_s": teacher_s}
        test_logits = {n: predict(m, encode(t, list(test["text"])), t.pad_token_id) for n, (m, t) in models.items()}
        speed = rows_per_s(models, timing_texts, args.timing_batch)
        for name, (model, _) in models.items():
            row[name] = {**classification_metrics(test_logits[name], test_gold, LABELS), **speed[name],
                         "params": count_parameters(model),
                         "agreement": agreement(test_logits[name], test_logits["teacher"])}
            row[name].pop("confusion_matrix")
        print(json.dumps({k: (v if not isinstance(v, dict) else {m: v[m] for m in ("macro_recall", "model",
                                                                                   "end_to_end")})
                          for k, v in row.items()}), flush=True)
        results.append(row)
        del models, teacher, kd, alpha0
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    summary = {}
    for name in ("teacher", "student_kd", "student_alpha0"):
        summary[name] = {m: {"mean": float(np.mean([r[name][m] for r in results])),
                             "spread": float(np.ptp([r[name][m] for r in results]))}
                         for m in ("macro_recall", "macro_f1", "accuracy", "model", "end_to_end")}
        summary[name]["params"] = results[0][name]["params"]
    for name in ("student_kd", "student_alpha0"):
        summary[name]["retention_macro_recall"] = summary[name]["macro_recall"]["mean"] / summary["teacher"]["macro_recall"]["mean"]
        summary[name]["speedup_model"] = summary[name]["model"]["mean"] / summary["teacher"]["model"]["mean"]
        summary[name]["speedup_end_to_end"] = summary[name]["end_to_end"]["mean"] / summary["teacher"]["end_to_end"]["mean"]
    out = {"args": vars(args), "train_rows": {"labeled": len(labeled), "transfer": len(transfer), "extra": len(extra)},
           "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "grid": grid_choice,
           "per_seed": results, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
