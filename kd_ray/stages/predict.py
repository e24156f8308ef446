"""`kd-ray predict`: a trained model's label and probabilities, per task, for every post of a corpus.

Labeling with the model as the one teacher (``kd_ray.stages.label.run_label``): the same reading and
sharding, the same actors, the same resume and exactly-once part files, the same final check and
manifest; only the columns differ. Each part file holds ``id``, per task ``<task>_label`` (string) and
``<task>_probs`` (fixed_size_list<float32, C>: the softmax over that task's labels, in the order its
metadata's ``predictions.tasks`` lists them), ``truncated``, and, if asked, ``text`` and ``model_logits``.
``kd-ray validate`` checks a prediction folder as it checks soft labels.
"""

from __future__ import annotations

from pathlib import Path

from kd_ray.config import PredictConfig
from kd_ray.console import say
from kd_ray.data.soft_labels import PredictionsInfo
from kd_ray.models.multitask import model_tasks
from kd_ray.models.teacher import describe_model
from kd_ray.stages.label import LabelSummary, run_label


def predictions_info(model: str, task: str, *, logits: bool = False, text: bool = False) -> PredictionsInfo:
    """What a model predicts: its tasks and their labels (a multi-task model's layout, or ``task``); the model
    checked first (a folder or .onnx file that exists, a sequence classifier's config)."""
    describe_model(model, what="the", hash_weights=False)
    folder = Path(model).parent if model.endswith(".onnx") else model
    return PredictionsInfo(tasks=model_tasks(folder, task), logits=logits, text=text)


def run_predict(cfg: PredictConfig) -> LabelSummary:
    return run_label(cfg.label_config(), predictions_info(cfg.model, cfg.task, logits=cfg.output.logits,
                                                          text=cfg.output.text))


def main(cfg: PredictConfig) -> LabelSummary:
    summary = run_predict(cfg)
    say(summary.line())
    return summary


ENTRY_POINTS = {"predict": main}
