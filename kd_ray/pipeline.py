"""`kd-ray run`: the whole job from one YAML, each stage skipped when its output already matches.

  data.train --finetune--> teacher/ --label (train + transfer)--> soft_labels/
  soft_labels/ --distill--> student/   (and student_alpha0/: the same student without distillation)
               (or, with a `tune:` section, --tune--> tune/, whose best student is the run's student)
  teacher/, student/ --evaluate on data.test--> metrics.json --> report.html, report/*.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kd_ray.config import (DistillConfig, EvaluateConfig, FinetuneConfig, LabelConfig, LabelOutputConfig,
                           PipelineConfig, TeacherConfig, TuneConfig)
from kd_ray.evaluate import run_evaluate, summary_table
from kd_ray.label import run_label
from kd_ray.report import write_report
from kd_ray.storage import absolute_if_local
from kd_ray.train import distill_job, read_run_info, run_distill, run_finetune
from kd_ray.tune import run_tune


def _up_to_date(folder: Path, job_matches) -> bool:
    info = read_run_info(str(folder))
    return info is not None and job_matches(info["job"])


def stage_configs(cfg: PipelineConfig) -> dict:
    """The per-stage configs this run is made of (each could be run alone with its own command)."""
    out = Path(cfg.output)
    teacher_path = cfg.teacher.model or str(out / "teacher")
    stages: dict = {}
    if cfg.teacher.model is None:
        stages["finetune"] = FinetuneConfig(data=cfg.data.train, base_model=cfg.teacher.base_model, labels=cfg.labels,
                                            validation=cfg.data.validation, train=cfg.teacher.train,
                                            output=teacher_path, ray=cfg.ray)
    corpora = [cfg.data.train.path] + ([cfg.data.transfer.path] if cfg.data.transfer else [])
    flat = [p for c in corpora for p in (c if isinstance(c, list) else [c])]
    stages["label"] = LabelConfig(
        corpus=cfg.data.train.model_copy(update={"path": flat, "partial_labels": cfg.data.transfer is not None}),
        teachers=[TeacherConfig(model=teacher_path, max_length=cfg.teacher_max_length)],
        compute=cfg.label,
        # the run folder is the pipeline's own: labels of an older teacher are replaced, not refused
        output=LabelOutputConfig(path=str(out / "soft_labels"), logits_dtype=cfg.logits_dtype, overwrite=True),
        ray=cfg.ray)
    stages["distill"] = DistillConfig(soft_labels=str(out / "soft_labels"), student=cfg.student, loss=cfg.loss,
                                      validation=cfg.data.validation, train=cfg.distill,
                                      output=str(out / "student"), ray=cfg.ray)
    student = str(out / "student")
    if cfg.tune is not None:  # the search replaces the single distillation; its first trial is that one
        stages["tune"] = TuneConfig(distill=stages["distill"], search=cfg.tune, output=str(out / "tune"), ray=cfg.ray)
        student = str(out / "tune" / "student")
    others = {}
    if cfg.baseline_without_distillation:
        stages["distill_alpha0"] = stages["distill"].model_copy(
            update={"loss": cfg.loss.model_copy(update={"alpha": 0.0}), "output": str(out / "student_alpha0")})
        others["student_alpha0"] = str(out / "student_alpha0")
    stages["evaluate"] = EvaluateConfig(test=cfg.data.test, teacher=teacher_path, student=student,
                                        others=others, eval=cfg.eval, output=str(out))
    return stages


def run_pipeline(cfg: PipelineConfig) -> dict:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    stages = stage_configs(cfg)
    timings = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"kd-ray run: stage {name} done in {timings[name]} s", flush=True)
        return result

    if "finetune" in stages:
        ft = stages["finetune"]
        if _up_to_date(Path(ft.output), lambda job: job["base_model"] == absolute_if_local(ft.base_model)
                       and job["train"] == ft.train.model_dump(mode="json") and job["labels"] == ft.labels):
            print(f"kd-ray run: teacher {ft.output} is up to date; skipping finetune", flush=True)
        else:
            timed("finetune", run_finetune, ft)
    summary = timed("label", run_label, stages["label"])
    print(summary.line(), flush=True)
    if "tune" in stages:
        timed("tune", run_tune, stages["tune"])
    for name in ("distill", "distill_alpha0"):
        if name not in stages or (name == "distill" and "tune" in stages):
            continue
        dc = stages[name]
        job, _ = distill_job(dc)
        if _up_to_date(Path(dc.output), lambda old: old == job):
            print(f"kd-ray run: {dc.output} is up to date; skipping {name}", flush=True)
        else:
            timed(name, run_distill, dc)
    report = timed("evaluate", run_evaluate, stages["evaluate"])
    report["timings_s"] = timings
    report["labeling"] = {"rows": summary.rows, "rows_per_s": summary.rows_per_s, "files": summary.files,
                          "rejected": summary.rejected, "truncated": summary.truncated}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    report["report_html"] = str(write_report(out))
    return report


def main(cfg: PipelineConfig) -> dict:
    report = run_pipeline(cfg)
    print(summary_table(report))
    print(f"kd-ray run: student keeps {report['retention']['macro_recall']:.1%} of the teacher's macro-recall at "
          f"{report['speedup']:.2f}x its CPU rows/s. Outputs: {cfg.output} (metrics: {Path(cfg.output) / 'metrics.json'})",
          flush=True)
    print(f"kd-ray run: report: {report['report_html']} (plots as PNG in {Path(cfg.output) / 'report'})", flush=True)
    return report


CONFIGS = {"run": PipelineConfig}
ENTRY_POINTS = {"run": main}
