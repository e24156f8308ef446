"""Training additions the loop in kd_ray.stages.train calls: a narrowing schedule and a representation term.

A component is built from the plan and the model. It may train a module of its own beside the model (optimized,
prepared and checkpointed with it, never exported), add terms to the tasks' losses, and change the model before an
epoch (the loop then starts a fresh optimizer). A new loss term or schedule is one class listed in ``COMPONENTS``.
Plain torch: no Ray, no Accelerate; ``plan`` is a kd_ray.stages.plan.TrainPlan, read but not imported.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from kd_ray.models.inference import hidden_width
from kd_ray.models.losses import Projections, representation_loss
from kd_ray.models.students import feed_forward_width, ffn_neurons, narrowing_widths, prune_feed_forward


class Component:
    """The hooks the training loop calls on each component; here, each does nothing."""

    module: nn.Module | None = None  # trained beside the model; the loop sets it to its prepared (wrapped) self
    hidden_states = False  # loss_terms reads the model's hidden states
    keepable = True  # the model as it is now may be exported as the run's best epoch

    def start_epoch(self, epoch: int) -> bool:  # before each epoch (`epoch` done): whether it changed the model
        return False

    def phase_epochs(self, epochs: int) -> int:  # epochs, of the run's `epochs`, of a schedule starting now
        return epochs

    def loss_terms(self, out, inputs: dict[str, Tensor], column: Callable[[str], Tensor]) -> dict[str, Tensor]:
        """Task -> a scalar added to its loss. ``out``: the model's output for ``inputs``; ``column(name)``: the
        batch's float column ``name``, (batch, width)."""
        return {}

    def epoch_metrics(self) -> dict:  # added to the epoch's reported metrics
        return {}

    def state_dict(self) -> dict:  # entries of the checkpoint's training state
        return {}

    def load_state_dict(self, state: dict) -> None:  # that state (`epoch` too), before the model's weights load
        pass


class NarrowingSchedule(Component):
    """A student trained at full feed-forward width for ``plan.wide_epochs``, then narrowed in place one step before
    each epoch of ``plan.narrow_at``, the last step to ``student.ffn_size`` (no steps: a student never narrowed)."""

    def __init__(self, plan, model: nn.Module):
        self.model, self.at, self.done = model, plan.narrow_at, 0
        self.widths = (narrowing_widths(feed_forward_width(model), ffn_neurons(model, plan.student.ffn_size),
                                        len(self.at)) if self.at else [])  # the width after each step

    @property
    def keepable(self) -> bool:  # a student still wider than asked for is never the best
        return self.done == len(self.widths)

    def start_epoch(self, epoch: int) -> bool:
        if epoch not in self.at:
            return False
        prune_feed_forward(self.model, self.widths[self.done])
        self.done += 1
        return True

    def phase_epochs(self, epochs: int) -> int:  # the wide epochs, then from each step to the end
        return epochs - self.at[self.done - 1] if self.done else (self.at[0] if self.at else epochs)

    def epoch_metrics(self) -> dict:
        return {"ffn_size": feed_forward_width(self.model)} if self.at else {}

    def load_state_dict(self, state: dict) -> None:  # saved after a step: the shapes must fit before weights load
        self.done = sum(step < state["epoch"] for step in self.at)
        if self.done:
            prune_feed_forward(self.model, self.widths[self.done - 1])


class RepresentationTerm(Component):
    """``beta * R(project(pool(hidden)), teacher_representation)`` for each task with a representation target
    (kd_ray.models.losses); the projections train beside the model and are checkpointed as ``projection``."""

    def __init__(self, plan, model: nn.Module):
        self.tasks = [t for t in plan.tasks if t.representation]
        targets = {t.name: (t.pooling, t.representation_width) for t in self.tasks}
        self.projections = Projections(hidden_width(model.config), targets) if targets else None
        self.module, self.hidden_states = self.projections, bool(targets)

    def loss_terms(self, out, inputs, column) -> dict[str, Tensor]:
        if not self.tasks:
            return {}
        projected = self.module(out.hidden_states[-1], inputs["attention_mask"])
        return {t.name: t.beta * representation_loss(projected[t.name], column(t.representation), t.representation_loss)
                for t in self.tasks}

    def state_dict(self) -> dict:
        return {"projection": self.projections.state_dict() if self.projections is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.projections is not None:
            self.projections.load_state_dict(state["projection"])


# built, optimized and checkpointed in this order: a new one goes last, so earlier runs draw the same random weights
COMPONENTS = (NarrowingSchedule, RepresentationTerm)
