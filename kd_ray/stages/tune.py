"""`kd-ray tune`: a Ray Tune search over distillation hyperparameters, one Ray Train run per trial.

Train V2's pattern: each Tune trial runs ``_trial``, a driver function that builds a TorchTrainer
for its values and passes the workers' per-epoch reports on to Tune (``TuneReportCallback``);
ASHA stops trials that trail at epoch milestones. Every trial reads the same soft-label Parquet.
An interrupted search resumes when the same command runs again (``Tuner.restore``): finished
trials are kept, unfinished ones continue from their last epoch checkpoint.

Outputs, in ``output``: trials.csv (one row per trial), trial_epochs.csv (one row per trial and
epoch), best_config.yaml (a config `kd-ray distill` accepts), student/ (the best trial's model),
tune_summary.json, and experiment/ (Ray Tune's own state).
"""

from __future__ import annotations

import copy
import functools
import json
import operator
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kd_ray.config import TUNE_ALIASES, DistillConfig, SearchConfig, TuneConfig, _set_dotted, dump_config
from kd_ray.console import say
from kd_ray.data.storage import absolute_if_local
from kd_ray.errors import KdRayUserError, unwrap_user_error
from kd_ray.runtime import init_ray
from kd_ray.stages.plan import distill_plan
from kd_ray.stages.train import KEEP_SCORE, build_trainer, distill_datasets, export_checkpoint, keep_rank, run_name

EXPERIMENT = "experiment"
SPEC_FILE = "tune_spec.json"
# One line per start of a trial, in the run folder (Tune may recreate a trial's own folder on restore):
# more than one line for a trial means it was retried or resumed.
STARTS_FILE = "trial_starts.jsonl"


def searched_paths(search: SearchConfig) -> dict[str, str]:
    """Search-space name -> dotted path in the distill config."""
    return {name: TUNE_ALIASES.get(name, name) for name in search.space}


def param_space(search: SearchConfig) -> dict[str, Any]:
    from ray import tune

    make = {"uniform": lambda s: tune.uniform(s.low, s.high), "loguniform": lambda s: tune.loguniform(s.low, s.high),
            "choice": lambda s: tune.choice(s.values), "grid": lambda s: tune.grid_search(s.values)}
    return {path: make[search.space[name].distribution](search.space[name])
            for name, path in searched_paths(search).items()}


def trial_config(base: dict, values: dict[str, Any]) -> DistillConfig:
    """The distill config a trial runs: ``base`` with the trial's values set at their dotted paths."""
    tree = copy.deepcopy(base)
    for path, value in values.items():
        _set_dotted(tree, path, value)
    return DistillConfig.model_validate(tree)


def _trial(values: dict[str, Any], base: dict, storage_path: str, starts_log: str) -> None:
    """One Tune trial: a whole Ray Train distillation run with this trial's values (the Train V2 driver)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, values)
    plan, info = distill_plan(cfg)
    trial = trial_name(ray.tune.get_context().get_trial_id())
    with open(starts_log, "a") as log:  # one short line: appends do not interleave
        log.write(json.dumps({"trial": trial, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    print(f"kd-ray tune: {trial} started: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in values.items()), flush=True)
    # The run name is a hash of the plan: a trial restarted after a crash resumes its own Train run.
    trainer = build_trainer(plan, distill_datasets(cfg, plan, info), run_name("trial", plan), storage_path,
                            callbacks=[TuneReportCallback()])
    trainer.fit()


def _with_absolute_paths(cfg: DistillConfig) -> DistillConfig:
    """Trials run in their own trial folders: relative paths must not depend on the working directory."""
    update = {"soft_labels": absolute_if_local(cfg.soft_labels),
              "student": cfg.student.model_copy(update={"model": absolute_if_local(cfg.student.model)})}
    if cfg.validation:
        update["validation"] = cfg.validation.model_copy(update={"path": absolute_if_local(cfg.validation.path)})
    return cfg.model_copy(update=update)


def trial_name(trial_id: str) -> str:
    """``trial_00003`` for Tune's ``3c2a1_00003``: the index in which Tune created the trial."""
    return f"trial_{trial_id.rsplit('_', 1)[-1]}"


def trial_dirname(trial) -> str:
    return trial_name(trial.trial_id)  # the values live in trials.csv, not in the folder name


def trial_of_dir(dirname: str) -> str:
    """``trial_00002`` for its folder, also when Tune named it ``trial_00002_6d8d``: a resumed search
    re-creates a trial that started after Tune last saved its state, finds the killed run's folder
    in the way and adds a suffix."""
    match = re.fullmatch(r"(trial_\d+)(_[0-9a-f]+)?", dirname)
    return match.group(1) if match else dirname


def _runs_default_first(search: SearchConfig) -> bool:
    """Trial 0 runs the distill config's own values, unless a grid fixes which points run."""
    return search.include_default and not any(s.distribution == "grid" for s in search.space.values())


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value  # numpy scalar from pandas -> Python


def _spec(cfg: TuneConfig) -> dict:
    return {"distill": cfg.distill.model_dump(mode="json"), "search": cfg.search.model_dump(mode="json")}


def _saved_spec(path: Path) -> dict | None:
    """The spec a search was started with, read through today's config models: a field added to kd-ray
    since then takes its default, so the search still resumes; None if it no longer validates."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    try:
        return {"distill": DistillConfig.model_validate(saved["distill"]).model_dump(mode="json"),
                "search": SearchConfig.model_validate(saved["search"]).model_dump(mode="json")}
    except (KeyError, ValueError):
        return None


def grace_period(cfg: TuneConfig) -> int:
    """Epochs before ASHA may stop a trial: search.grace_period, but a student narrowed after
    training (student.wide_epochs) is first judged at its final width (after student.narrow_steps)."""
    first_at_final_width = cfg.distill.student.epochs_before_final_width + 1
    return min(max(cfg.search.grace_period, first_at_final_width), cfg.distill.total_epochs)


def _tuner(cfg: TuneConfig, out: Path, trainable):
    """A new Tuner, or the interrupted one restored from ``out/experiment``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    experiment, spec = out / EXPERIMENT, _spec(cfg)
    if tune.Tuner.can_restore(str(experiment)):
        if _saved_spec(out / SPEC_FILE) == spec:
            say(f"kd-ray tune: resuming the search in {experiment}: finished trials are kept")
            return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        if not cfg.overwrite:
            raise KdRayUserError(f"{out} holds a search with another config ({out / SPEC_FILE}); choose another "
                                 f"output, or set overwrite: true (flag --overwrite true) to start over there")
        say(f"kd-ray tune: overwrite: deleting the earlier search in {out}")
        for old in (experiment, out / "ray_train"):
            shutil.rmtree(old, ignore_errors=True)
        (out / STARTS_FILE).unlink(missing_ok=True)
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2))

    search, base = cfg.search, cfg.distill.model_dump(mode="json")
    points = ([{path: functools.reduce(operator.getitem, path.split("."), base)  # the distill config's own values
                for path in searched_paths(search).values()}] if _runs_default_first(search) else None)
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.distill.total_epochs, grace_period=grace_period(cfg),
                               reduction_factor=search.reduction_factor)
                 if search.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space=param_space(search),
        tune_config=tune.TuneConfig(
            metric=search.metric, mode="max", num_samples=search.num_samples, scheduler=scheduler,
            # BasicVariantGenerator takes the concurrency limit itself (TuneConfig's applies to Searchers only)
            search_alg=BasicVariantGenerator(points_to_evaluate=points, random_state=search.seed,
                                             max_concurrent=search.max_concurrent_trials),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out),
                                  failure_config=tune.FailureConfig(max_failures=search.max_failures)),
    )


def trials_tables(grid, cfg: TuneConfig):
    """(per-trial table, per-epoch table) as pandas DataFrames, trials in the order they were created."""
    import pandas as pd

    paths, metric, epochs = searched_paths(cfg.search), cfg.search.metric, cfg.distill.total_epochs
    trials, per_epoch = [], []
    starts = trial_starts(Path(cfg.output).resolve())
    for result in grid:
        trial_id = trial_of_dir(Path(result.path).name)
        values = {name: result.config.get(path) for name, path in paths.items()}
        history = result.metrics_dataframe
        rows = []
        if history is not None and "epoch" in history:
            # a resumed trial may report an epoch twice; its last report counts
            history = history.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
            rows = history.to_dict("records")
        for r in rows:
            per_epoch.append({"trial": trial_id, **values, "epoch": int(r["epoch"]), "train_loss": r.get("train_loss"),
                              **{k: r.get(k) for k in ("val_macro_recall", "val_macro_f1", "val_accuracy", KEEP_SCORE)},
                              "checkpoint_path": r.get("checkpoint_path")})
        done = int(rows[-1]["epoch"]) if rows else 0
        status = "error" if result.error else ("completed" if done >= epochs else "stopped early")
        # the student this trial exports (a search always has validation data: 'auto' is 'best')
        kept = kept_epoch(rows, best=cfg.distill.train.keep != "last") if rows else None
        trials.append({"trial": trial_id, **values, "status": status, "epochs": done,
                       metric: kept.get(metric) if kept else None,
                       "kept_epoch": int(kept["epoch"]) if kept else None,
                       **{f"{metric}_epoch{int(r['epoch'])}": r.get(metric) for r in rows},
                       "starts": starts.get(trial_id, 0),
                       "error": _error_line(result.error)})
    table = pd.DataFrame(trials).sort_values("trial").reset_index(drop=True)  # creation order
    return table, pd.DataFrame(per_epoch)


def kept_epoch(history: list[dict], best: bool) -> dict:
    """The epoch whose model a trial exports, picked as ``kd_ray.stages.train.fit`` picks it; the last where
    no epoch was scored (a trial trained before train.keep existed, resumed now: only its last
    checkpoints are kept)."""
    scored = best and any(keep_rank(r)[0] >= 0 for r in history)
    return max(history, key=keep_rank) if scored else history[-1]


def trial_starts(out: Path) -> dict[str, int]:
    """How many times each trial started, from ``out/trial_starts.jsonl``."""
    log = out / STARTS_FILE
    lines = log.read_text().splitlines() if log.is_file() else []
    return dict(Counter(json.loads(line)["trial"] for line in lines if line.strip()))


def _error_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    user_error = unwrap_user_error(error)
    return str(user_error) if user_error else f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}"


def run_tune(cfg: TuneConfig) -> dict:
    import ray.train
    from ray import tune

    out = Path(cfg.output).resolve()
    distill_plan(cfg.distill)  # checks the soft labels and the student before any trial starts
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray)
    base = _with_absolute_paths(cfg.distill).model_dump(mode="json")
    trainable = tune.with_parameters(_trial, base=base, storage_path=str(out / "ray_train"),
                                     starts_log=str(out / STARTS_FILE))
    trainable = tune.with_resources(trainable, {"CPU": cfg.search.trial_cpus})
    tuner = _tuner(cfg, out, trainable)
    say(f"kd-ray tune: searching {sorted(cfg.search.space)} for the best {cfg.search.metric}. If this run is "
          f"interrupted, run the same command again: it resumes from {out / EXPERIMENT}")
    grid = tuner.fit()

    table, epochs_table = trials_tables(grid, cfg)
    table.to_csv(out / "trials.csv", index=False)
    epochs_table.to_csv(out / "trial_epochs.csv", index=False)
    metric = cfg.search.metric
    finished = table[(table["status"] == "completed") & table[metric].notna()]
    if finished.empty:
        errors = table["error"].dropna()
        raise KdRayUserError(f"no trial finished all {cfg.distill.total_epochs} epochs; see {out / 'trials.csv'}"
                             + (f"; the first error: {errors.iloc[0]}" if len(errors) else ""))
    best = finished.loc[finished[metric].idxmax()]  # first of equals: the default trial wins ties
    best_cfg = trial_config(base, {path: _plain(best[name]) for name, path in searched_paths(cfg.search).items()})
    best_cfg = best_cfg.model_copy(update={"output": str(out / "student")})
    runs = epochs_table[epochs_table["trial"] == best["trial"]].sort_values("epoch")
    kept = runs[runs["epoch"] == best["kept_epoch"]].iloc[-1]
    plan, _ = distill_plan(best_cfg)
    export_checkpoint(ray.train.Checkpoint(kept["checkpoint_path"]), best_cfg.output, plan,
                      latest=ray.train.Checkpoint(runs.iloc[-1]["checkpoint_path"]))
    (out / "best_config.yaml").write_text(
        f"# kd-ray distill --config {out / 'best_config.yaml'}\n"
        f"# best of {len(table)} trials by {metric} = {best[metric]:.4f} (trial {best['trial']})\n"
        + dump_config(best_cfg))
    default = table.iloc[0] if _runs_default_first(cfg.search) else None
    summary = {"metric": metric, "best_trial": best["trial"], "best_value": float(best[metric]),
               "best_values": {n: _plain(best[n]) for n in cfg.search.space},
               "default_trial": default["trial"] if default is not None else None,
               "default_value": float(default[metric]) if default is not None and default[metric] == default[metric]
               else None,
               "default_status": default["status"] if default is not None else None,
               "trials": len(table), "stopped_early": int((table["status"] == "stopped early").sum()),
               "errors": int((table["status"] == "error").sum()), "student": best_cfg.output}
    (out / "tune_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(cfg: TuneConfig) -> dict:
    import pandas as pd

    summary = run_tune(cfg)
    table = pd.read_csv(Path(cfg.output) / "trials.csv")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        say(table.drop(columns="error").to_string(index=False))
    say(f"kd-ray tune: best {summary['metric']} {summary['best_value']:.4f} with {summary['best_values']} "
          f"({summary['trials']} trials, {summary['stopped_early']} stopped early by ASHA, {summary['errors']} failed). "
          f"Student: {summary['student']}; config: {Path(cfg.output) / 'best_config.yaml'}")
    return summary


ENTRY_POINTS = {"tune": main}
