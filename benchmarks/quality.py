"""Quality on real data: what a distilled student keeps of its teacher, against honest baselines.

    python benchmarks/quality.py --dataset airline --seeds 0 1 2 --out runs/quality \
        --results benchmarks/results/quality-airline.json
    python benchmarks/quality.py --dataset sst2 --seeds 0 1 2 --out runs/quality \
        --results benchmarks/results/quality-sst2.json

Splits (fixed, seed 0, written as CSV under <out>/<dataset>/data/; texts deduplicated first, after
the social-media normalisation, so that no text is in two splits):
  airline  ../shared/data/airline_tweets/Tweets.csv, 3 classes, stratified:
           25% labeled (teacher training), 55% transfer (gold hidden from training), 10% validation
           (tuning and epoch scores), 10% test (the final table only)
  sst2     ../shared/data/sst2: labeled and transfer sets sampled from train.tsv phrases of at least
           6 words (texts that are also in dev/test removed); validation dev.tsv; test test.tsv

Rows, each scored on the test split (macro-recall, macro-F1, accuracy) and timed on the same 2
CPU threads, alternating between models (median of 3 passes over --timing-rows test texts):
  tfidf_lr        TF-IDF word 1-2-grams + logistic regression (C and class weighting chosen on
                  validation), trained on the labeled set
  teacher         MiniLM-L6 (all-MiniLM-L6-v2) fine-tuned on the labeled set (`kd-ray finetune`)
  student_alpha0  kd-ray's default student (3 layers cut from the teacher, trained 2 epochs, then
                  narrowed in 3 steps, one an epoch, to a quarter of their feed-forward neurons and
                  trained 3 epochs at that width), labeled set only
  student_kd      distilled on labeled + transfer soft labels with kd-ray's default T and alpha
  student_tuned   distilled with T, alpha and learning rate from `kd-ray tune` (searched once, on
                  seed 0's soft labels, scored on validation; then trained for every seed)
  student_hard    distilled on the teacher's argmax labels only (loss.kind hard)
--variant NAME=JSON trains the default student and students with some distill settings changed instead
(scored on validation and test; each student's validation macro-recall per epoch and exported epoch
recorded); --teacher-representation mean has labeling store the teacher's sentence
representation too, for variants with loss.beta.
Every trained row is repeated for each --seeds (teacher fine-tuning seed, student seed), and the
table reports mean and spread (max - min). Stages whose output folder is complete are skipped on
rerun, and seeds already in the --results file (same dataset, same split sizes) are kept, so an
interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from kd_ray.config import PipelineConfig, load_config
from kd_ray.data.normalize import normalize_post


def _load_job(name: str):
    """A script of jobs/ as a module (jobs/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_airline = _load_job("prepare_airline")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "all-MiniLM-L6-v2"
STUDENTS = ("student_alpha0", "student_kd", "student_tuned", "student_hard")
METRICS = ("macro_recall", "macro_f1", "accuracy")


# ---------------------------------------------------------------------------- splits


def _dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.assign(text=frame["text"].map(normalize_post))
    frame = frame[frame["text"].str.len() > 0]
    return frame.drop_duplicates("text", keep=False)  # a text with two labels is dropped, not guessed


def airline_splits() -> dict[str, pd.DataFrame]:
    """jobs/prepare_airline.py's splits, sentiment only."""
    return {name: frame.rename(columns={"sentiment": "label"})
            for name, frame in prepare_airline.airline_splits(SHARED / "airline_tweets" / "Tweets.csv").items()}


def sst2_splits(labeled_rows: int = 2000, transfer_rows: int = 8000) -> dict[str, pd.DataFrame]:
    names = ["negative", "positive"]
    read = lambda name, column: pd.read_csv(SHARED / "sst2" / name, sep="\t", quoting=3, keep_default_na=False)\
        .rename(columns={column: "text"}).assign(label=lambda f: f["label"].map(lambda i: names[int(i)]))  # noqa: E731
    validation, test = _dedupe(read("dev.tsv", "content")), _dedupe(read("test.tsv", "content"))
    train = _dedupe(read("train.tsv", "sentence"))
    train = train[(train["text"].str.split().str.len() >= 6) & ~train["text"].isin(set(validation["text"]) | set(test["text"]))]
    train = train.sample(n=labeled_rows + transfer_rows, random_state=0)
    return {"labeled": train.iloc[:labeled_rows], "transfer": train.iloc[labeled_rows:],
            "validation": validation, "test": test}


DATASETS = {"airline": (airline_splits, ["negative", "neutral", "positive"]),
            "sst2": (sst2_splits, ["negative", "positive"])}


def write_splits(dataset: str, folder: Path) -> dict[str, int]:
    splits = DATASETS[dataset][0]()
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, frame in splits.items():
        frame = frame.reset_index(drop=True).assign(id=[f"{name}-{i}" for i in range(len(frame))])
        columns = ["id", "text"] if name == "transfer" else ["id", "text", "label"]  # the transfer set's gold stays hidden
        frame[columns].to_csv(folder / f"{name}.csv", index=False)
        sizes[name] = len(frame)
    texts = [set(pd.read_csv(folder / f"{n}.csv", keep_default_na=False)["text"]) for n in splits]
    assert all(not (a & b) for i, a in enumerate(texts) for b in texts[i + 1:]), "a text is in two splits"
    return sizes


# ---------------------------------------------------------------------------- configs


def pipeline_config(data: Path, labels: list[str], run: Path, seed: int,
                    representation: str | None = None) -> PipelineConfig:
    """The run every seed makes; kd-ray's shipped student defaults except where a row changes them.
    ``representation`` also stores the teacher's sentence representation at labeling (for loss.beta)."""
    tree = {
        "output": str(run), "labels": labels,
        "data": {"train": {"path": str(data / "labeled.csv"), "id_column": "id", "label_column": "label"},
                 "transfer": {"path": str(data / "transfer.csv"), "id_column": "id"},
                 "validation": {"path": str(data / "validation.csv")},
                 "test": {"path": str(data / "test.csv")}},
        "teacher": {"base_model": str(MODEL), "max_length": 64, "representation": representation,
                    "train": {"epochs": 3, "batch_size": 32, "learning_rate": 5e-5, "max_length": 64, "seed": seed,
                              "threads_per_worker": 2, "num_cpus_per_worker": 1.5}},
        "label": {"batch_size": 64, "block_rows": 1024},
        "distill": {"epochs": 3, "batch_size": 32, "learning_rate": 2e-4, "max_length": 64, "seed": seed,
                    "threads_per_worker": 2, "num_cpus_per_worker": 1.5},
        "eval": {"batch_size": 64, "max_length": 64, "threads": 2, "timing_rows": 1000},
    }
    return load_config(PipelineConfig, overrides=tree)


SEARCH = {"space": {"temperature": {"distribution": "loguniform", "low": 1.0, "high": 8.0},
                    "alpha": {"distribution": "uniform", "low": 0.3, "high": 1.0},
                    "learning_rate": {"distribution": "loguniform", "low": 5e-5, "high": 5e-4}},
          "num_samples": 8, "include_default": True, "metric": "val_macro_recall",
          "scheduler": "asha", "grace_period": 1, "reduction_factor": 2}


def _done(folder: Path) -> bool:
    return (folder / "kd_ray_train.json").is_file() or (folder / "tune_summary.json").is_file()


def timed_stage(name: str, folder: Path, fn, cfg, timings: dict) -> None:
    if _done(folder):
        print(f"quality: {folder} is complete; skipping {name}", flush=True)
        return
    start = time.perf_counter()
    fn(cfg)
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"quality: {name} done in {timings[name]} s", flush=True)


# ---------------------------------------------------------------------------- rows


def tfidf_row(data: Path, args) -> dict:
    """The classical baseline, its C and class weighting chosen on validation macro-recall."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from kd_ray.models.metrics import classification_metrics

    read = lambda n: pd.read_csv(data / f"{n}.csv", keep_default_na=False)  # noqa: E731
    train, validation, test = read("labeled"), read("validation"), read("test")
    labels = sorted(train["label"].unique())
    best = None
    for c in (0.3, 1.0, 3.0, 10.0, 30.0):
        for weight in (None, "balanced"):
            model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                                  LogisticRegression(C=c, class_weight=weight, max_iter=2000))
            model.fit(train["text"], train["label"])
            score = classification_metrics(model.predict_log_proba(validation["text"]), validation["label"].map(labels.index).to_numpy(), labels)["macro_recall"]
            if best is None or score > best[0]:
                best = (score, c, weight, model)
    _, c, weight, model = best
    gold = test["label"].map(labels.index).to_numpy()
    row = classification_metrics(model.predict_log_proba(test["text"]), gold, labels)
    texts = list(test["text"])
    texts = (texts * (args.timing_rows // len(texts) + 1))[: args.timing_rows]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model.predict_proba(texts)
        times.append(time.perf_counter() - start)
    vocab = len(model[0].vocabulary_)
    return {**row, "params": vocab * len(model[-1].classes_) + len(model[-1].classes_),
            "rows_per_s": len(texts) / statistics.median(times), "C": c, "class_weight": weight}


def compare(models: dict[str, str], test, args) -> dict:
    """kd-ray's evaluation of ``models`` (the first one the teacher), one entry per model."""
    from kd_ray.stages.evaluate import SINGLE_TASK, evaluate_models, metrics_report

    teacher, *students = models
    return metrics_report(evaluate_models({SINGLE_TASK: models[teacher]}, {n: models[n] for n in students}, test, args))


def prepare_seed(dataset: str, data: Path, labels: list[str], out: Path, seed: int, timings: dict,
                 representation: str | None = None):
    """The seed's teacher and its soft labels (each skipped where already complete); returns the
    seed's run folder, pipeline config and stage configs."""
    from kd_ray.stages.label import run_label
    from kd_ray.stages.pipeline import stages as run_stages
    from kd_ray.stages.train import run_finetune

    run = out / dataset / f"seed{seed}"
    cfg = pipeline_config(data, labels, run, seed, representation)
    stages = {stage.name: getattr(stage, "cfg", None) for stage in run_stages(cfg)}
    timed_stage("finetune", run / "teacher", run_finetune, stages["finetune"], timings)
    if not (run / "soft_labels" / "_manifest.json").is_file():
        start = time.perf_counter()
        print(run_label(stages["label"]).line(), flush=True)
        timings["label"] = round(time.perf_counter() - start, 1)
    gold = pq.read_table(run / "soft_labels", columns=["label"])["label"]
    labeled = len(pd.read_csv(data / "labeled.csv"))
    assert len(gold) - gold.null_count == labeled, f"{len(gold) - gold.null_count} soft-label rows carry gold, not {labeled}"
    return run, cfg, stages


def run_seed(dataset: str, data: Path, labels: list[str], out: Path, seed: int, tuned: dict | None, args) -> dict:
    from kd_ray.config import EvalArgs
    from kd_ray.stages.train import run_distill
    from kd_ray.stages.tune import run_tune

    timings: dict = {}
    run, cfg, stages = prepare_seed(dataset, data, labels, out, seed, timings, args.teacher_representation)
    distill = stages["distill"]
    if tuned is None:  # the search, once, on this seed's soft labels
        from kd_ray.config import TuneConfig

        search = {**SEARCH, "num_samples": args.trials}
        tune_cfg = load_config(TuneConfig, overrides={"distill": distill.model_dump(mode="json"), "search": search,
                                                      "output": str(out / dataset / "tune")})
        timed_stage("tune", out / dataset / "tune", run_tune, tune_cfg, timings)
        tuned = json.loads((out / dataset / "tune" / "tune_summary.json").read_text())["best_values"]
    variants = {
        "student_alpha0": {"loss": distill.loss.model_copy(update={"alpha": 0.0})},
        "student_kd": {},
        "student_tuned": {"loss": distill.loss.model_copy(update={"temperature": tuned["temperature"],
                                                                  "alpha": tuned["alpha"]}),
                          "train": distill.train.model_copy(update={"learning_rate": tuned["learning_rate"]})},
        "student_hard": {"loss": distill.loss.model_copy(update={"kind": "hard", "alpha": 1.0})},
    }
    for name, update in variants.items():
        variant = distill.model_copy(update={**update, "output": str(run / name)})
        timed_stage(name, run / name, run_distill, variant, timings)
    models = {"teacher": str(run / "teacher"), **{name: str(run / name) for name in STUDENTS}}
    report = compare(models, cfg.data.test, EvalArgs(**{**cfg.eval.model_dump(), "timing_rows": args.timing_rows}))
    return {"seed": seed, "tuned": tuned, "timings_s": timings,
            **{name: report[name] for name in models}}


def run_variants(dataset: str, data: Path, labels: list[str], out: Path, seed: int, variants: dict, args) -> dict:
    """Extra students (the defaults with some settings changed) next to the default one, scored on
    validation and test: the evidence for or against changing a default."""
    from kd_ray.config import EvalArgs
    from kd_ray.stages.label import run_label
    from kd_ray.stages.train import run_distill

    timings: dict = {}
    run, cfg, stages = prepare_seed(dataset, data, labels, out, seed, timings, args.teacher_representation)
    distill = stages["distill"]
    timed_stage("student_kd", run / "student_kd", run_distill, distill.model_copy(update={"output": str(run / "student_kd")}), timings)
    for name, update in variants.items():
        update = dict(update)
        if "augment" in update:  # the teacher labels perturbed copies too, into the variant's own soft labels
            label = stages["label"]
            label = label.model_copy(update={"augment": label.augment.model_copy(update=update.pop("augment")),
                                             "output": label.output.model_copy(update={"path": str(run / f"soft_labels_{name}")})})
            if not (run / f"soft_labels_{name}" / "_manifest.json").is_file():
                start = time.perf_counter()
                print(run_label(label).line(), flush=True)
                timings[f"label_{name}"] = round(time.perf_counter() - start, 1)
            update["soft_labels"] = label.output.path
        sections = {key: value if isinstance(value, str) else getattr(distill, key).model_copy(update=value)
                    for key, value in update.items()}
        timed_stage(name, run / name, run_distill, distill.model_copy(update={**sections, "output": str(run / name)}), timings)
    models = {"teacher": str(run / "teacher"), "student_kd": str(run / "student_kd"), **{n: str(run / n) for n in variants}}
    eval_args = EvalArgs(**{**cfg.eval.model_dump(), "timing_rows": args.timing_rows})
    scores = {split: compare(models, getattr(cfg.data, split), eval_args) for split in ("validation", "test")}
    return {name: {"timing_s": timings.get(name), **_epochs(Path(models[name])),
                   **{split: {m: scores[split][name][m] for m in (*METRICS, "rows_per_s")} for split in scores}}
            for name in models}


def _epochs(model: Path) -> dict:
    """A student's validation macro-recall per epoch and the epoch it exported, from its run record."""
    from kd_ray.stages.train import RUN_INFO

    if model.name == "teacher" or not (model / RUN_INFO).is_file():
        return {}
    info = json.loads((model / RUN_INFO).read_text())
    return {"exported_epoch": info.get("exported_epoch"),
            "val_macro_recall_per_epoch": [e.get("val_macro_recall") for e in info["history"]]}


def merge_variants(saved: dict | None, variants: dict, per_seed: dict[int, dict]) -> dict:
    """The --results 'variants' entry with this run's variants added (a same-named one replaced).

    Earlier variants are kept when they were run on the same seeds; the teacher and default student
    rows come from this run."""
    per_seed = {str(seed): rows for seed, rows in per_seed.items()}
    if not saved or set(saved["per_seed"]) != set(per_seed):
        if saved:
            print(f"quality: earlier variants ran on seeds {sorted(saved['per_seed'])}, not {sorted(per_seed)}; "
                  "replacing them", flush=True)
        return {"changed": variants, "per_seed": per_seed}
    changed = {name: update for name, update in saved["changed"].items() if name not in variants} | variants
    merged = {seed: {**{n: r for n, r in saved["per_seed"][seed].items() if n in changed}, **rows}
              for seed, rows in per_seed.items()}
    return {"changed": changed, "per_seed": merged}


def variants_table(variants: dict, per_seed: dict[int, dict]) -> str:
    lines = [f"{'row':<16}{'changed':<42}{'val macro-recall':>24}{'test macro-recall':>24}{'kept (test)':>12}{'rows/s':>8}"]
    teacher = np.mean([r["teacher"]["test"]["macro_recall"] for r in per_seed.values()])
    for name in ("teacher", "student_kd", *variants):
        cells = ""
        for split in ("validation", "test"):
            values = [r[name][split]["macro_recall"] for r in per_seed.values()]
            cells += f"{np.mean(values):>15.4f} ±{(max(values) - min(values)) / 2:.4f}"
        test = np.mean([r[name]["test"]["macro_recall"] for r in per_seed.values()])
        speed = np.mean([r[name]["test"]["rows_per_s"] for r in per_seed.values()])
        lines.append(f"{name:<16}{json.dumps(variants.get(name, {})):<42}{cells}{test / teacher:>12.1%}{speed:>8.0f}")
    return "\n".join(lines)


def summarise(results: list[dict], tfidf: dict) -> dict:
    table = {"tfidf_lr": {m: {"mean": tfidf[m], "spread": 0.0} for m in (*METRICS, "rows_per_s")}}
    table["tfidf_lr"]["params"] = tfidf["params"]
    for name in ("teacher", *STUDENTS):
        row = {}
        for m in (*METRICS, "rows_per_s", "speedup", "agreement"):
            values = [r[name][m] for r in results if m in r[name]]
            if values:
                row[m] = {"mean": float(np.mean(values)), "spread": float(np.max(values) - np.min(values)),
                          "values": values}
        row["params"] = results[0][name]["params"]
        if name != "teacher":
            row["retention_macro_recall"] = row["macro_recall"]["mean"] / table["teacher"]["macro_recall"]["mean"]
        table[name] = row
    return table


def format_table(table: dict) -> str:
    lines = [f"{'row':<16}{'macro-recall':>18}{'macro-F1':>18}{'accuracy':>18}{'kept':>8}{'params':>13}{'rows/s':>9}"
             f"{'speed':>7}"]
    for name, row in table.items():
        cells = "".join(f"{row[m]['mean']:>11.4f} ±{row[m]['spread'] / 2:.4f}" for m in METRICS)
        kept = f"{row['retention_macro_recall']:.1%}" if "retention_macro_recall" in row else ""
        speed = f"{row['speedup']['mean']:.2f}x" if "speedup" in row else ""
        lines.append(f"{name:<16}{cells}{kept:>8}{row['params']:>13,}{row['rows_per_s']['mean']:>9.0f}{speed:>7}")
    return "\n".join(lines)


ROW_NAMES = {"tfidf_lr": "TF-IDF + logistic regression", "teacher": "teacher: MiniLM-L6 fine-tuned",
             "student_alpha0": "student, labeled set only (alpha = 0)", "student_kd": "student distilled, defaults",
             "student_tuned": "student distilled, tuned", "student_hard": "student, hard teacher labels"}


def markdown_table(table: dict) -> str:
    """The table for BENCHMARKS.md: mean ± half the spread over the seeds."""
    lines = ["| row | macro-recall | macro-F1 | accuracy | kept of teacher | parameters | CPU rows/s | vs teacher |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        cells = " | ".join(f"{row[m]['mean']:.4f} ± {row[m]['spread'] / 2:.4f}" for m in METRICS)
        kept = f"{row['retention_macro_recall']:.1%}" if "retention_macro_recall" in row else ""
        speed = f"{row['speedup']['mean']:.2f}x" if "speedup" in row else ""
        lines.append(f"| {ROW_NAMES[name]} | {cells} | {kept} | {row['params'] / 1e6:.2f} M | "
                     f"{row['rows_per_s']['mean']:,.0f} | {speed} |")
    return "\n".join(lines)


def _kept_seeds(results: Path, dataset: str, sizes: dict) -> dict[int, dict]:
    """Seeds an earlier run already measured on these same splits (the results file is committed, so a
    benchmark cut off between seeds continues from there even where its run folders are gone)."""
    if not results.is_file():
        return {}
    earlier = json.loads(results.read_text())
    if earlier.get("dataset") != dataset or earlier.get("splits") != sizes:
        return {}
    return {r["seed"]: r for r in earlier.get("per_seed", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--timing-rows", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=SEARCH["num_samples"], help="kd-ray tune trials (once, seed 0)")
    parser.add_argument("--results", required=True, help="JSON file for the table")
    parser.add_argument("--teacher-representation", choices=["mean", "cls"],
                        help="labeling also stores the teacher's sentence representation, for variants with "
                             "loss.beta (a seed's soft labels are written once: set it before they are)")
    parser.add_argument("--table-only", action="store_true", help="print the tables of --results; run nothing")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="instead of the table: train the default student and this one (distill sections "
                             "to change, e.g. 'epochs3={\"train\": {\"epochs\": 3}}'; \"augment\": {...} has the teacher "
                             "label perturbed copies too) for every seed, and score "
                             "both on validation and test; added under 'variants' in --results, where earlier variants "
                             "on the same seeds stay")
    args = parser.parse_args()
    variants = {}
    for variant in args.variant:
        name, _, update = variant.partition("=")
        try:
            variants[name] = json.loads(update)
        except json.JSONDecodeError as e:
            parser.error(f"--variant {variant!r}: expected NAME={{JSON object}} ({e})")
        if not isinstance(variants[name], dict):
            parser.error(f"--variant {variant!r}: expected NAME={{JSON object}}")
    if args.table_only:
        saved = json.loads(Path(args.results).read_text())
        if "per_seed" in saved:  # a file of --variant runs only has no main table
            table = summarise(saved["per_seed"], saved["tfidf_lr"])
            print(format_table(table), markdown_table(table), f"tuned: {saved['per_seed'][0]['tuned']}", sep="\n\n")
        if "variants" in saved:
            print("", variants_table(saved["variants"]["changed"], saved["variants"]["per_seed"]), sep="\n")
        return
    if not SHARED.is_dir() or not MODEL.is_dir():
        sys.exit(f"quality: needs the shared data at {SHARED} and the MiniLM-L6 folder at {MODEL} (`make setup`)")
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    out = Path(args.out)
    data = out / args.dataset / "data"
    sizes = write_splits(args.dataset, data)
    print(f"quality: {args.dataset} splits {sizes} in {data}", flush=True)
    labels = DATASETS[args.dataset][1]
    if variants:
        saved = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
        per_seed = {seed: run_variants(args.dataset, data, labels, out, seed, variants, args) for seed in args.seeds}
        saved["variants"] = merge_variants(saved.get("variants"), variants, per_seed)
        Path(args.results).write_text(json.dumps(saved, indent=2))
        print(variants_table(saved["variants"]["changed"], saved["variants"]["per_seed"]), flush=True)
        return
    tfidf = tfidf_row(data, args)
    kept = _kept_seeds(Path(args.results), args.dataset, sizes)
    results, tuned = [], None
    for seed in args.seeds:
        if seed in kept:
            print(f"quality: seed {seed} is already in {args.results}; keeping it", flush=True)
            results.append(kept[seed])
        else:
            results.append(run_seed(args.dataset, data, labels, out, seed, tuned, args))
        tuned = results[-1]["tuned"]
        partial = {"dataset": args.dataset, "splits": sizes, "seeds": args.seeds, "tfidf_lr": tfidf,
                   "per_seed": results, "machine": platform.processor() or platform.machine()}
        Path(args.results).write_text(json.dumps(partial, indent=2))
    table = summarise(results, tfidf)
    Path(args.results).write_text(json.dumps({**partial, "table": table}, indent=2))
    print(format_table(table), markdown_table(table), sep="\n\n", flush=True)


if __name__ == "__main__":
    main()
