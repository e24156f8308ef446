"""`kd-ray finetune` and `kd-ray distill`: one Accelerate training loop, run data-parallel by Ray Train.

``train_loop_per_worker`` reads like Ray's Accelerate example: build, restore, then per epoch
train -> validate -> checkpoint. It runs a ``TrainPlan`` (kd_ray.stages.plan): a fine-tune, a student of
one task and a multi-task student are the same loop; what a plan adds to it (a narrowing schedule, a representation
term) is a component (kd_ray.models.components) that the loop calls through a few hooks. The Ray-specific lines are
``get_dataset_shard``, ``get_checkpoint`` and ``report``; ``fit`` hands the loop to a TorchTrainer.
Each epoch ends with a checkpoint that is also a Hugging Face model folder, so a restarted run
(a replaced worker, or the same command run again) continues from the last epoch.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd_ray.config import DistillConfig, FinetuneConfig, RayConfig, TrainArgs
from kd_ray.console import say
from kd_ray.data.corpus import READ_ROWS, task_label_column
from kd_ray.data.ray_data import corpus_dataset, soft_label_dataset
from kd_ray.errors import KdRayUserError, ModelError, SoftLabelError
from kd_ray.models.components import COMPONENTS
from kd_ray.models.inference import encode, encoder, padded_batches, predict_logits
from kd_ray.models.loading import build_student, load_classifier
from kd_ray.models.losses import NO_GOLD, combine_teacher_logits, multitask_loss
from kd_ray.models.metrics import classification_metrics
from kd_ray.models.multitask import with_head, write_layout
from kd_ray.runtime import init_ray
from kd_ray.stages.plan import TrainPlan, distill_plan, finetune_plan

TRAIN_STATE = "train_state.pt"
RNG_STATE = "rng_state_rank{rank}.pt"  # every worker saves its own random state into the shared checkpoint
LOG_EVERY_STEPS = 50
DATA_TASK_CPUS = 0.25  # Ray Data tasks that feed the workers; the workers hold most CPUs
VALIDATION_BATCH = 64  # texts per forward pass when a worker scores the validation set
RUN_INFO = "kd_ray_train.json"
# train.keep: best ranks checkpoints by this metric: validation macro-recall, -1 for epochs that cannot be kept
KEEP_SCORE = "keep_score"


# ---------------------------------------------------------------------------- per-worker loop


def build_model(plan: TrainPlan):
    """The model a plan trains, and its tokenizer: the base model with the plan's labels (finetune), or
    the student for its first task, its output widened to every task's labels."""
    if plan.student is None:
        return load_classifier(plan.base_model, plan.labels, what="base model")
    first = plan.tasks[0]
    net, tokenizer = build_student(plan.student, first.teacher_model, list(first.labels))
    if plan.labels != list(first.labels):  # one head per task: the cut teacher's head becomes the first's
        net = with_head(net, plan.labels, rows=range(len(first.labels)))
    return net, tokenizer


def _targets(batch: pa.Table, plan: TrainPlan, device) -> tuple[dict, dict]:
    """Per task: the teachers' combined logits (None for a task without teachers) and the gold indices
    (NO_GOLD where a row has none), as tensors."""
    import torch

    teacher = {c: _float_column(batch, c, device) for c in plan.teacher_columns}
    logits = {t.name: combine_teacher_logits([teacher[c] for c in t.teachers], list(t.teachers.values()))
              if t.teachers else None for t in plan.tasks}
    gold = {t.name: torch.as_tensor(_gold(batch, t.gold_column), device=device) for t in plan.tasks}
    return logits, gold


def _float_column(batch: pa.Table, column: str, device):
    """(rows, width) float32 tensor of a list column (teacher logits, a stored representation)."""
    import torch

    arr = batch.column(column).combine_chunks()
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), -1)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():  # one NaN would silently turn every weight into NaN
        ids = np.array(batch.column("id").to_pylist())[bad][:5].tolist()
        raise SoftLabelError(f"soft labels: {int(bad.sum())} rows of this batch have NaN/Inf in column {column!r} "
                             f"(ids {ids}); `kd-ray validate` names every file with such rows")
    return torch.as_tensor(values, device=device)


def _gold(batch: pa.Table, column: str | None) -> np.ndarray:
    """(rows,) int64 gold indices, NO_GOLD where a row has none (or the column is absent)."""
    if column is None or column not in batch.column_names:
        return np.full(batch.num_rows, NO_GOLD, dtype=np.int64)
    return pc.fill_null(batch.column(column), NO_GOLD).to_numpy(zero_copy_only=False).astype(np.int64)


def _training_batches(shard, tokenizer, args: TrainArgs, seed: int):
    """(rows, padded tensors) of ``args.batch_size`` rows from a worker's shard, shuffled.

    With ``group_by_length`` (transformers' Trainer has the same option) rows are drawn in
    windows of ``length_group`` batches, sorted by token count inside the window and cut into
    batches whose order is shuffled: batches of alike lengths waste little compute on padding,
    and every row is still seen once per epoch.
    """
    group = args.length_group if args.group_by_length else 1
    rng = np.random.default_rng(seed)
    backend = encoder(tokenizer, args.max_length)
    for window in shard.iter_batches(batch_size=args.batch_size * group, batch_format="pyarrow",
                                     local_shuffle_buffer_size=args.shuffle_buffer or None, local_shuffle_seed=seed):
        ids, _ = encode(tokenizer, window.column("text").to_pylist(), args.max_length, backend)
        order = np.arange(window.num_rows)
        if group > 1:
            order = np.argsort(np.diff(ids.offsets.to_numpy()), kind="stable")
        batches = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]
        if group > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for idx, tensors in zip(batches, padded_batches(ids, tokenizer, batches)):
            yield window.take(pa.array(idx)), tensors


@dataclass
class Run:
    """A worker's training state: what the loop's steps share."""

    plan: TrainPlan
    accelerator: Any
    model: Any
    tokenizer: Any
    rank: int
    optimizer: Any = None
    scheduler: Any = None
    epoch: int = 0  # epochs done
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    checkpoint_folder: str | None = None  # the last one reported (local mode: Ray Train copies it nowhere)
    components: list = field(default_factory=list)  # kd_ray.models.components: a narrowing schedule, loss terms

    @property
    def bare_model(self):
        return self.accelerator.unwrap_model(self.model)


def build(plan: TrainPlan):
    """The Accelerator and a worker's ``Run`` with the plan's model, as it is before any training."""
    import ray.train
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not plan.train.use_gpu and plan.train.num_workers:  # the worker's share of CPUs, rounded (1.5 -> 2, 0.75 -> 1)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(plan.train.threads_per_worker or max(1, math.floor(cpus + 0.5)))
    accelerator = Accelerator(cpu=not plan.train.use_gpu, mixed_precision=plan.train.mixed_precision)
    set_seed(plan.train.seed, deterministic=plan.train.deterministic)
    model, tokenizer = build_model(plan)
    return Run(plan, accelerator, model, tokenizer, rank=ray.train.get_context().get_world_rank(),
               components=[kind(plan, model) for kind in COMPONENTS])


def restore(run: Run) -> dict | None:
    """Load the last checkpoint into the components (a narrowing student is narrowed first if it was saved narrow)
    and its weights into ``run.model``, every key or an error naming the one missing; return its training state
    (None when starting afresh)."""
    import ray.train
    import torch
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / TRAIN_STATE, weights_only=False)
        weights = load_file(Path(folder) / "model.safetensors")
        rng = Path(folder) / RNG_STATE.format(rank=run.rank)
        state["rng"] = torch.load(rng, weights_only=False) if rng.is_file() else None
    run.epoch = run.resumed_from = state["epoch"]
    run.history = state["history"]
    for component in run.components:
        component.load_state_dict(state)
    missing, unexpected = run.model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelError(f"checkpoint {checkpoint.path} does not fit the model being trained: missing keys "
                         f"{missing[:5]}, unexpected keys {unexpected[:5]}; delete it to start afresh")
    return state


def prepare(run: Run) -> None:
    """A fresh AdamW over the model and the components' modules and a learning-rate schedule over the epochs of the
    phase the run is in (a narrowing student: the wide epochs, then from each step to the end), prepared by
    Accelerate."""
    import torch
    from transformers import get_scheduler

    plan, args, unwrap = run.plan, run.plan.train, run.accelerator.unwrap_model
    held = [c for c in run.components if c.module is not None]
    for c in held:  # bare again: a fresh start wraps them anew
        c.module = unwrap(c.module)
    run.model = unwrap(run.model)
    modules = [run.model, *(c.module for c in held)]
    # fused: one kernel over all parameters, much faster on CPU than the default (foreach) step
    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)
    steps = _steps_per_epoch(plan) * min((c.phase_epochs(plan.epochs) for c in run.components), default=plan.epochs)
    run.scheduler = get_scheduler(args.schedule, optimizer, num_warmup_steps=int(args.warmup_ratio * steps),
                                  num_training_steps=steps)
    run.model, *modules, run.optimizer = run.accelerator.prepare(*modules, optimizer)
    for c, module in zip(held, modules):
        c.module = module


def _steps_per_epoch(plan: TrainPlan) -> int:
    return math.ceil(plan.rows / max(1, plan.train.num_workers) / plan.train.batch_size)


def train_epoch(run: Run, shard) -> dict[str, Any]:
    """One pass over this worker's shard; returns the epoch's metrics."""
    plan, device = run.plan, run.accelerator.device
    run.model.train()
    hidden_states = any(c.hidden_states for c in run.components)
    started, rows, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
    for batch, enc in _training_batches(shard, run.tokenizer, plan.train, seed=plan.train.seed * 1000 + run.epoch):
        inputs = {k: v.to(device) for k, v in enc.items()}
        out = run.model(**inputs, output_hidden_states=hidden_states)
        teacher_logits, gold = _targets(batch, plan, device)
        column = functools.partial(_float_column, batch, device=device)
        terms = [c.loss_terms(out, inputs, column) for c in run.components]
        loss, _ = multitask_loss(out.logits.float(), plan.tasks, teacher_logits, gold, terms)
        run.accelerator.backward(loss)
        if plan.train.grad_clip:  # the components' modules too: one norm over all that the optimizer steps
            run.accelerator.clip_grad_norm_([p for group in run.optimizer.param_groups for p in group["params"]],
                                            plan.train.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
        rows, loss_sum, steps = rows + batch.num_rows, loss_sum + loss.item(), steps + 1
        if run.rank == 0 and steps % LOG_EVERY_STEPS == 0:  # a progress line: Ray forwards it to the driver
            print(f"kd-ray {plan.mode}: epoch {run.epoch + 1}/{plan.epochs} step {steps}/{_steps_per_epoch(plan)} "
                  f"loss {loss_sum / steps:.4f} {rows * max(1, plan.train.num_workers) / (time.perf_counter() - started):.1f} "
                  f"samples/s", flush=True)
    seconds = time.perf_counter() - started
    return {"epoch": run.epoch + 1, "train_loss": loss_sum / max(steps, 1), "rows": rows,
            "samples_per_s": rows / seconds if seconds else 0.0, "rank": run.rank,
            "resumed_from_epoch": run.resumed_from}


def validate(run: Run, shard) -> dict[str, float]:
    """Validation metrics of every task (``val_<task>_*`` with several heads) and their mean (``val_*``)."""
    plan = run.plan
    columns = {t.name: "label" if i == 0 else task_label_column(t.name) for i, t in enumerate(plan.tasks)}
    texts, gold = [], {t.name: [] for t in plan.tasks}
    for batch in shard.iter_batches(batch_size=READ_ROWS, batch_format="pyarrow"):
        texts += batch.column("text").to_pylist()
        for t in plan.tasks:
            gold[t.name].append(_gold(batch, columns[t.name]))
    logits = predict_logits(run.bare_model, run.tokenizer, texts, max_length=plan.train.max_length,
                            batch_size=VALIDATION_BATCH, device=run.accelerator.device)
    metrics, per_task = {}, []
    for t in plan.tasks:
        g = np.concatenate(gold[t.name])
        m = classification_metrics(t.of(logits)[g >= 0], g[g >= 0], list(t.labels))
        per_task.append(m)
        if plan.named_heads:
            metrics.update({f"val_{t.name}_{k}": m[k] for k in ("accuracy", "macro_f1", "macro_recall")})
    # one number to select epochs and trials by: the mean over tasks
    metrics.update({f"val_{k}": float(np.mean([m[k] for m in per_task])) for k in ("accuracy", "macro_f1",
                                                                                   "macro_recall")})
    return metrics


def _rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Run, metrics: dict) -> None:
    """Report the epoch's metrics with a checkpoint: rank 0 writes the model folder and the optimizer
    state, every rank its random state; Ray Train merges the ranks' files into one checkpoint."""
    import ray.train
    import torch

    folder = tempfile.mkdtemp(prefix="kd-ray-checkpoint-")
    if run.rank == 0:
        run.bare_model.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)
        if run.plan.named_heads:
            write_layout(folder, run.plan.tasks)
        torch.save({"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                    "epoch": run.epoch, "history": run.history,
                    **{k: v for c in run.components for k, v in c.state_dict().items()}}, Path(folder) / TRAIN_STATE)
    torch.save(_rng_state(), Path(folder) / RNG_STATE.format(rank=run.rank))
    # With a worker group Ray Train copies the folder to storage and deletes it; in local mode the last one
    # reported is the result's checkpoint, which fit exports and deletes, and the one before goes here.
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     delete_local_checkpoint_after_upload=True)
    if run.checkpoint_folder:
        shutil.rmtree(run.checkpoint_folder, ignore_errors=True)
    run.checkpoint_folder = folder


def train_loop_per_worker(config: dict) -> None:
    """One data-parallel worker: build, restore, then per epoch train -> validate -> checkpoint.
    ``config`` is a TrainPlan as JSON (Ray Train's config is plain data)."""
    import ray.train

    plan = TrainPlan.model_validate(config)
    run = build(plan)
    state = restore(run)
    prepare(run)
    if state:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:  # absent when the run resumes on more workers than it saved
            _set_rng_state(state["rng"])
    train_shard = ray.train.get_dataset_shard("train")
    while run.epoch < plan.epochs:
        if any([c.start_epoch(run.epoch) for c in run.components]):  # e.g. narrowed: a fresh optimizer and schedule
            run.accelerator.free_memory()  # drop the wrappers and optimizer that hold the old parameters
            prepare(run)
        metrics = train_epoch(run, train_shard)
        for c in run.components:
            metrics.update(c.epoch_metrics())
        if run.rank == 0 and plan.has_validation:
            metrics.update(validate(run, ray.train.get_dataset_shard("validation")))
            if plan.keeps_best:  # a model a component is still changing (a wide student) is never the best
                metrics[KEEP_SCORE] = metrics["val_macro_recall"] if all(c.keepable for c in run.components) else -1.0
        run.epoch += 1
        run.history.append(metrics)
        if run.rank == 0:
            print(f"kd-ray {plan.mode}: epoch {run.epoch}/{plan.epochs} done: " + ", ".join(
                f"{k} {metrics[k]:.4g}" for k in ("train_loss", "val_macro_recall", "samples_per_s") if k in metrics),
                flush=True)
        save_checkpoint(run, metrics)


# ---------------------------------------------------------------------------- driver side


def run_name(output: str, plan: TrainPlan) -> str:
    digest = hashlib.sha256(plan.model_dump_json().encode()).hexdigest()[:10]
    return f"{Path(output).name}-{digest}"


def _storage_path(output: str, storage_path: str | None) -> str:
    if storage_path:
        return storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    return str(Path(output).resolve().parent / "ray_train")


def build_trainer(plan: TrainPlan, datasets: dict, name: str, storage_path: str, callbacks=()):
    """The TorchTrainer that runs ``train_loop_per_worker``; a run with ``name`` already in
    ``storage_path`` resumes from its last checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    args = plan.train
    env = {k: v for k, v in os.environ.items() if k.startswith("KD_RAY_")}  # kd-ray's own settings reach the workers
    if args.deterministic:  # cuBLAS reads it when its first handle is made: set before the worker starts
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Blocks reach each worker in the datasets' own order, whatever order Ray's tasks finish in (with several
    # workers, OutputSplitter then deals them out by row counts alone): the same config gives the same batches.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    if args.num_workers == 0:  # local mode: no worker group, no DataConfig; each dataset's own options apply
        for ds in datasets.values():
            ds.context.execution_options = copy.deepcopy(ingest)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, **(
            {"resources_per_worker": {"CPU": worker_cpus(args)}} if args.num_workers else {})),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            # keep: best adds the best-scoring checkpoint to those kept (Ray always keeps the latest, to resume)
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=KEEP_SCORE if plan.keeps_best else None),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )


def worker_cpus(args: TrainArgs) -> float:
    """train.num_cpus_per_worker, or (null) the smallest node's CPUs less 0.5 (the data tasks' share) over the
    workers a node holds when they are spread evenly."""
    import ray

    if args.num_cpus_per_worker is not None:
        return args.num_cpus_per_worker
    nodes = [n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    per_node = math.ceil(args.num_workers / len(nodes))
    return max(0.25, round((min(nodes) - 0.5) / per_node, 2))


def fit(plan: TrainPlan, datasets: dict, output: str, storage_path: str | None, ray_cfg: RayConfig):
    """Run ``train_loop_per_worker`` on Ray Train and export the checkpoint ``train.keep`` names to ``output``."""
    init_ray(ray_cfg)
    name = run_name(output, plan)
    result = build_trainer(plan, datasets, name, _storage_path(output, storage_path)).fit()
    if result.checkpoint is None:
        raise KdRayUserError(f"training run {name} finished without a checkpoint; see the Ray Train logs above")
    chosen = result.checkpoint
    if plan.keeps_best:
        chosen = max(result.best_checkpoints, key=lambda reported: keep_rank(reported[1]))[0]
    export_checkpoint(chosen, output, plan, latest=result.checkpoint)
    if plan.train.num_workers == 0:  # local mode: the checkpoint folder is this process's own
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    return result


def keep_rank(metrics: dict) -> tuple[float, int]:
    """How ``train.keep: best`` ranks an epoch's metrics: by keep score, the earliest of equals."""
    score = metrics.get(KEEP_SCORE)
    return (score if score is not None and score == score else -1.0), -metrics["epoch"]  # NaN: not scored


def _train_state(checkpoint) -> dict:
    import torch

    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / TRAIN_STATE, weights_only=False)


def export_checkpoint(checkpoint, output: str, plan: TrainPlan, latest=None) -> None:
    """Copy the checkpoint's Hugging Face folder to ``output``, without the training state; the run's
    history is read from ``latest`` (the run's last checkpoint) when another epoch's model is exported."""
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(TRAIN_STATE, RNG_STATE.format(rank="*")))
    state = _train_state(checkpoint)
    same = latest is None or latest.path == checkpoint.path
    history = (state if same else _train_state(latest))["history"]
    info = {"mode": plan.mode, "labels": plan.labels, "history": history, "exported_epoch": state["epoch"],
            "plan": plan.model_dump(mode="json")}
    (tmp / RUN_INFO).write_text(json.dumps(info, indent=2, default=str))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the model folder appears whole or not at all


def read_run_info(folder: str) -> dict | None:
    path = Path(folder) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def _labeled_rows(batch: pa.Table) -> pa.Table:
    """Finetune learns from rows that have a gold label and a usable text."""
    return batch.filter(pc.and_(batch.column("label").is_valid(), batch.column("reject_reason").is_null()))


def _gold_rows(batch: pa.Table, columns: list[str]) -> pa.Table:
    """Rows with a gold label in any of ``columns``."""
    return batch.filter(functools.reduce(pc.or_, [batch.column(c).is_valid() for c in columns]))


def validation_dataset(cfg: FinetuneConfig | DistillConfig, plan: TrainPlan) -> dict:
    """{"validation": the validation set, with a gold column per task beyond the first}, or {} without one."""
    validation = cfg.validation
    if validation is None:
        return {}
    first, *others = plan.tasks
    missing = [t.name for t in others if t.name not in validation.task_label_columns]
    if missing:
        raise KdRayUserError(f"validation.task_label_columns needs the gold column of tasks {missing} (the first "
                             f"task, {first.name!r}, reads validation.label_column)")
    return {"validation": corpus_dataset(validation, {n: i for i, n in enumerate(first.labels)}, num_cpus=DATA_TASK_CPUS,
                                         task_labels={t.name: {n: i for i, n in enumerate(t.labels)}
                                                      for t in others} or None)}


def run_finetune(cfg: FinetuneConfig):
    train_ds = corpus_dataset(cfg.data, {n: i for i, n in enumerate(cfg.labels)}, num_cpus=DATA_TASK_CPUS)
    train_ds = train_ds.map_batches(_labeled_rows, batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)
    rows = train_ds.count()
    if rows == 0:
        raise KdRayUserError(f"data.path {cfg.data.path} has no rows with a gold label in column "
                             f"{cfg.data.label_column!r}; finetune needs labeled rows")
    plan = finetune_plan(cfg, rows)
    return fit(plan, {"train": train_ds, **validation_dataset(cfg, plan)}, cfg.output, cfg.storage_path, cfg.ray)


def distill_datasets(cfg: DistillConfig, plan: TrainPlan, info) -> dict:
    """Ray Datasets a distillation reads: the soft labels (split across workers) and the validation set."""
    columns = list(dict.fromkeys(["id", "text", *plan.gold_columns, *plan.teacher_columns,
                                  *plan.representation_columns]))
    train_ds = soft_label_dataset(info, columns, num_cpus=DATA_TASK_CPUS)
    if plan.gold_only:
        train_ds = train_ds.map_batches(_gold_rows, fn_kwargs={"columns": plan.gold_columns}, batch_format="pyarrow",
                                        num_cpus=DATA_TASK_CPUS)
    return {"train": train_ds, **validation_dataset(cfg, plan)}


def run_distill(cfg: DistillConfig):
    plan, info = distill_plan(cfg)
    return fit(plan, distill_datasets(cfg, plan, info), cfg.output, cfg.storage_path, cfg.ray)


def _main(stage: str, run):
    """A stage's entry point: train, then print the exported epoch's metrics."""
    def main(cfg: FinetuneConfig | DistillConfig) -> None:
        run(cfg)
        info = read_run_info(cfg.output)
        epoch = info.get("exported_epoch") or len(info["history"])
        kept = info["history"][epoch - 1] if info["history"] else {}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in kept.items() if isinstance(v, float))
        say(f"kd-ray {stage}: {len(info['history'])} epochs, exported epoch {epoch}: {shown} -> {cfg.output}")
    return main


ENTRY_POINTS = {"finetune": _main("finetune", run_finetune), "distill": _main("distill", run_distill)}
