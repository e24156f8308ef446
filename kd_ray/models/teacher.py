"""Teachers: check a model before any worker loads it, and run it over batches of texts.

``TeacherLabeler`` is the Ray-free core of labeling: a callable that turns an Arrow
batch of rows into the same rows plus each teacher's raw logits. ``kd_ray.stages.label``
hands it to Ray Data as an actor class.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd_ray.data.soft_labels import (
    ModelInfo,
    RepresentationInfo,
    TeacherInfo,
    logits_column,
    representation_column,
)
from kd_ray.errors import ModelError
from kd_ray.models.inference import (
    encode,
    encode_prompts,
    encoder,
    hidden_width,
    is_classifier_config,
    length_groups,
    padded_batches,
    sorted_outputs,
)
from kd_ray.models.multitask import TaskSlice

if TYPE_CHECKING:  # the labeler runs where only torch, transformers and pyarrow are installed
    from kd_ray.config import TeacherConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def weights_sha256(folder: Path) -> str:
    """sha256 over a model folder's weight files (shards included), in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def describe_model(model: str, *, revision: str | None = None, what: str = "teacher",
                   hash_weights: bool = True, labels: list[str] | None = None) -> ModelInfo:
    """Check that ``model`` is a loadable sequence classifier (or, given the ``labels`` an LLM teacher
    names, a causal LM); return its provenance.

    Loads only the config (and hashes local weights), so it is cheap on the driver.
    """
    from transformers import AutoConfig

    folder = Path(model)
    is_local = folder.exists() or model.startswith((".", "/", "~"))
    if is_local:
        folder = folder.expanduser()
        if not folder.is_dir():
            raise ModelError(f"{what} model folder {model} does not exist")
        if not (folder / "config.json").is_file():
            raise ModelError(f"{what} model folder {model} has no config.json: not a Hugging Face model folder")
        if not any((folder / w).is_file() for w in WEIGHT_FILES):
            raise ModelError(f"{what} model folder {model} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    try:
        config = AutoConfig.from_pretrained(str(folder) if is_local else model, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the {what} config from {model!r}: {e}") from e
    architectures = config.architectures or []
    if labels is not None:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        )

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or is_classifier_config(config):
            raise ModelError(f"{what} {model!r} is a {architectures or config.model_type} model, not a causal "
                             "language model (one AutoModelForCausalLM loads), which kind: llm needs")
        id2label = {str(i): label for i, label in enumerate(labels)}
    elif not is_classifier_config(config):
        raise ModelError(
            f"{what} {model!r} is a {architectures or config.model_type} model, not a sequence classifier "
            f"(its config.architectures should end in 'ForSequenceClassification'); fine-tune it first with "
            f"`kd-ray finetune`"
        )
    else:
        id2label = {str(k): v for k, v in sorted(config.id2label.items(), key=lambda kv: int(kv[0]))}
    return ModelInfo(
        model=str(folder.resolve()) if is_local else model,
        revision=revision,
        weights_sha256=(weights_sha256(folder) if is_local else f"hub:{model}@{revision or 'main'}")
        if hash_weights else None,
        id2label=id2label,
        architecture=architectures[0] if architectures else config.model_type,
    )


def teacher_metadata(cfg: TeacherConfig) -> TeacherInfo:
    from transformers import AutoConfig

    info = describe_model(cfg.model, revision=cfg.revision, labels=cfg.labels if cfg.kind == "llm" else None)
    extra: dict = {}
    if cfg.representation:
        width = hidden_width(AutoConfig.from_pretrained(info.model, revision=cfg.revision))
        extra["representation"] = RepresentationInfo(pooling=cfg.representation, width=width)
    if cfg.kind == "llm":
        extra.update(kind="llm", prompt=cfg.prompt, prompt_sha256=hashlib.sha256(cfg.prompt.encode()).hexdigest(),
                     verbalizer=dict(zip(cfg.labels, cfg.label_words)),
                     label_token_ids=label_token_ids(load_tokenizer(cfg), cfg),
                     calibration=CALIBRATION if cfg.calibrate else None, chat=cfg.chat)
    return TeacherInfo(**info.model_dump(), name=cfg.name, task=cfg.task, max_length=cfg.max_length, **extra)


# Contextual calibration (Zhao et al. 2021): the label-word probabilities of content-free posts
CALIBRATION = {"method": "contextual", "content_free": ["N/A", "", "[MASK]"]}


def label_token_ids(tokenizer, cfg: TeacherConfig) -> list[list[int]]:
    """The token of each word of each label (cfg.label_words), checked: one token each, all distinct."""
    ids = []
    for label, words in zip(cfg.labels, cfg.label_words):
        ids.append([])
        for word in words:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                pieces = tokenizer.convert_ids_to_tokens(tokens)
                raise ModelError(f"teacher {cfg.name!r}: label {label!r}'s word {word!r} is {len(tokens)} tokens "
                                 f"{pieces} in {cfg.model}'s tokenizer; each label word must be one token (set "
                                 f"verbalizer, e.g. a shorter word or one with a leading space)")
            ids[-1].append(tokens[0])
    flat = [i for group in ids for i in group]
    if len(set(flat)) != len(flat):
        raise ModelError(f"teacher {cfg.name!r}: label words {cfg.label_words} are not distinct tokens ({ids})")
    return ids


def pick_device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def autocast_dtype(precision: str, device: str):
    import torch

    if device != "cuda" or precision == "fp32":
        return None  # fp32 on CPU: bf16 matmuls run at half speed on CPUs without AMX
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _tokenizer_key(tokenizer, max_length: int) -> tuple:
    """Equal for tokenizers that turn every text into the same ids (and pad on the same side)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return (hashlib.sha256(vocab.encode()).hexdigest(), tokenizer.padding_side, tokenizer.pad_token_id, max_length)


def token_ids_column(encoding: int) -> str:
    """Column of one encoding's token ids, from the tokenize stage to the teacher actors."""
    return f"_token_ids_{encoding}"


def truncated_column(encoding: int) -> str:
    return f"_truncated_{encoding}"


def load_tokenizer(t: TeacherConfig | TeacherInfo):
    """A teacher's tokenizer; an LLM teacher's pads on the left (the label word follows each prompt's last
    token), with its end-of-text token if it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(t.model, revision=t.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of teacher {t.name!r} from {t.model}: {e}") from e
    if t.kind == "llm":
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Tokenizers:
    """Callable: Arrow batch of rows -> the same rows plus, per distinct encoding (teachers fine-tuned
    from one base share theirs), token ids (``_token_ids_<k>``, list<int32>) and ``_truncated_<k>``.

    The CPU half of labeling: Ray Data runs it as its own stage, so that a GPU actor's next block
    is tokenized on other cores while it runs the last one; ``TeacherLabeler`` runs it itself
    when its rows come without token ids."""

    def __init__(self, teachers: list[TeacherConfig | TeacherInfo]):
        # (tokenizer, Rust backend, max_length, an LLM teacher's (prompt, chat)) of each distinct encoding
        self.encodings: list[tuple] = []
        self.of_teacher: list[int] = []  # index of each teacher's encoding
        keys: list[tuple] = []
        for t in teachers:
            tokenizer = load_tokenizer(t)
            prompt = (t.prompt, t.chat) if t.kind == "llm" else None
            key = (*_tokenizer_key(tokenizer, t.max_length), prompt)
            if key not in keys:
                keys.append(key)
                self.encodings.append((tokenizer, encoder(tokenizer, t.max_length), t.max_length, prompt))
            self.of_teacher.append(keys.index(key))

    def encode(self, k: int, texts: list[str]) -> tuple[pa.ListArray, np.ndarray]:
        """Encoding ``k``'s token ids of ``texts`` and which were cut."""
        tokenizer, backend, max_length, prompt = self.encodings[k]
        if prompt is not None:
            return encode_prompts(tokenizer, texts, max_length, *prompt)
        return encode(tokenizer, texts, max_length, backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = batch.column("reject_reason").is_null().to_numpy(zero_copy_only=False)
        good = pc.filter(batch.column("text"), pa.array(ok)).to_pylist()
        rows = np.flatnonzero(ok)
        for k in range(len(self.encodings)):
            ids, cut = self.encode(k, good)
            # rejected rows get no tokens: scatter the good rows' lists into place
            where = np.full(len(ok), len(good), dtype=np.int64)
            where[rows] = np.arange(len(good))
            ids = pa.concat_arrays([ids, pa.array([[]], pa.list_(pa.int32()))]).take(pa.array(where))
            truncated = np.zeros(len(ok), dtype=bool)
            truncated[rows] = cut
            batch = batch.append_column(token_ids_column(k), ids).append_column(truncated_column(k),
                                                                                 pa.array(truncated))
        return batch


@functools.lru_cache(maxsize=4)
def _cached_tokenizers(teachers: str) -> Tokenizers:
    return Tokenizers([TeacherInfo.model_validate(t) for t in json.loads(teachers)])


def tokenize_batch(batch: pa.Table, teachers: list[TeacherInfo]) -> pa.Table:
    """The tokenize stage's Ray Data function: each worker process loads the tokenizers once."""
    return _cached_tokenizers(json.dumps([t.model_dump() for t in teachers]))(batch)


class TeacherLabeler:
    """Callable: Arrow batch with ``id, text, label, reject_reason`` (and token ids, if a tokenize
    stage ran) -> soft-label rows: the same rows plus each teacher's raw logits and ``truncated``.

    Rows are sorted by token length and cut into batches of ``batch_size`` rows (and at most
    ``batch_tokens`` padded tokens) so that little compute goes to padding.
    """

    def __init__(self, teachers: list[TeacherConfig | TeacherInfo], *, batch_size: int, num_gpus: float = 0.0,
                 threads: int = 1, precision: str = "auto", logits_dtype: str = "float32",
                 batch_tokens: int | None = None):
        import torch
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
        )

        self.device = pick_device(num_gpus)
        if self.device == "cpu":
            torch.set_num_threads(threads)
        # A GPU actor that tokenizes for itself lets the Rust tokenizer use the node's cores (1.3x-1.65x rows/s
        # on an H100, BENCHMARKS.md); CPU actors keep to their threads_per_actor.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.device == "cuda" else "false"
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.logits_type = pa.float16() if logits_dtype == "float16" else pa.float32()
        self.tokenizers = Tokenizers(teachers)
        self.teachers = []  # (teacher, model, its label tokens and log prior if it is an LLM)
        for t, k in zip(teachers, self.tokenizers.of_teacher):
            auto = AutoModelForCausalLM if t.kind == "llm" else AutoModelForSequenceClassification
            try:
                model = auto.from_pretrained(t.model, revision=t.revision)
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot load teacher {t.name!r} from {t.model}: {e}") from e
            model = model.to(self.device).eval()
            tokens = None
            if t.kind == "llm":
                # a TeacherInfo carries the tokens checked on the driver; a TeacherConfig is checked here
                tokens = getattr(t, "label_token_ids", None) or label_token_ids(self.tokenizers.encodings[k][0], t)
            calibrated = t.kind == "llm" and (getattr(t, "calibration", None) or getattr(t, "calibrate", False))
            self.teachers.append((t, model, tokens, self._log_prior(k, model, tokens) if calibrated else None))

    def _log_prior(self, k: int, model, tokens: list[list[int]]) -> np.ndarray:
        """Contextual calibration: the log of the label-word distribution (among the label words) that the
        LM gives content-free posts, averaged over them."""
        ids, _ = self.tokenizers.encode(k, CALIBRATION["content_free"])
        logp, _ = self._outputs(ids, self.tokenizers.encodings[k][0], model, None, tokens)
        probs = np.exp(logp - logp.max(axis=1, keepdims=True))
        return np.log((probs / probs.sum(axis=1, keepdims=True)).mean(axis=0))

    def _outputs(self, ids: pa.ListArray, tokenizer, model, pooling: str | None,
                 label_tokens: list[list[int]] | None):
        lengths = np.diff(ids.offsets.to_numpy()[:len(ids) + 1])
        groups = length_groups(lengths, self.batch_size, self.batch_tokens)
        batches = zip(groups, padded_batches(ids, tokenizer, groups, pin_memory=self.device == "cuda"))
        return sorted_outputs(model, batches, len(lengths), device=self.device, amp_dtype=self.amp_dtype,
                              pooling=pooling, label_tokens=label_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if token_ids_column(0) not in batch.column_names:
            batch = self.tokenizers(batch)
        ok = batch.column("reject_reason").is_null().to_numpy(zero_copy_only=False)
        keep = pa.array(ok)
        columns = {n: batch.column(n) for n in batch.column_names if not n.startswith(("_token_ids_", "_truncated_"))}
        truncated = np.zeros(len(ok), dtype=bool)
        for (t, model, tokens, log_prior), k in zip(self.teachers, self.tokenizers.of_teacher):
            pooling = _pooling(t)
            width = len(tokens) if tokens is not None else model.config.num_labels
            outputs = {logits_column(t.name): (np.full((len(ok), width), np.nan, np.float32),
                                               self.logits_type)}  # rejected rows keep NaN
            if pooling:
                outputs[representation_column(t.name)] = (np.full((len(ok), hidden_width(model.config)), np.nan,
                                                                  np.float32), pa.float16())
            if ok.any():
                ids = pc.filter(batch.column(token_ids_column(k)), keep).combine_chunks()
                computed = self._outputs(ids, self.tokenizers.encodings[k][0], model, pooling, tokens)
                for (values, _), result in zip(outputs.values(), computed):
                    if result is not None:
                        values[ok] = result
                if log_prior is not None:  # calibrated: p(label | post) / p(label | content-free post)
                    outputs[logits_column(t.name)][0][ok] -= log_prior
            truncated |= batch.column(truncated_column(k)).to_numpy(zero_copy_only=False)
            for column, (values, value_type) in outputs.items():
                flat = pa.array(values.reshape(-1), pa.float32()).cast(value_type)
                columns[column] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        columns["truncated"] = pa.array(truncated)
        return pa.table(columns)


def _pooling(teacher: TeacherConfig | TeacherInfo) -> str | None:
    """How a teacher's representation is pooled ('mean', 'cls'), None if it stores none."""
    r = teacher.representation
    return r.pooling if isinstance(r, RepresentationInfo) else r


class PromptedLM:
    """An LLM teacher where kd-ray evaluates a classifier: ``logits(texts, batch_size)`` are its label-word
    log-probabilities (calibrated if it is), through the labeler itself; ``model``, ``path`` and ``layout``
    as kd_ray.models.multitask.MultiTaskClassifier has them."""

    def __init__(self, cfg: TeacherConfig, *, batch_size: int = 64):
        import torch

        self.cfg, self.path = cfg, cfg.model
        # the threads the evaluation set, not the labeler's default of one per actor
        self.labeler = TeacherLabeler([cfg], batch_size=batch_size, threads=torch.get_num_threads())
        self.model = self.labeler.teachers[0][1]
        self.layout = [TaskSlice(name=cfg.task, labels=tuple(cfg.labels))]

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.labeler.batch_size = batch_size
        n = len(texts)
        out = self.labeler(pa.table({"id": [str(i) for i in range(n)], "text": texts,
                                     "label": pa.nulls(n, pa.int32()), "reject_reason": pa.nulls(n, pa.string())}))
        column = out.column(logits_column(self.cfg.name)).combine_chunks()
        return column.flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.float32)
