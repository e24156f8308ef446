"""Knowledge-distillation losses for text classifiers. Plain torch: no Ray, no Accelerate.

Convention: ``alpha`` weighs the distillation term.

    loss = alpha * distillation(student, teacher) + (1 - alpha) * CE(student, gold)

``alpha=1`` is pure distillation, ``alpha=0`` is plain cross-entropy on the gold labels.
The KL term is multiplied by ``T^2`` so the soft-target gradients keep the same
magnitude whatever the temperature (Hinton et al. 2015, "Distilling the Knowledge in
a Neural Network"). Other libraries differ: torchdistill puts ``alpha`` on the hard
(gold) label and TextBrewer drops the ``T^2`` factor, so their hyperparameters do not
transfer here unchanged.

Rows whose gold label equals ``ignore_index`` (e.g. an unlabelled transfer set) add
only the distillation term; the cross-entropy is averaged over labelled rows alone and
is 0 when a batch has none.

Shapes: logits are ``(batch, num_classes)`` floats, gold labels ``(batch,)`` long.

Representation distillation adds ``beta * R(project(pool(student)), teacher_representation)`` to a
task's loss: the student's pooled last hidden states, mapped to the teacher's width by a learned
linear ``Projections`` (training only; not part of the exported model), against the teacher's
stored representation. ``R`` is ``1 - cos`` (DistilBERT's cosine loss; PKD's MSE between
L2-normalised vectors is twice this) or ``mse`` on the raw vectors (TinyBERT's hidden-state loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLINGS = ("mean", "cls")
REPRESENTATION_LOSSES = ("cosine", "mse")


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.ndim != 2 or teacher_logits.ndim != 2:
        raise ValueError("student_logits and teacher_logits must be (batch, num_classes), got shapes "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(f"student has {student_logits.shape[1]} classes but teacher has "
                         f"{teacher_logits.shape[1]}; their label sets must match")
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student batch size {student_logits.shape[0]} != teacher batch size "
                         f"{teacher_logits.shape[0]}")


NO_GOLD = -100  # the gold index of a row without a gold label for a task (cross-entropy's ignore_index)


def gold_cross_entropy(student_logits: Tensor, gold_labels: Tensor | None, *, ignore_index: int = NO_GOLD) -> Tensor:
    """Cross-entropy averaged over rows whose gold label is not ``ignore_index``.

    Args:
        student_logits: (batch, num_classes)
        gold_labels: (batch,) long, or None when no row has a gold label.

    Returns:
        Scalar float32; 0 (with zero gradient) when no row has a gold label.
    """
    logits = student_logits.float()
    if gold_labels is None:
        return logits.sum() * 0.0
    if gold_labels.shape != logits.shape[:1]:
        raise ValueError(f"gold_labels must be (batch,) = ({logits.shape[0]},), got {tuple(gold_labels.shape)}")
    # sum / count rather than reduction="mean": the mean is 0/0 = NaN on an all-unlabelled batch.
    summed = F.cross_entropy(logits, gold_labels, ignore_index=ignore_index, reduction="sum")
    num_labelled = (gold_labels != ignore_index).sum().clamp(min=1)
    return summed / num_labelled


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, gold_labels: Tensor | None, *, temperature: float,
                 alpha: float, ignore_index: int = NO_GOLD) -> Tensor:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, gold)``.

    The KL uses ``reduction="batchmean"`` (sum over classes, mean over all rows).

    Args:
        student_logits: (batch, num_classes)
        teacher_logits: (batch, num_classes)
        gold_labels: (batch,) long; ``ignore_index`` marks rows without a gold label.
        temperature: softening temperature T > 0.
        alpha: weight of the distillation term, in [0, 1].

    Returns:
        Scalar float32 loss.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_inputs(student_logits, teacher_logits, alpha)
    # Upcast: softmax/KL in bf16 loses the small probabilities that soft targets carry.
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    ce = gold_cross_entropy(student_logits, gold_labels, ignore_index=ignore_index)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def mse_loss(student_logits: Tensor, teacher_logits: Tensor, gold_labels: Tensor | None, *, alpha: float,
             ignore_index: int = NO_GOLD) -> Tensor:
    """``alpha * MSE(student_logits, teacher_logits) + (1 - alpha) * CE(student, gold)``.

    Logit matching (Ba & Caruana 2014); the MSE is the mean over all batch * num_classes
    entries. Shapes as in ``distill_loss``.
    """
    _check_inputs(student_logits, teacher_logits, alpha)
    mse = F.mse_loss(student_logits.float(), teacher_logits.float())
    ce = gold_cross_entropy(student_logits, gold_labels, ignore_index=ignore_index)
    return alpha * mse + (1 - alpha) * ce


def hard_label_loss(student_logits: Tensor, teacher_logits: Tensor, gold_labels: Tensor | None, *, alpha: float,
                    ignore_index: int = NO_GOLD) -> Tensor:
    """``alpha * CE(student, argmax teacher) + (1 - alpha) * CE(student, gold)``.

    Pseudo-labelling: the teacher's top class is the target for every row. Shapes as in
    ``distill_loss``.
    """
    _check_inputs(student_logits, teacher_logits, alpha)
    teacher_labels = teacher_logits.argmax(dim=-1)
    pseudo = F.cross_entropy(student_logits.float(), teacher_labels)
    ce = gold_cross_entropy(student_logits, gold_labels, ignore_index=ignore_index)
    return alpha * pseudo + (1 - alpha) * ce


def combine_teacher_logits(teacher_logits: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted average of several teachers' logits for the same task.

    Logits are averaged rather than probabilities so the result is what a single teacher
    would emit: the temperature then softens it exactly as it would one teacher's output.

    Args:
        teacher_logits: n_teachers tensors, each (batch, num_classes).
        weights: n_teachers non-negative weights, normalised to sum to 1; None = equal.

    Returns:
        (batch, num_classes) float32
    """
    if len(teacher_logits) == 0:
        raise ValueError("teacher_logits is empty; need at least one teacher")
    first_shape = tuple(teacher_logits[0].shape)
    for i, logits in enumerate(teacher_logits):
        if logits.ndim != 2:
            raise ValueError(f"teacher {i} logits must be (batch, num_classes), got {tuple(logits.shape)}")
        if logits.shape[1] != first_shape[1]:
            raise ValueError(f"teacher {i} has {logits.shape[1]} classes but teacher 0 has {first_shape[1]}; "
                             "combined teachers must share one label set")
        if logits.shape[0] != first_shape[0]:
            raise ValueError(f"teacher {i} batch size {logits.shape[0]} != teacher 0 batch size {first_shape[0]}")
    if weights is None:
        weights = [1.0] * len(teacher_logits)
    if len(weights) != len(teacher_logits):
        raise ValueError(f"got {len(weights)} weights for {len(teacher_logits)} teachers")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"teacher weights must be finite and >= 0, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"teacher weights must not all be 0, got {list(weights)}")
    stacked = torch.stack([logits.float() for logits in teacher_logits])  # (n_teachers, batch, C)
    w = torch.tensor([float(x) / total for x in weights], dtype=stacked.dtype, device=stacked.device)
    return torch.einsum("t,tbc->bc", w, stacked)


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """A sentence representation from last hidden states ``(batch, seq, width)``: ``'mean'`` over the real
    tokens (``attention_mask`` 1), ``'cls'`` the first token's. Returns ``(batch, width)`` float32."""
    if pooling == "cls":
        return hidden[:, 0].float()
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def representation_loss(student: Tensor, teacher: Tensor, kind: str = "cosine") -> Tensor:
    """``mean(1 - cos(student_i, teacher_i))`` (kind ``'cosine'``) or the mean squared error (``'mse'``) of
    ``(batch, width)`` representations, the student's already projected to the teacher's width."""
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"student and teacher representations must both be (batch, width), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"representation loss must be one of {list(REPRESENTATION_LOSSES)}, got {kind!r}")


class Projections(nn.Module):
    """The student's pooled representation mapped to each target teacher's width, by a learned linear layer
    per target; used in training only (the exported student has no projection).

    ``targets``: name -> (pooling, width). ``forward(hidden, attention_mask)`` -> name -> (batch, width)."""

    def __init__(self, width: int, targets: dict[str, tuple[str, int]]):
        super().__init__()
        self.poolings = {name: pooling for name, (pooling, _) in targets.items()}
        self.maps = nn.ModuleDict({name: nn.Linear(width, size) for name, (_, size) in targets.items()})

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        pooled = {p: pool(hidden, attention_mask, p) for p in set(self.poolings.values())}
        return {name: linear(pooled[self.poolings[name]]) for name, linear in self.maps.items()}


LOSSES: dict[str, Callable[..., Tensor]] = {"kl": distill_loss, "mse": mse_loss, "hard": hard_label_loss}


def compute_loss(kind: str, student_logits: Tensor, teacher_logits: Tensor, gold_labels: Tensor | None, *,
                 temperature: float, alpha: float, ignore_index: int = NO_GOLD) -> Tensor:
    """Dispatch to ``LOSSES[kind]``. ``temperature`` is used only by ``"kl"``."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss kind {kind!r}; allowed: {sorted(LOSSES)}")
    extra = {"temperature": temperature} if kind == "kl" else {}
    return LOSSES[kind](student_logits, teacher_logits, gold_labels, alpha=alpha, ignore_index=ignore_index, **extra)


def multitask_loss(
    logits: Tensor, tasks: Sequence, teacher_logits: dict[str, Tensor | None], gold: dict[str, Tensor],
    extra_terms: Sequence[dict[str, Tensor]] = (),
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_k w_k * (L_k + E_k)``: each task's loss on its slice of the student's joint output, plus the extra
    terms added to it (E_k, e.g. its representation term ``beta_k * R_k``).

    Args:
        logits: (batch, total) student outputs; one task may own all of them.
        tasks: each with ``name``, ``of(logits)`` (its slice), ``kind``, ``temperature``, ``alpha`` and
            ``weight`` (kd_ray.stages.plan.TaskPlan).
        teacher_logits: task -> (batch, C_k) teacher logits (several teachers already combined), or None
            for a task learned from gold labels alone (fine-tuning a teacher): plain cross-entropy.
        gold: task -> (batch,) long gold indices, NO_GOLD where the row has no gold label for that task:
            such a row contributes only the distillation term of that task.
        extra_terms: dicts task -> scalar added to that task's loss (kd_ray.models.components' loss terms).

    Returns:
        The scalar total and each task's unweighted loss (for logging).
    """
    total = logits.new_zeros((), dtype=torch.float32)
    parts = {}
    for task in tasks:
        teacher = teacher_logits.get(task.name)
        if teacher is None:
            loss = gold_cross_entropy(task.of(logits), gold[task.name])
        else:
            loss = compute_loss(task.kind, task.of(logits), teacher, gold[task.name], temperature=task.temperature,
                                alpha=task.alpha)
        parts[task.name] = sum((terms[task.name] for terms in extra_terms if task.name in terms), loss)
        total = total + task.weight * parts[task.name]
    return total, parts
