"""Build student models from an already-loaded teacher. Plain transformers/torch, no Ray.

Two ways to get a student:

- ``cut_student_from_teacher``: DistilBERT-style initialisation (Sanh et al. 2019): same
  architecture with fewer encoder layers, weights copied from a subset of the teacher's;
  optionally narrower feed-forward blocks too (``prune_feed_forward``).
- ``student_from_config``: a small, randomly initialised BERT sharing the teacher's
  vocabulary (so the teacher's tokenizer works) and label set.

Loading models from paths happens elsewhere; these take models and configs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, PretrainedConfig, PreTrainedModel

LAYER_SELECTIONS = ("spread", "bottom", "top")

# Where each supported family keeps its list of encoder layers, relative to model.base_model.
# "encoder.layer": BERT, RoBERTa, XLM-R, MiniLM (a BERT), MPNet, ELECTRA; "transformer.layer": DistilBERT.
_LAYER_LIST_PATHS = ("encoder.layer", "transformer.layer")

# A layer's feed-forward block: (input linear, output linear, config field of its width).
# BERT, RoBERTa, XLM-R, MiniLM, MPNet, ELECTRA; DistilBERT.
_FEED_FORWARD_PATHS = (
    ("intermediate.dense", "output.dense", "intermediate_size"),
    ("ffn.lin1", "ffn.lin2", "hidden_dim"),
)


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    for attr in path.split("."):
        module = getattr(module, attr, None)
    return module


def _find_layer_list(model: PreTrainedModel) -> tuple[str, nn.ModuleList] | None:
    """(state_dict prefix of the layer list, the list), or None if the architecture is unsupported."""
    for path in _LAYER_LIST_PATHS:
        module = _submodule(model.base_model, path)
        if isinstance(module, nn.ModuleList):
            return next(name for name, m in model.named_modules() if m is module), module
    return None


def select_layers(num_teacher_layers: int, num_layers: int, layer_selection: str | Sequence[int] = "spread") -> list[int]:
    """Teacher layer indices the student's layers are copied from, in order.

    "spread": ``round(linspace(0, L-1, k))``, evenly spaced and always keeping the first
    and last layer (6 -> 2 gives [0, 5], 6 -> 3 gives [0, 2, 5], 12 -> 6 gives
    [0, 2, 4, 7, 9, 11]). "bottom": layers [0, k); "top": layers [L-k, L). A list: those
    layers, increasing (Wang et al., ACL 2023, find bottom layers best for logit and
    hidden-state distillation).
    """
    if not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(f"num_layers must be in [1, {num_teacher_layers}] (the teacher's layers), got {num_layers}")
    if not isinstance(layer_selection, str):
        layers = [int(i) for i in layer_selection]
        if len(layers) != num_layers or layers != sorted(set(layers)) or not all(
                0 <= i < num_teacher_layers for i in layers):
            raise ValueError(f"layer_selection {layers} must list {num_layers} distinct teacher layers in increasing "
                             f"order, each in [0, {num_teacher_layers - 1}]")
        return layers
    if layer_selection == "spread":
        return torch.linspace(0, num_teacher_layers - 1, num_layers).round().long().tolist()
    if layer_selection == "bottom":
        return list(range(num_layers))
    if layer_selection == "top":
        return list(range(num_teacher_layers - num_layers, num_teacher_layers))
    raise ValueError(f"layer_selection must be one of {list(LAYER_SELECTIONS)} or a list of layers, "
                     f"got {layer_selection!r}")


def cut_student_from_teacher(
    teacher: PreTrainedModel, num_layers: int, layer_selection: str | Sequence[int] = "spread",
    ffn_size: int | float | None = None
) -> PreTrainedModel:
    """A copy of ``teacher`` keeping ``num_layers`` of its encoder layers.

    Embeddings, pooler, classifier head and any other non-layer weights (e.g. MPNet's
    relative attention bias) are copied unchanged; student layer i is teacher layer
    ``select_layers(...)[i]``. The label maps stay the teacher's. The teacher is not modified.
    With ``ffn_size``, each kept layer's feed-forward block keeps only that many of its
    neurons (see ``prune_feed_forward``).

    Supports BERT-like models (BERT, RoBERTa, XLM-R, MiniLM, MPNet, ELECTRA) and DistilBERT.
    """
    found = _find_layer_list(teacher)
    if found is None:
        raise ValueError(f"cannot cut layers from a {type(teacher).__name__} (model_type "
                         f"{teacher.config.model_type!r}): only BERT-like models and DistilBERT are supported; "
                         "use a pretrained student path or a config student instead")
    teacher_prefix, teacher_layers = found
    layer_ids = select_layers(len(teacher_layers), num_layers, layer_selection)

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = num_layers  # DistilBertConfig maps this onto n_layers
    student = type(teacher)(config)
    student_prefix, student_layers = _find_layer_list(student)
    if len(student_layers) != num_layers:
        raise ValueError(f"{type(teacher).__name__} ignores config.num_hidden_layers; cannot cut it to "
                         f"{num_layers} layers")

    # Rename student layer i's keys to teacher layer layer_ids[i]; every other key matches 1:1.
    teacher_state = teacher.state_dict()
    student_state = {}
    for key in student.state_dict():
        source = key
        if key.startswith(student_prefix + "."):
            index, rest = key[len(student_prefix) + 1 :].split(".", 1)
            source = f"{teacher_prefix}.{layer_ids[int(index)]}.{rest}"
        student_state[key] = teacher_state[source]
    student.load_state_dict(student_state, strict=True)
    if ffn_size is not None:
        prune_feed_forward(student, ffn_size)
    student.train(teacher.training)
    return student.to(dtype=teacher.dtype, device=teacher.device)


def _feed_forward_spec(model: PreTrainedModel) -> tuple[list[nn.Module], tuple[str, str, str]]:
    """The encoder layers and (in path, out path, config width field) of their feed-forward blocks."""
    found = _find_layer_list(model)
    first_layer = found[1][0] if found else None
    spec = next((p for p in _FEED_FORWARD_PATHS if isinstance(_submodule(first_layer, p[0]), nn.Linear)), None)
    if spec is None:
        raise ValueError(f"cannot narrow the feed-forward blocks of a {type(model).__name__} (model_type "
                         f"{model.config.model_type!r}): only BERT-like models and DistilBERT are supported")
    return list(found[1]), spec


def feed_forward_width(model: PreTrainedModel) -> int:
    """Neurons in each feed-forward block of a BERT-like model or DistilBERT."""
    return getattr(model.config, _feed_forward_spec(model)[1][2])


def ffn_neurons(model: PreTrainedModel, ffn_size: int | float) -> int:
    """``ffn_size`` as a neuron count for ``model``: an int is one, a float in (0, 1] a fraction of its width.

    Raises ValueError where the model's feed-forward blocks cannot be narrowed to it."""
    width = feed_forward_width(model)
    size = round(width * ffn_size) if isinstance(ffn_size, float) else ffn_size
    if not 1 <= size <= width:
        raise ValueError(f"ffn_size must be in [1, {width}] (the teacher's feed-forward width) or a fraction in "
                         f"(0, 1], got {ffn_size}")
    return size


def narrowing_widths(width: int, target: int, steps: int) -> list[int]:
    """The feed-forward width after each of ``steps`` narrowing steps from ``width`` to ``target``: each
    step keeps the same share of the neurons (1536 -> 768 -> 384 in 2 steps), the last exactly ``target``."""
    return [round(width * (target / width) ** (k / steps)) for k in range(1, steps)] + [target]


@torch.no_grad()
def prune_feed_forward(model: PreTrainedModel, ffn_size: int | float) -> PreTrainedModel:
    """Narrow every encoder layer's feed-forward block to ``ffn_size`` neurons (or that fraction of
    them, for a float), in place.

    Neuron j of a block is scored by ``||W_in[j, :]|| * ||W_out[:, j]||`` (the norms of the
    weights into and out of it, no data needed) and the ``ffn_size`` best are kept, in their
    original order. The config's width field is updated, so ``save_pretrained`` writes a model
    that ``from_pretrained`` loads as an ordinary, narrower one. In a MiniLM-L6 cut this is most
    of a layer's cost: 3 layers with half their feed-forward neurons run about as fast as 2 whole ones.
    """
    ffn_size = ffn_neurons(model, ffn_size)
    layers, (in_path, out_path, width_field) = _feed_forward_spec(model)
    for layer in layers:
        w_in, w_out = _submodule(layer, in_path), _submodule(layer, out_path)
        keep = torch.topk(w_in.weight.norm(dim=1) * w_out.weight.norm(dim=0), ffn_size).indices.sort().values
        like = {"dtype": w_in.weight.dtype, "device": w_in.weight.device}
        narrow_in = nn.Linear(w_in.in_features, ffn_size, bias=w_in.bias is not None, **like)
        narrow_in.weight.copy_(w_in.weight[keep])
        if w_in.bias is not None:
            narrow_in.bias.copy_(w_in.bias[keep])
        narrow_out = nn.Linear(ffn_size, w_out.out_features, bias=w_out.bias is not None, **like)
        narrow_out.weight.copy_(w_out.weight[:, keep])
        if w_out.bias is not None:
            narrow_out.bias.copy_(w_out.bias)
        for path, new in ((in_path, narrow_in), (out_path, narrow_out)):
            parent, name = path.rsplit(".", 1)
            setattr(_submodule(layer, parent), name, new)
    setattr(model.config, width_field, ffn_size)
    return model


def student_from_config(
    teacher_config: PretrainedConfig,
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int,
) -> BertForSequenceClassification:
    """A randomly initialised BERT classifier with the teacher's vocabulary and labels.

    Vocabulary size, pad token and maximum length come from ``teacher_config`` so the
    teacher's tokenizer feeds the student unchanged.
    """
    sizes = {"num_layers": num_layers, "hidden_size": hidden_size, "num_attention_heads": num_attention_heads,
             "intermediate_size": intermediate_size}
    problems = [f"{name} must be >= 1, got {value}" for name, value in sizes.items() if value < 1]
    if hidden_size >= 1 and num_attention_heads >= 1 and hidden_size % num_attention_heads:
        problems.append(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})")
    if problems:
        raise ValueError("; ".join(problems))

    config = BertConfig(
        vocab_size=teacher_config.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=getattr(teacher_config, "max_position_embeddings", 512),
        type_vocab_size=getattr(teacher_config, "type_vocab_size", 2),
        pad_token_id=getattr(teacher_config, "pad_token_id", 0),
        id2label=dict(teacher_config.id2label),
        label2id=dict(teacher_config.label2id),
    )
    return BertForSequenceClassification(config)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; tied weights are counted once."""
    return sum(p.numel() for p in model.parameters())
