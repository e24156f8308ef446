"""`kd-ray finetune` and `kd-ray distill`: one Accelerate training loop, run data-parallel by Ray Train.

``train_loop_per_worker`` reads like Accelerate's own examples; the Ray-specific lines are
``get_dataset_shard``, ``get_checkpoint`` and ``report``. ``fit`` hands it to a TorchTrainer.
Each epoch ends with a checkpoint that is also a Hugging Face model folder, so a restarted
run (a replaced worker, or the same command run again) continues from the last epoch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd_ray.config import DistillConfig, EvalSetConfig, FinetuneConfig, RayConfig, TrainArgs
from kd_ray.corpus import task_label_column
from kd_ray.errors import KdRayUserError, ModelError, SoftLabelError
from kd_ray.soft_labels import check_matches, logits_column, read_soft_label_info
from kd_ray.storage import absolute_if_local

TRAIN_STATE = "train_state.pt"
LOG_EVERY_STEPS = 50
DATA_TASK_CPUS = 0.25  # Ray Data tasks that feed the workers; the workers hold most CPUs
RUN_INFO = "kd_ray_train.json"
# train.keep: best ranks checkpoints by this metric: validation macro-recall, -1 for epochs that cannot be kept
KEEP_SCORE = "keep_score"


# ---------------------------------------------------------------------------- per-worker loop


def _batch_arrays(batch: pa.Table, teacher_columns: list[str]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    texts = batch.column("text").to_pylist()
    gold = pc.fill_null(batch.column("label"), -100).to_numpy(zero_copy_only=False).astype(np.int64)
    logits = []
    for col in teacher_columns:
        arr = batch.column(col).combine_chunks()
        values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), -1)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():  # one NaN would silently turn every weight into NaN
            ids = np.array(batch.column("id").to_pylist())[bad][:5].tolist()
            raise SoftLabelError(f"soft labels: {int(bad.sum())} rows of this batch have NaN/Inf in column {col!r} "
                                 f"(ids {ids}); `kd-ray validate` names every file with such rows")
        logits.append(values)
    return texts, gold, logits


def _gold(batch: pa.Table, column: str | None) -> np.ndarray:
    """(rows,) int64 gold indices, -100 where a row has none (or the column is absent)."""
    if column is None or column not in batch.column_names:
        return np.full(batch.num_rows, -100, dtype=np.int64)
    return pc.fill_null(batch.column(column), -100).to_numpy(zero_copy_only=False).astype(np.int64)


def _task_targets(batch: pa.Table, tasks: list[dict], teacher: dict[str, np.ndarray], device):
    """Per task: the (combined) teacher logits and the gold labels of a training batch, as tensors."""
    import torch

    from kd_ray.losses import combine_teacher_logits

    logits = {t["name"]: combine_teacher_logits([torch.as_tensor(teacher[c], device=device) for c in t["teacher_weights"]],
                                                list(t["teacher_weights"].values())) for t in tasks}
    gold = {t["name"]: torch.as_tensor(_gold(batch, t["gold_column"]), device=device) for t in tasks}
    return logits, gold


def _training_batches(shard, tokenizer, args: TrainArgs, seed: int):
    """(rows, padded tensors) of ``args.batch_size`` rows from a worker's shard, shuffled.

    With ``group_by_length`` (transformers' Trainer has the same option) rows are drawn in
    windows of ``length_group`` batches, sorted by token count inside the window and cut into
    batches whose order is shuffled: batches of alike lengths waste little compute on padding,
    and every row is still seen once per epoch.
    """
    from kd_ray.teacher import padded_batches

    group = args.length_group if args.group_by_length else 1
    rng = np.random.default_rng(seed)
    for window in shard.iter_batches(batch_size=args.batch_size * group, batch_format="pyarrow",
                                     local_shuffle_buffer_size=args.shuffle_buffer or None, local_shuffle_seed=seed):
        enc = tokenizer(window.column("text").to_pylist(), truncation=True, max_length=args.max_length)
        order = np.arange(window.num_rows)
        if group > 1:
            order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        batches = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]
        if group > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for idx, tensors in zip(batches, padded_batches(enc, tokenizer, batches)):
            yield window.take(pa.array(idx)), tensors


def predict_logits(model, tokenizer, texts: list[str], *, max_length: int, batch_size: int, device) -> np.ndarray:
    """Logits of ``model`` on ``texts``, length-sorted batches. Returns (n, classes) float32."""
    import torch

    order = np.argsort([len(t) for t in texts])
    out = np.empty((len(texts), model.config.num_labels), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(device)
            out[idx] = model(**enc).logits.float().cpu().numpy()
    return out


def _validate(model, tokenizer, shard, job: dict, device) -> dict[str, float]:
    from kd_ray.metrics import classification_metrics

    from kd_ray.multitask import task_layout

    tasks = job.get("tasks") or [{"name": None, "labels": job["labels"]}]
    columns = {t["name"]: "label" if i == 0 else task_label_column(t["name"]) for i, t in enumerate(tasks)}
    texts, gold = [], {t["name"]: [] for t in tasks}
    for batch in shard.iter_batches(batch_size=1024, batch_format="pyarrow"):
        texts += batch.column("text").to_pylist()
        for t in tasks:
            gold[t["name"]].append(_gold(batch, columns[t["name"]]))
    logits = predict_logits(model, tokenizer, texts, max_length=job["train"]["max_length"], batch_size=64,
                            device=device)
    layout = task_layout({t["name"]: t["labels"] for t in tasks}) if job.get("tasks") else None
    metrics, per_task = {}, []
    for i, t in enumerate(tasks):
        g = np.concatenate(gold[t["name"]])
        task_logits = logits[:, layout[i].start:layout[i].stop] if layout else logits
        m = classification_metrics(task_logits[g >= 0], g[g >= 0], t["labels"])
        per_task.append(m)
        if layout:
            metrics.update({f"val_{t['name']}_{k}": m[k] for k in ("accuracy", "macro_f1", "macro_recall")})
    # one number to select epochs and trials by: the mean over tasks
    metrics.update({f"val_{k}": float(np.mean([m[k] for m in per_task])) for k in ("accuracy", "macro_f1",
                                                                                   "macro_recall")})
    return metrics


def train_loop_per_worker(job: dict[str, Any]) -> None:
    """One data-parallel worker. ``job`` is plain data (see ``_job``), so the loop runs anywhere."""
    import ray.train
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from kd_ray.losses import combine_teacher_logits, compute_loss
    from kd_ray.models import build_student, load_classifier
    from kd_ray.multitask import multitask_loss, task_layout, write_layout
    from kd_ray.students import feed_forward_width, prune_feed_forward

    args = TrainArgs(**job["train"])
    if not args.use_gpu:
        torch.set_num_threads(args.threads_per_worker)
    accelerator = Accelerator(cpu=not args.use_gpu, mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    student = job.get("student") or {}
    # a student narrowed after training: wide_epochs at full width first, then narrowed and trained on
    wide_epochs = student.get("wide_epochs") or 0
    if job["mode"] == "finetune":
        model, tokenizer = load_classifier(job["base_model"], job["labels"], what="base model")
    else:
        model, tokenizer = build_student(student, job["teacher_model"], job["labels"], tasks=job.get("tasks"))
    layout = task_layout({t["name"]: t["labels"] for t in job["tasks"]}) if job.get("tasks") else None
    steps_per_epoch = math.ceil(job["rows"] / args.num_workers / args.batch_size)
    epochs = wide_epochs + args.epochs

    def optimize(net, phase_epochs: int):
        # fused: one kernel over all parameters; on CPU ~10x faster than the default (foreach) step for a
        # 15.6 M-parameter student, which otherwise took a fifth of each epoch (BENCHMARKS.md)
        opt = torch.optim.AdamW(net.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
        steps = steps_per_epoch * phase_epochs
        sched = get_scheduler(args.schedule, opt, num_warmup_steps=int(args.warmup_ratio * steps),
                              num_training_steps=steps)
        prepared, opt = accelerator.prepare(net, opt)
        return prepared, opt, sched

    start_epoch, history, state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRAIN_STATE, weights_only=False)
            weights = load_file(Path(folder) / "model.safetensors")
        start_epoch, history = state["epoch"], state["history"]
        if wide_epochs and start_epoch > wide_epochs:  # saved after narrowing
            prune_feed_forward(model, student["ffn_size"])
        model.load_state_dict(weights, strict=False)
    narrowed = wide_epochs == 0 or start_epoch > wide_epochs
    model, optimizer, scheduler = optimize(model, args.epochs if narrowed else wide_epochs)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])

    loss_cfg = job.get("loss") or {}
    teacher_columns = list(job.get("teacher_weights") or {})
    teacher_weights = list((job.get("teacher_weights") or {}).values())
    train_shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    resumed_from = start_epoch
    for epoch in range(start_epoch, epochs):
        if not narrowed and epoch == wide_epochs:
            bare = accelerator.unwrap_model(model)
            accelerator.free_memory()  # drop the wrapper and optimizer that hold the wide layers
            model, optimizer, scheduler = optimize(prune_feed_forward(bare, student["ffn_size"]), args.epochs)
            narrowed = True
        model.train()
        started, rows, loss_sum, steps, seen_ids = time.perf_counter(), 0, 0.0, 0, []
        for batch, enc in _training_batches(train_shard, tokenizer, args, seed=args.seed * 1000 + epoch):
            texts, gold, teacher = _batch_arrays(batch, teacher_columns)
            logits = model(**{k: v.to(accelerator.device) for k, v in enc.items()}).logits.float()
            gold_t = torch.as_tensor(gold, device=accelerator.device)
            if job["mode"] == "finetune":
                loss = torch.nn.functional.cross_entropy(logits, gold_t, ignore_index=-100)
            elif layout:
                loss, _ = multitask_loss(logits, layout,
                                         *_task_targets(batch, job["tasks"], dict(zip(teacher_columns, teacher)),
                                                        accelerator.device),
                                         {t["name"]: t for t in job["tasks"]})
            else:
                teacher_t = combine_teacher_logits([torch.as_tensor(t, device=accelerator.device) for t in teacher],
                                                   teacher_weights)
                loss = compute_loss(loss_cfg["kind"], logits, teacher_t, gold_t,
                                    temperature=loss_cfg["temperature"], alpha=loss_cfg["alpha"])
            accelerator.backward(loss)
            if args.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            rows += len(texts)
            loss_sum += loss.item()
            steps += 1
            if job.get("record_ids_to"):
                seen_ids += batch.column("id").to_pylist()
            if rank == 0 and steps % LOG_EVERY_STEPS == 0:
                print(f"epoch {epoch + 1}/{epochs} step {steps}/{steps_per_epoch} loss {loss_sum / steps:.4f} "
                      f"{rows * args.num_workers / (time.perf_counter() - started):.1f} samples/s", flush=True)
        if job.get("record_ids_to"):  # test hook: which rows each worker saw
            Path(job["record_ids_to"]).mkdir(parents=True, exist_ok=True)
            (Path(job["record_ids_to"]) / f"epoch{epoch + 1}-rank{rank}.json").write_text(json.dumps(seen_ids))
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(steps, 1), "rows": rows,
                   "samples_per_s": rows / seconds if seconds else 0.0, "rank": rank,
                   "resumed_from_epoch": resumed_from}
        if wide_epochs:
            metrics["ffn_size"] = feed_forward_width(accelerator.unwrap_model(model))
        if rank == 0 and job.get("has_validation"):
            metrics.update(_validate(accelerator.unwrap_model(model), tokenizer,
                                     ray.train.get_dataset_shard("validation"), job, accelerator.device))
            if keeps_best(job):  # a wide epoch's model is not the student asked for: never the best
                metrics[KEEP_SCORE] = metrics["val_macro_recall"] if narrowed else -1.0
        history.append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:  # one copy of the state is enough; every worker reports its metrics
                accelerator.unwrap_model(model).save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                if layout:
                    write_layout(folder, layout)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "epoch": epoch + 1, "history": history, "rng": torch.get_rng_state()},
                           Path(folder) / TRAIN_STATE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
        if job.get("stop_after_epoch") == epoch + 1:  # lets tests stop a run midway, as a crash would
            raise SystemExit(f"stopping after epoch {epoch + 1} as asked")


# ---------------------------------------------------------------------------- driver side


TEST_HOOKS = ("stop_after_epoch", "record_ids_to")


def run_name(output: str, job: dict) -> str:
    stable = {k: v for k, v in job.items() if k not in TEST_HOOKS}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{Path(output).name}-{digest}"


def _storage_path(output: str, storage_path: str | None) -> str:
    if storage_path:
        return storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    return str(Path(output).resolve().parent / "ray_train")


def build_trainer(job: dict, datasets: dict, args: TrainArgs, name: str, storage_path: str, callbacks=()):
    """The TorchTrainer that runs ``train_loop_per_worker``; a run with ``name`` already in
    ``storage_path`` resumes from its last checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                               resources_per_worker={"CPU": args.num_cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            # keep: best adds the best-scoring checkpoint to those kept (Ray always keeps the latest, to resume)
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=KEEP_SCORE if keeps_best(job) else None),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def fit(job: dict, datasets: dict, args: TrainArgs, output: str, storage_path: str | None, ray_cfg: RayConfig):
    """Run ``train_loop_per_worker`` on Ray Train and export the checkpoint ``train.keep`` names to ``output``."""
    from kd_ray.runtime import init_ray

    init_ray(ray_cfg)
    name = run_name(output, job)
    result = build_trainer(job, datasets, args, name, _storage_path(output, storage_path)).fit()
    if result.checkpoint is None:
        raise KdRayUserError(f"training run {name} finished without a checkpoint; see the Ray Train logs above")
    chosen = result.checkpoint
    if keeps_best(job):
        chosen = max(result.best_checkpoints, key=lambda reported: keep_rank(reported[1]))[0]
    export_checkpoint(chosen, output, job, latest=result.checkpoint)
    return result


def keeps_best(job: dict) -> bool:
    """Whether the run exports its best epoch (train.keep 'best', or 'auto' with validation data)."""
    keep = job["train"].get("keep", "last")
    return keep == "best" or (keep == "auto" and bool(job.get("has_validation")))


def keep_rank(metrics: dict) -> tuple[float, int]:
    """How ``train.keep: best`` ranks an epoch's metrics: by keep score, the earliest of equals."""
    score = metrics.get(KEEP_SCORE)
    return (score if score is not None and score == score else -1.0), -metrics["epoch"]  # NaN: not scored


def _train_state(checkpoint) -> dict:
    import torch

    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / TRAIN_STATE, weights_only=False)


def export_checkpoint(checkpoint, output: str, job: dict, latest=None) -> None:
    """Copy the checkpoint's Hugging Face folder to ``output``, without the optimizer state; the run's
    history is read from ``latest`` (the run's last checkpoint) when another epoch's model is exported."""
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(TRAIN_STATE))
    state = _train_state(checkpoint)
    same = latest is None or latest.path == checkpoint.path
    history = (state if same else _train_state(latest))["history"]
    job = {k: v for k, v in job.items() if k not in TEST_HOOKS}
    info = {"mode": job["mode"], "labels": job["labels"], "history": history, "exported_epoch": state["epoch"],
            "job": job}
    (tmp / RUN_INFO).write_text(json.dumps(info, indent=2, default=str))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the model folder appears whole or not at all


def read_run_info(folder: str) -> dict | None:
    path = Path(folder) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def _labeled_rows(batch: pa.Table) -> pa.Table:
    """Finetune learns from rows that have a gold label and a usable text."""
    return batch.filter(pc.and_(batch.column("label").is_valid(), batch.column("reject_reason").is_null()))


def _gold_rows(batch: pa.Table, columns: list[str] = ("label",)) -> pa.Table:
    """Rows with a gold label in any of ``columns``."""
    return batch.filter(functools.reduce(pc.or_, [batch.column(c).is_valid() for c in columns]))


def _count_gold_rows(info) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(info.files, format="parquet").count_rows(filter=pads.field("label").is_valid())


def _common_job(args: TrainArgs) -> dict[str, Any]:
    return {"train": args.model_dump(mode="json")}


def run_finetune(cfg: FinetuneConfig, *, stop_after_epoch: int | None = None):
    from kd_ray.ray_data import corpus_dataset

    labels = list(cfg.labels)
    train_ds = corpus_dataset(cfg.data, {n: i for i, n in enumerate(labels)}, num_cpus=DATA_TASK_CPUS)
    train_ds = train_ds.map_batches(_labeled_rows, batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)
    rows = train_ds.count()
    if rows == 0:
        raise KdRayUserError(f"data.path {cfg.data.path} has no rows with a gold label in column "
                             f"{cfg.data.label_column!r}; finetune needs labeled rows")
    datasets = {"train": train_ds}
    if cfg.validation:
        datasets["validation"] = corpus_dataset(cfg.validation.as_corpus(), {n: i for i, n in enumerate(labels)},
                                                num_cpus=DATA_TASK_CPUS)
    job = {**_common_job(cfg.train), "mode": "finetune", "base_model": absolute_if_local(cfg.base_model), "labels": labels,
           "rows": rows, "has_validation": cfg.validation is not None, "stop_after_epoch": stop_after_epoch,
           "data": cfg.data.model_dump(mode="json")}
    return fit(job, datasets, cfg.train, cfg.output, cfg.storage_path, cfg.ray)


def _task_jobs(cfg: DistillConfig, info) -> list[dict[str, Any]]:
    """Per task of a multi-task student: its labels, gold column, teacher columns and loss settings."""
    by_task: dict[str, list[dict]] = {}
    for t in info.teachers:
        by_task.setdefault(t["task"], []).append(t)
    gold_columns = {task: task_label_column(task) for task in info.metadata.get("task_labels") or {}}
    if info.metadata.get("label_task"):
        gold_columns[info.metadata["label_task"]] = "label"
    jobs = []
    for task, task_cfg in cfg.tasks.items():
        if task not in by_task:
            raise SoftLabelError(f"tasks.{task}: the soft labels at {cfg.soft_labels} have no label column for task "
                                 f"{task!r}; their teachers label tasks {sorted(by_task)}")
        named = {t["name"]: t for t in by_task[task]}
        weights = task_cfg.teachers or {name: 1.0 for name in named}
        wrong = sorted(set(weights) - set(named))
        if wrong:
            raise SoftLabelError(f"tasks.{task}.teachers names {wrong}, which are not teachers of task {task!r} in "
                                 f"{cfg.soft_labels}; its teachers are {sorted(named)}")
        id2labels = {name: [named[name]["id2label"][str(i)] for i in range(len(named[name]["id2label"]))]
                     for name in weights}
        labels = next(iter(id2labels.values()))
        for name, other in id2labels.items():
            if other != labels:
                raise SoftLabelError(f"tasks.{task}: teachers {next(iter(id2labels))!r} and {name!r} predict different "
                                     f"labels ({labels} vs {other}); one head cannot learn from both")
        jobs.append({"name": task, "labels": labels, "gold_column": gold_columns.get(task),
                     "teacher_weights": {logits_column(n): w for n, w in weights.items()},
                     "teacher_model": named[next(iter(weights))]["model"],
                     "kind": task_cfg.kind or cfg.loss.kind,
                     "temperature": task_cfg.temperature if task_cfg.temperature is not None else cfg.loss.temperature,
                     "alpha": task_cfg.alpha if task_cfg.alpha is not None else cfg.loss.alpha,
                     "weight": task_cfg.weight})
    return jobs


def distill_job(cfg: DistillConfig) -> tuple[dict, Any]:
    """Check the soft labels against the student config; return the job and soft-label info."""
    info = read_soft_label_info(cfg.soft_labels)
    if cfg.tasks is not None:
        return _multitask_distill_job(cfg, info), info
    names = [t["name"] for t in info.teachers]
    weights = cfg.loss.teachers or {names[0]: 1.0}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise SoftLabelError(f"loss.teachers names {unknown}, but the soft labels at {cfg.soft_labels} hold "
                             f"teachers {names}")
    first = info.teacher(next(iter(weights)))
    labels = [first["id2label"][str(i)] for i in range(len(first["id2label"]))]
    for name in weights:
        check_matches(info, id2label=labels, teacher_name=name)
    gold_only = cfg.loss.alpha == 0  # no distillation term: rows without gold would contribute nothing
    rows = _count_gold_rows(info) if gold_only else info.num_rows
    if rows == 0:
        what = "rows with a gold label (alpha=0 trains on gold labels only)" if gold_only else "rows"
        raise SoftLabelError(f"soft labels at {cfg.soft_labels} hold no {what}: the training set is empty")
    local = cfg.student.model and cfg.student.model.startswith((".", "/", "~"))
    if local and not Path(cfg.student.model).expanduser().exists():
        raise ModelError(f"student.model {cfg.student.model} does not exist")
    if cfg.student.kind == "cut" and cfg.student.model is None and len(weights) > 1:
        raise KdRayUserError("student.kind=cut with several teachers needs student.model: which teacher to cut")
    job = {**_common_job(cfg.train), "mode": "distill", "labels": labels, "rows": rows, "gold_only": gold_only,
           "student": {**cfg.student.model_dump(mode="json"), "model": absolute_if_local(cfg.student.model)},
           "teacher_model": first["model"],
           "loss": cfg.loss.model_dump(mode="json"),
           "teacher_weights": {logits_column(n): w for n, w in weights.items()},
           "soft_labels_hash": info.metadata["config_hash"], "soft_label_files": info.files_digest,
           "has_validation": cfg.validation is not None}
    return job, info


def _multitask_distill_job(cfg: DistillConfig, info) -> dict:
    import pyarrow.dataset as pads

    tasks = _task_jobs(cfg, info)
    gold_only = all(t["alpha"] == 0 for t in tasks)  # no distillation term anywhere: unlabeled rows add nothing
    rows = info.num_rows
    if gold_only:
        golds = [pads.field(t["gold_column"]).is_valid() for t in tasks if t["gold_column"]]
        rows = pads.dataset(info.files, format="parquet").count_rows(
            filter=functools.reduce(lambda a, b: a | b, golds)) if golds else 0
    if rows == 0:
        raise SoftLabelError(f"soft labels at {cfg.soft_labels} hold no rows to train on"
                             + (" with a gold label (every task has alpha=0)" if gold_only else ""))
    joint = [f"{t['name']}:{label}" for t in tasks for label in t["labels"]]
    return {**_common_job(cfg.train), "mode": "distill", "labels": joint, "tasks": tasks, "rows": rows,
            "gold_only": gold_only, "student": {**cfg.student.model_dump(mode="json"),
                                                "model": absolute_if_local(cfg.student.model)},
            "teacher_model": tasks[0]["teacher_model"], "loss": cfg.loss.model_dump(mode="json"),
            "teacher_weights": {c: w for t in tasks for c, w in t["teacher_weights"].items()},
            "gold_columns": [t["gold_column"] for t in tasks if t["gold_column"]],
            "soft_labels_hash": info.metadata["config_hash"], "soft_label_files": info.files_digest,
            "has_validation": cfg.validation is not None}


def distill_datasets(cfg: DistillConfig, job: dict, info) -> dict:
    """Ray Datasets a distillation reads: the soft labels (split across workers) and the validation set."""
    from kd_ray.ray_data import parquet_files_dataset

    gold_columns = job.get("gold_columns", ["label"])
    columns = list(dict.fromkeys(["id", "text", "label", *gold_columns, *job["teacher_weights"]]))
    train_ds = parquet_files_dataset(info.files, columns, num_cpus=DATA_TASK_CPUS)
    if job["gold_only"]:
        train_ds = train_ds.map_batches(_gold_rows, fn_kwargs={"columns": gold_columns}, batch_format="pyarrow",
                                        num_cpus=DATA_TASK_CPUS)
    datasets = {"train": train_ds}
    if cfg.validation:
        datasets["validation"] = validation_dataset(cfg.validation, job)
    return datasets


def validation_dataset(validation: EvalSetConfig, job: dict):
    """The validation set, with a gold column per task for a multi-task student."""
    from kd_ray.ray_data import corpus_dataset

    if not job.get("tasks"):
        return corpus_dataset(validation.as_corpus(), {n: i for i, n in enumerate(job["labels"])},
                              num_cpus=DATA_TASK_CPUS)
    first, *others = job["tasks"]
    missing = [t["name"] for t in others if t["name"] not in validation.task_label_columns]
    if missing:
        raise KdRayUserError(f"validation.task_label_columns needs the gold column of tasks {missing} (the first "
                             f"task, {first['name']!r}, reads validation.label_column)")
    return corpus_dataset(validation.as_corpus(), {n: i for i, n in enumerate(first["labels"])},
                          num_cpus=DATA_TASK_CPUS,
                          task_labels={t["name"]: {n: i for i, n in enumerate(t["labels"])} for t in others})


def run_distill(cfg: DistillConfig, *, stop_after_epoch: int | None = None, record_ids_to: str | None = None):
    job, info = distill_job(cfg)
    job.update(stop_after_epoch=stop_after_epoch, record_ids_to=record_ids_to)
    return fit(job, distill_datasets(cfg, job, info), cfg.train, cfg.output, cfg.storage_path, cfg.ray)


def _print_result(stage: str, output: str) -> None:
    info = read_run_info(output)
    epoch = info.get("exported_epoch") or len(info["history"])
    kept = info["history"][epoch - 1] if info["history"] else {}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in kept.items() if isinstance(v, float))
    print(f"kd-ray {stage}: {len(info['history'])} epochs, exported epoch {epoch}: {shown} -> {output}", flush=True)


def finetune_main(cfg: FinetuneConfig) -> None:
    run_finetune(cfg)
    _print_result("finetune", cfg.output)


def distill_main(cfg: DistillConfig) -> None:
    run_distill(cfg)
    _print_result("distill", cfg.output)


CONFIGS = {"finetune": FinetuneConfig, "distill": DistillConfig}
ENTRY_POINTS = {"finetune": finetune_main, "distill": distill_main}
