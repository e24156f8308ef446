"""`kd-ray report RUN_FOLDER`: one self-contained HTML page (plots embedded) and the same plots as PNG.

Reads only what the stages wrote (metrics.json, trials.csv / trial_epochs.csv / tune_summary.json,
the soft-label Parquet, each model's kd_ray_train.json) and draws what is there, a panel per task (or teacher)
where a run has several; a section whose inputs are missing says so instead of failing. Outputs:
RUN_FOLDER/report.html, RUN_FOLDER/report/*.png.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kd_ray.data.soft_labels import read_soft_label_info
from kd_ray.models.metrics import softmax
from kd_ray.stages.evaluate import SINGLE_TASK, SUMMARY_HEADER, headline, summary_rows

if TYPE_CHECKING:
    from kd_ray.data.soft_labels import TeacherInfo

QUALITY = ("macro_recall", "macro_f1", "accuracy", "agreement")
MAX_HISTOGRAM_ROWS = 500_000  # teacher confidences drawn from at most this many soft-label rows


@dataclass
class RunFolder:
    """What a run folder holds, found by the names the stages write."""

    path: Path
    metrics: dict | None = None  # in evaluate_models's layout ("tasks": task -> {rows, labels, model -> metrics})
    tune_dir: Path | None = None
    soft_labels: Path | None = None
    histories: dict[str, list[dict]] = field(default_factory=dict)

    @classmethod
    def find(cls, path: str | Path) -> RunFolder:
        run = cls(Path(path))
        if (run.path / "metrics.json").is_file():
            m = json.loads((run.path / "metrics.json").read_text())
            if "teacher" in m:  # one task: metrics_report flattened its entry, with each model's speed in it
                models = {k: v for k, v in m.items() if isinstance(v, dict) and "params" in v}
                m["tasks"] = {SINGLE_TASK: {"rows": m["test"]["rows"], "labels": m["labels"], **models}}
                m.update({key: {n: v[key] for n, v in models.items() if key in v}
                          for key in ("rows_per_s", "params", "speedup", "compression")})
            run.metrics = m if "tasks" in m else None
        run.tune_dir = next((d for d in (run.path, run.path / "tune") if (d / "trials.csv").is_file()), None)
        if (run.path / "soft_labels" / "_manifest.json").is_file():
            run.soft_labels = run.path / "soft_labels"
        folders = {name: run.path / name for name in ("teacher", "student", "student_alpha0")}
        folders.update({f"teacher {d.name}": d for d in sorted(run.path.glob("teachers/*"))})  # one per task
        if run.tune_dir is not None and not folders["student"].is_dir():  # `kd-ray run` with a tune: section
            folders["student"] = run.tune_dir / "student"
        for name, folder in folders.items():
            info = folder / "kd_ray_train.json"
            if info.is_file():  # a task's own teacher (teachers/<task>) scored that task: its val_x is val_<task>_x
                task = f"{folder.name}_" if folder.parent.name == "teachers" else ""
                run.histories[name] = [{f"val_{task}{k[4:]}" if k.startswith("val_") else k: v for k, v in h.items()}
                                       for h in json.loads(info.read_text())["history"]]
        return run


# ---------------------------------------------------------------------------- plots (each returns a Figure)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titleweight": "bold", "font.size": 10})
    return plt


def _axes_params(trials, searched: list[str]) -> tuple[str, str | None] | None:
    """The two numeric searched parameters to draw against each other (temperature x alpha when
    both are searched); None when no searched parameter is a number (e.g. only loss.kind)."""
    import pandas as pd

    numeric = [p for p in searched if pd.api.types.is_numeric_dtype(trials[p])]
    preferred = [p for p in ("temperature", "alpha") if p in numeric]
    chosen = (preferred + [p for p in numeric if p not in preferred])[:2]
    return (chosen[0], chosen[1] if len(chosen) > 1 else None) if chosen else None


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def plot_landscape(trials, summary: dict, x_name: str, y_name: str | None):
    """Validation metric over two searched parameters; best trial starred, default boxed."""
    plt = _plt()
    metric = summary["metric"]
    fig, ax = plt.subplots(figsize=(7, 5))
    done = trials[trials[metric].notna()]
    y = done[y_name] if y_name else done[metric]
    vmin, vmax = done[metric].min(), done[metric].max()
    for status, marker, size in (("completed", "o", 150), ("stopped early", "v", 90)):
        part = done["status"] == status
        if part.any():
            points = ax.scatter(done.loc[part, x_name], y[part], c=done.loc[part, metric], cmap="viridis",
                                vmin=vmin, vmax=vmax, s=size, marker=marker, edgecolors="black", linewidths=0.6,
                                label=f"{status} ({int(part.sum())})")
    for score, xx, yy in zip(done[metric], done[x_name], y):
        ax.annotate(f"{score:.3f}", (xx, yy), textcoords="offset points", xytext=(7, 5), fontsize=8)
    best = done[done["trial"] == summary["best_trial"]]
    ax.scatter(best[x_name], y[best.index], marker="*", s=600, facecolors="none", edgecolors="crimson", linewidths=2,
               label=f"best: {best[metric].iloc[0]:.4f}")
    if summary.get("default_trial") in set(done["trial"]):
        default = done[done["trial"] == summary["default_trial"]]
        ax.scatter(default[x_name], y[default.index], marker="s", s=260, facecolors="none", edgecolors="black",
                   linewidths=1.5, label="config's own values")
    if (done[x_name] > 0).all() and (x_name in ("temperature", "learning_rate")
                                     or done[x_name].max() / done[x_name].min() > 20):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name or metric)
    fig.colorbar(points, ax=ax, label=metric)
    ax.set_title(f"Tuning landscape: {metric} (each trial's kept epoch, as in trials.csv)")
    ax.legend(loc="best", fontsize=8, framealpha=0.9, markerscale=0.6)
    fig.tight_layout()
    return fig


SHORT = {"temperature": "T", "alpha": "α", "learning_rate": "lr"}


def plot_trial_curves(epochs, trials, summary: dict, searched: list[str]):
    """The validation metric after each epoch, one line per trial; early-stopped trials end in an x."""
    plt = _plt()
    metric = summary["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10")
    for i, (_, row) in enumerate(trials.iterrows()):  # iterrows: searched names may hold dots
        curve = epochs[epochs["trial"] == row["trial"]].sort_values("epoch")
        if curve.empty:
            continue
        best = row["trial"] == summary["best_trial"]
        stopped = row["status"] == "stopped early"
        values = ", ".join(f"{SHORT.get(p, p)}={_value(row[p])}" for p in searched)
        ax.plot(curve["epoch"], curve[metric], color=colors(i % 10), lw=3 if best else 1.5,
                ls="--" if stopped else "-", marker="o",
                label=f"trial {row['trial'][-2:]}: {values}" + (" (best)" if best else ""))
        if stopped:
            ax.plot(curve["epoch"].iloc[-1], curve[metric].iloc[-1], marker="x", color="black", ms=10, mew=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_xticks(sorted(epochs["epoch"].unique()))
    ax.set_title("Trial learning curves (dashed, ending in x: stopped early by ASHA)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _models(entry: dict) -> list[str]:  # a task's models: teacher, student, ...
    return [k for k, v in entry.items() if isinstance(v, dict)]


def _named(keys, key: str, text: str) -> str:  # text, headed by its task's (or teacher's) name if there are several
    return f"{key}: {text}" if len(keys) > 1 else text


def plot_quality(report: dict):
    """Teacher and students side by side on the test set; a panel per task."""
    plt = _plt()
    tasks = report["tasks"]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(7.5, 4 * len(tasks)), squeeze=False)
    for ax, (task, entry) in zip(axes[:, 0], tasks.items()):
        models = _models(entry)
        width = 0.8 / len(models)
        for i, name in enumerate(models):
            values = [entry[name].get(m, 1.0 if m == "agreement" else np.nan) for m in QUALITY]
            bars = ax.bar(np.arange(len(QUALITY)) + i * width, values, width, label=name)
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        ax.set_xticks(np.arange(len(QUALITY)) + width * (len(models) - 1) / 2, [m.replace("_", " ") for m in QUALITY])
        ax.set_ylim(0, 1.18)
        ax.set_ylabel(f"test set ({entry['rows']} rows)")
        ax.set_title(_named(tasks, task, "Quality: teacher vs student (agreement = same prediction as the teacher)"))
        ax.legend(fontsize=8, loc="upper left", ncol=len(models), frameon=False)
    fig.tight_layout()
    return fig


def plot_efficiency(report: dict):
    """Throughput, size and calibration (a panel per task): what the student costs and how honest its confidence is."""
    plt = _plt()
    tasks = report["tasks"]
    panels = [("CPU rows/s (higher is better)", report["rows_per_s"]),
              ("parameters, millions", {n: p * 1e-6 for n, p in report["params"].items()}),
              *[(_named(tasks, task, "calibration error, ECE (lower is better)"),
                 {n: entry[n]["ece"] for n in _models(entry)}) for task, entry in tasks.items()]]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(11, 4.2 * len(panels)), 3.4), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        bars = ax.bar(list(values), list(values.values()), color=[f"C{i}" for i in range(len(values))])  # tab10
        ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=2)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        ax.margins(y=0.15)
    fig.tight_layout()
    return fig


def plot_confusions(report: dict):
    """Row-normalised confusion matrices (a row is a gold label), counts written in the cells; a row per task."""
    plt = _plt()
    tasks = report["tasks"]
    columns = max(len(_models(entry)) for entry in tasks.values())
    fig, axes = plt.subplots(len(tasks), columns, figsize=(3.6 * columns, 3.6 * len(tasks)), squeeze=False)
    for row, (task, entry) in zip(axes, tasks.items()):
        labels = entry["labels"]
        for ax, name in zip(row, _models(entry)):
            counts = np.array(entry[name]["confusion_matrix"], dtype=float)
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
            for (r, c), n in np.ndenumerate(counts):
                ax.text(c, r, f"{int(n)}\n{share[r, c]:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if share[r, c] > 0.6 else "black")
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlabel("predicted")
            ax.set_title(_named(tasks, task, f"{name}\nmacro-recall {entry[name]['macro_recall']:.3f}"), fontsize=9)
        row[0].set_ylabel("gold")
    fig.tight_layout()
    return fig


def teacher_confidences(soft_labels: Path) -> list[tuple[TeacherInfo, np.ndarray, np.ndarray]]:
    """Per teacher: (its metadata, max softmax probability per row, predicted class per row)."""
    import pyarrow.parquet as pq

    info = read_soft_label_info(str(soft_labels))
    chunks, rows = {t.name: [] for t in info.teachers}, 0
    for file in info.files:
        table = pq.read_table(file, columns=[t.column for t in info.teachers])
        for t in info.teachers:
            column = table.column(t.column).combine_chunks()
            chunks[t.name].append(column.flatten().to_numpy().astype(np.float32).reshape(len(column), -1))
        rows += table.num_rows
        if rows >= MAX_HISTOGRAM_ROWS:
            break
    probs = {name: softmax(np.concatenate(c)) for name, c in chunks.items()}
    return [(t, probs[t.name].max(axis=1), probs[t.name].argmax(axis=1)) for t in info.teachers]


def plot_soft_labels(teachers: list[tuple[TeacherInfo, np.ndarray, np.ndarray]]):
    """Each teacher's confidence and predicted classes over the labeled corpus; a row per teacher."""
    plt = _plt()
    fig, axes = plt.subplots(len(teachers), 2, figsize=(10, 3.4 * len(teachers)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]})
    for (left, right), (teacher, confidence, predicted) in zip(axes, teachers):
        labels = teacher.labels
        left.hist(confidence, bins=np.linspace(1 / len(labels), 1, 31), color="steelblue", edgecolor="white")
        left.axvline(np.median(confidence), color="crimson", ls="--", label=f"median {np.median(confidence):.2f}")
        left.set_xlabel("teacher confidence (largest softmax probability, T=1)")
        left.set_ylabel("rows")
        left.set_title(_named(teachers, teacher.name, f"Soft labels: how sure the teacher is ({len(confidence):,} rows)"))
        left.legend(fontsize=8)
        share = np.bincount(predicted, minlength=len(labels)) / len(predicted)
        bars = right.bar(labels, share, color="slategray")
        right.bar_label(bars, labels=[f"{s:.1%}" for s in share], fontsize=8)
        right.set_title(_named(teachers, teacher.name, "Teacher's predicted classes"))
        right.set_ylabel("share of rows")
        right.set_ylim(0, max(share) * 1.2)
    fig.tight_layout()
    return fig


def plot_training(histories: dict[str, list[dict]], tasks: list[str]):
    """Training loss and, a panel per task, validation macro-recall per epoch of the models this run trained."""
    plt = _plt()
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(5 * (1 + len(tasks)), 3.4), squeeze=False)
    keys = {"train_loss": "training loss (each model's own loss)"}
    keys.update({"val_macro_recall" if len(tasks) == 1 else f"val_{task}_macro_recall":
                 _named(tasks, task, "validation macro-recall") for task in tasks})
    for ax, (key, title) in zip(axes[0], keys.items()):
        for name, history in histories.items():
            if all(key in h for h in history):
                ax.plot([h["epoch"] for h in history], [h[key] for h in history], marker="o", label=name)
        ax.set(title=title, xlabel="epoch")
        ax.locator_params(axis="x", integer=True)
        if ax.lines:
            ax.legend(fontsize=8)
        else:  # no data.validation: nothing was scored per epoch
            ax.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- the page


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:,.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Page:
    """Collects sections; each figure goes to report/<name>.png and into the page as base64."""

    def __init__(self, png_dir: Path):
        self.png_dir, self.parts = png_dir, []
        png_dir.mkdir(parents=True, exist_ok=True)
        for old in png_dir.glob("*.png"):  # a plot this run no longer has must not linger
            old.unlink()

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        self.parts.append(f"<p class='note'>{html.escape(text)}</p>")

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, name: str, fig, caption: str) -> None:
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(fig)
        (self.png_dir / f"{name}.png").write_bytes(buffer.getvalue())
        data = base64.b64encode(buffer.getvalue()).decode()
        self.parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;
padding:0 16px;color:#222}h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
.note{color:#555;background:#f6f6f6;padding:8px 12px;border-left:4px solid #bbb}table{border-collapse:collapse;
margin:12px 0;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}figure{margin:12px 0}img{max-width:100%}figcaption{color:#555;
font-size:13px}.headline{font-size:18px;margin:12px 0}.headline b{color:#0a6}"""


def _tuning_section(page: _Page, run: RunFolder) -> None:
    import pandas as pd

    page.heading("Tuning")
    if run.tune_dir is None:
        page.note(f"No tuning in this run: no trials.csv in {run.path} or {run.path / 'tune'}. "
                  "`kd-ray tune` searches temperature, alpha and learning rate.")
        return
    trials, epochs = (pd.read_csv(run.tune_dir / name) for name in ("trials.csv", "trial_epochs.csv"))
    summary = json.loads((run.tune_dir / "tune_summary.json").read_text())
    searched, metric = list(summary["best_values"]), summary["metric"]
    gain = "" if summary.get("default_value") is None else (
        f"; the config's own values scored {summary['default_value']:.4f} "
        f"({summary['default_status']}), a gain of {summary['best_value'] - summary['default_value']:+.4f}")
    best_values = ", ".join(f"{k} = {_value(v)}" for k, v in summary["best_values"].items())
    page.raw(f"<p class='headline'>Best of {summary['trials']} trials: <b>{metric} {summary['best_value']:.4f}</b> "
             f"with {html.escape(best_values)}{html.escape(gain)}. {summary['stopped_early']} trials were stopped "
             f"early by ASHA, {summary['errors']} failed.</p>")
    axes = _axes_params(trials, searched)
    if axes is None:
        page.note("No landscape: none of the searched parameters is a number.")
    else:
        page.figure("tuning_landscape", plot_landscape(trials, summary, *axes),
                    "Each point is a trial at its kept epoch (train.keep), as in trials.csv; triangles were stopped early.")
    page.figure("trial_curves", plot_trial_curves(epochs, trials, summary, searched),
                "Validation metric after every epoch of every trial.")
    epoch_cols = sorted(c for c in trials.columns if c.startswith(f"{metric}_epoch"))
    rows = [[r["trial"], *[r[p] for p in searched], r["status"], int(r["epochs"]),
             *[r[c] if r[c] == r[c] else "" for c in epoch_cols], int(r["starts"])] for _, r in trials.iterrows()]
    page.raw(_table(["trial", *searched, "status", "epochs", *[c.replace(f"{metric}_", "") for c in epoch_cols],
                     "starts"], rows))


def _models_section(page: _Page, run: RunFolder) -> None:
    page.heading("Teacher vs student")
    r = run.metrics
    if r is None:
        page.note(f"No evaluation in this run folder (no metrics.json in {run.path}); `kd-ray evaluate` writes one.")
        return
    page.raw(f"<p class='headline'>The {html.escape(headline(r))}, with {r['compression']['student']:.2f}x fewer "
             "parameters.</p>")
    page.figure("quality", plot_quality(r), f"Test set: {r['test']['path']}, {r['test']['rows']} rows.")
    page.figure("efficiency", plot_efficiency(r), f"Throughput measured on CPU, {r['eval']['threads']} threads, "
                f"batch {r['eval']['batch_size']}, max length {r['eval']['max_length']}; median of "
                f"{r['eval']['timing_repeats']} alternating passes.")
    page.figure("confusion", plot_confusions(r), "Confusion matrices on the test set.")
    models = [m for entry in r["tasks"].values() for m in entry.values() if isinstance(m, dict)]  # summary_rows'
    page.raw(_table([*SUMMARY_HEADER, "ECE"], [[*row, m["ece"]] for row, m in zip(summary_rows(r), models)]))
    page.raw(_table(["model", "rows/s", "parameters"], [[n, v, r["params"][n]] for n, v in r["rows_per_s"].items()]))
    if run.histories:
        page.figure("training", plot_training(run.histories, list(r["tasks"])),
                    "Per-epoch training loss and validation metric.")


def _labeling_section(page: _Page, run: RunFolder) -> None:
    page.heading("Labeling")
    if run.soft_labels is None:
        page.note(f"No soft labels in this run folder ({run.path / 'soft_labels'} is absent).")
        return
    manifest = json.loads((run.soft_labels / "_manifest.json").read_text())
    page.raw(_table(["rows", "rows/s", "seconds", "files", "rejected", "truncated"],
                    [[manifest["rows"], manifest["rows_per_s"], manifest["seconds"], len(manifest["files"]),
                      manifest["rejected"], manifest["truncated"]]]))
    teachers = teacher_confidences(run.soft_labels)
    page.figure("soft_labels", plot_soft_labels(teachers), f"Teacher{'s' * (len(teachers) > 1)} "
                f"{', '.join(t.model for t, _, _ in teachers)}: confidence and predicted classes over the labeled corpus.")


def write_report(run_folder: str | Path) -> Path:
    run = RunFolder.find(run_folder)
    if not run.path.is_dir():
        raise FileNotFoundError(f"run folder {run.path} does not exist")
    page = _Page(run.path / "report")
    _models_section(page, run)
    _tuning_section(page, run)
    _labeling_section(page, run)
    out = run.path / "report.html"
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>kd-ray report: {html.escape(run.path.name)}"
                   f"</title><style>{STYLE}</style></head><body><h1>kd-ray report: {html.escape(run.path.name)}</h1>"
                   f"<p class='note'>{html.escape(str(run.path.resolve()))}</p>{''.join(page.parts)}</body></html>")
    return out


def report_main(argv: list[str]) -> int:
    """`kd-ray report RUN_FOLDER [...]`"""
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: kd-ray report RUN_FOLDER [...]   (a folder written by kd-ray run, tune or evaluate)", file=sys.stderr)
        return 2
    for folder in argv:
        if not Path(folder).is_dir():
            print(f"kd-ray report: {folder} is not a folder", file=sys.stderr)
            return 1
        out = write_report(folder)
        print(f"kd-ray report: {out} (plots as PNG in {out.parent / 'report'})")
    return 0


ENTRY_POINTS = {"report": report_main}
