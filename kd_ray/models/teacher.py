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

from kd_ray.data.soft_labels import ModelInfo, PredictionsInfo, RepresentationInfo, TeacherInfo, representation_column
from kd_ray.errors import ModelError
from kd_ray.models.inference import (encode, encode_prompts, encoder, hidden_width, is_classifier_config, length_groups,
                                     padded_batches, sorted_outputs)
from kd_ray.models.multitask import MultiTaskClassifier, TaskSlice, task_predictions
from kd_ray.models.onnx import OnnxModel

if TYPE_CHECKING:  # the labeler runs where only torch, transformers and pyarrow are installed
    from kd_ray.config import TeacherConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def weights_sha256(folder: Path) -> str:
    """sha256 over a model folder's weight files (shards included), in name order; or over one model file."""
    digest = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def describe_model(model: str, *, revision: str | None = None, what: str = "teacher",
                   hash_weights: bool = True, labels: list[str] | None = None) -> ModelInfo:
    """Check that ``model`` is a loadable sequence classifier (or, given the ``labels`` an LLM teacher
    names, a causal LM; or an .onnx file beside its config.json); return its provenance.

    Loads only the config (and hashes local weights), so it is cheap on the driver.
    """
    from transformers import AutoConfig

    folder = weights = Path(model).expanduser()
    is_local = folder.exists() or model.startswith((".", "/", "~"))
    if model.endswith(".onnx"):
        if not weights.is_file():
            raise ModelError(f"{what} model file {model} does not exist (an .onnx file `kd-ray export` wrote)")
        folder = weights.parent
    if is_local:
        if not folder.is_dir():
            raise ModelError(f"{what} model folder {model} does not exist")
        if not (folder / "config.json").is_file():
            raise ModelError(f"{what} model folder {folder} has no config.json: not a Hugging Face model folder "
                             "(or an export's)")
        if weights == folder and not any((folder / w).is_file() for w in WEIGHT_FILES):
            raise ModelError(f"{what} model folder {model} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    try:
        config = AutoConfig.from_pretrained(str(folder) if is_local else model, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the {what} config from {model!r}: {e}") from e
    architectures = config.architectures or []
    if labels is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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
        model=str(weights.resolve()) if is_local else model,
        revision=revision,
        weights_sha256=(weights_sha256(weights) if is_local else f"hub:{model}@{revision or 'main'}")
        if hash_weights else None,
        id2label=id2label,
        architecture=architectures[0] if architectures else config.model_type,
    )


class ClassifierTeacher:
    """A fine-tuned sequence classifier as a teacher: its logits (and, if asked, its pooled last hidden
    states) are stored. The interface every kind of teacher has: ``describe`` on the driver, then, where
    it runs, ``load_tokenizer``, ``encode``, ``load``, ``ready`` and ``width``."""

    auto_class = "AutoModelForSequenceClassification"
    encoder = True  # a student can be cut from it
    label_tokens: list[list[int]] | None = None  # the output's label tokens (prompted LMs)
    log_prior: np.ndarray | None = None  # subtracted from every row's logits (calibration)

    def __init__(self, info: TeacherInfo):
        self.info = info

    @classmethod
    def describe(cls, cfg: TeacherConfig, *, hash_weights: bool = True) -> TeacherInfo:
        """Check ``cfg``'s model before any worker loads it; its provenance as the soft labels record it."""
        from transformers import AutoConfig

        info = describe_model(cfg.model, revision=cfg.revision, hash_weights=hash_weights)
        if cfg.labels is not None and info.labels != cfg.labels:
            raise ModelError(f"teacher {cfg.name!r} ({cfg.model}) predicts {info.labels}, but its labels are set to "
                             f"{cfg.labels}: give the labels in the classifier's order, or another teacher")
        extra = {}
        if cfg.representation:
            width = hidden_width(AutoConfig.from_pretrained(info.model, revision=cfg.revision))
            # a dict of every field, so that all of them are stored (the soft labels keep the fields given)
            extra["representation"] = RepresentationInfo(pooling=cfg.representation, width=width).model_dump()
        return TeacherInfo(**info.model_dump(), name=cfg.name, task=cfg.task, max_length=cfg.max_length, **extra)

    @property
    def encoding(self) -> tuple:
        """What besides the tokenizer decides a text's token ids (a prompt)."""
        return ()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.info.model, revision=self.info.revision)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load the tokenizer of teacher {self.info.name!r} from {self.info.model}: "
                             f"{e}") from e

    def encode(self, tokenizer, backend, texts: list[str]) -> tuple[pa.ListArray, np.ndarray]:
        return encode(tokenizer, texts, self.info.max_length, backend)

    def load(self, device: str):
        import transformers

        try:
            model = getattr(transformers, self.auto_class).from_pretrained(self.info.model, revision=self.info.revision)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load teacher {self.info.name!r} from {self.info.model}: {e}") from e
        return model.to(device).eval()

    def ready(self, model, tokenizer, outputs) -> None:
        """Set up what the teacher needs once its model is loaded; ``outputs(texts)``: its logits of texts."""

    def width(self, model) -> int:
        return model.config.num_labels

    def classifier(self, task: str, batch_size: int):
        """The teacher where kd-ray scores a classifier (``kd-ray evaluate``): the classifier itself."""
        return MultiTaskClassifier.from_pretrained(self.info.model, task=task, max_length=self.info.max_length)


# Contextual calibration (Zhao et al. 2021): the label-word probabilities of content-free posts
CALIBRATION = {"method": "contextual", "content_free": ["N/A", "", "[MASK]"]}


class PromptedTeacher(ClassifierTeacher):
    """A (instruction-tuned) causal LM prompted with each post: its logits are the next-token
    log-probabilities of the label words (divided by those of content-free posts when calibrated)."""

    auto_class = "AutoModelForCausalLM"
    encoder = False

    @classmethod
    def describe(cls, cfg: TeacherConfig, *, hash_weights: bool = True) -> TeacherInfo:
        info = describe_model(cfg.model, revision=cfg.revision, hash_weights=hash_weights, labels=cfg.labels)
        common = {**info.model_dump(), "name": cfg.name, "task": cfg.task, "max_length": cfg.max_length,
                  "kind": cfg.kind}
        words = dict(zip(cfg.labels, cfg.label_words))
        tokenizer = cls(TeacherInfo(**common)).load_tokenizer()
        used = {k: v for k, v in {"calibration": CALIBRATION if cfg.calibrate else None, "chat": cfg.chat}.items() if v}
        return TeacherInfo(**common, prompt=cfg.prompt, prompt_sha256=hashlib.sha256(cfg.prompt.encode()).hexdigest(),
                           verbalizer=words, label_token_ids=label_token_ids(tokenizer, cfg.name, cfg.model, words),
                           **used)

    @property
    def encoding(self) -> tuple:
        return (self.info.prompt, self.info.chat)

    def load_tokenizer(self):
        """Pads on the left (the label word follows each prompt's last token), with its end-of-text token if
        it has no pad token."""
        tokenizer = super().load_tokenizer()
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def encode(self, tokenizer, backend, texts: list[str]) -> tuple[pa.ListArray, np.ndarray]:
        return encode_prompts(tokenizer, texts, self.info.max_length, self.info.prompt, self.info.chat)

    def ready(self, model, tokenizer, outputs) -> None:
        """The label tokens checked on the driver; with calibration, the log of the label-word distribution
        (among the label words) the LM gives content-free posts, averaged over them."""
        self.label_tokens = self.info.label_token_ids
        if self.info.calibration:
            logp = outputs(self.info.calibration["content_free"])
            probs = np.exp(logp - logp.max(axis=1, keepdims=True))
            self.log_prior = np.log((probs / probs.sum(axis=1, keepdims=True)).mean(axis=0))

    def width(self, model) -> int:
        return len(self.label_tokens)

    def classifier(self, task: str, batch_size: int):
        """Scored by the label-word log-probabilities it labels with, through the labeler itself."""
        return TeacherClassifier(self.info, batch_size=batch_size)


class OnnxTeacher(ClassifierTeacher):
    """A classifier `kd-ray export` wrote: its .onnx file run by ONNX Runtime on CPU, its tokenizer and labels from
    the file's folder. Scores posts (`kd-ray predict`, `kd-ray serve`, `kd-ray evaluate`); no student is cut from
    it."""

    encoder = False

    @classmethod
    def describe(cls, cfg: TeacherConfig, *, hash_weights: bool = True) -> TeacherInfo:
        if cfg.representation:
            raise ModelError(f"teacher {cfg.name!r}: an .onnx file has only its logits; representation is stored "
                             "from PyTorch classifiers")
        info = super().describe(cfg, hash_weights=hash_weights)
        return TeacherInfo(**info.model_dump(exclude_unset=True) | {"kind": cfg.kind})

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(Path(self.info.model).parent)

    def load(self, device: str):
        return OnnxModel(self.info.model).to(device)


TEACHERS = {"classifier": ClassifierTeacher, "llm": PromptedTeacher, "onnx": OnnxTeacher}  # TeacherConfig.kind -> class


def make_teacher(spec: TeacherConfig | TeacherInfo, *, hash_weights: bool = False) -> ClassifierTeacher:
    """The teacher ``spec`` describes: a TeacherInfo was checked on the driver; a TeacherConfig is checked here
    (its ``info``: the provenance the soft labels record, the weights hashed with ``hash_weights``)."""
    cls = TEACHERS[spec.kind]
    return cls(spec if isinstance(spec, TeacherInfo) else cls.describe(spec, hash_weights=hash_weights))


def label_token_ids(tokenizer, name: str, model: str, words: dict[str, list[str]]) -> list[list[int]]:
    """The token of each word of each label, checked: one token each, all distinct."""
    ids = []
    for label, label_words in words.items():
        ids.append([])
        for word in label_words:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                pieces = tokenizer.convert_ids_to_tokens(tokens)
                raise ModelError(f"teacher {name!r}: label {label!r}'s word {word!r} is {len(tokens)} tokens "
                                 f"{pieces} in {model}'s tokenizer; each label word must be one token (set "
                                 f"verbalizer, e.g. a shorter word or one with a leading space)")
            ids[-1].append(tokens[0])
    flat = [i for group in ids for i in group]
    if len(set(flat)) != len(flat):
        raise ModelError(f"teacher {name!r}: label words {list(words.values())} are not distinct tokens ({ids})")
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


class Tokenizers:
    """Callable: Arrow batch of rows -> the same rows plus, per distinct encoding (teachers fine-tuned
    from one base share theirs), token ids (``_token_ids_<k>``, list<int32>) and ``_truncated_<k>``.

    The CPU half of labeling: Ray Data runs it as its own stage, so that a GPU actor's next block
    is tokenized on other cores while it runs the last one; ``TeacherLabeler`` runs it itself
    when its rows come without token ids."""

    def __init__(self, teachers: list[ClassifierTeacher]):
        self.encodings: list[tuple] = []  # (teacher, tokenizer, Rust backend) of each distinct encoding
        self.of_teacher: list[int] = []  # index of each teacher's encoding
        keys: list[tuple] = []
        for t in teachers:
            tokenizer = t.load_tokenizer()
            key = (*_tokenizer_key(tokenizer, t.info.max_length), t.encoding)
            if key not in keys:
                keys.append(key)
                self.encodings.append((t, tokenizer, encoder(tokenizer, t.info.max_length)))
            self.of_teacher.append(keys.index(key))

    def encode(self, k: int, texts: list[str]) -> tuple[pa.ListArray, np.ndarray]:
        """Encoding ``k``'s token ids of ``texts`` and which were cut."""
        teacher, tokenizer, backend = self.encodings[k]
        return teacher.encode(tokenizer, backend, texts)

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
    return Tokenizers([make_teacher(TeacherInfo.model_validate(t)) for t in json.loads(teachers)])


def tokenize_batch(batch: pa.Table, teachers: list[TeacherInfo]) -> pa.Table:
    """The tokenize stage's Ray Data function: each worker process loads the tokenizers once."""
    return _cached_tokenizers(json.dumps([t.model_dump() for t in teachers]))(batch)


class TeacherLabeler:
    """Callable: Arrow batch with ``id, text, label, reject_reason`` (and token ids, if a tokenize
    stage ran) -> soft-label rows: the same rows plus each teacher's raw logits and ``truncated``.

    Rows are sorted by token length and cut into batches of ``batch_size`` rows (and at most
    ``batch_tokens`` padded tokens) so that little compute goes to padding. With ``predictions`` (one
    model: `kd-ray predict`, `kd-ray serve`), each of its tasks' predicted label and probabilities too.
    """

    def __init__(self, teachers: list[TeacherConfig | TeacherInfo], *, batch_size: int, num_gpus: float = 0.0,
                 threads: int = 1, precision: str = "auto", logits_dtype: str = "float32",
                 batch_tokens: int | None = None, predictions: PredictionsInfo | dict | None = None):
        import torch

        self.device = pick_device(num_gpus)
        if self.device == "cpu":
            torch.set_num_threads(threads)
        # A GPU actor that tokenizes for itself lets the Rust tokenizer use the node's cores; CPU actors keep
        # to their threads_per_actor.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.device == "cuda" else "false"
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.logits_type = pa.float16() if logits_dtype == "float16" else pa.float32()
        self.teachers = [make_teacher(t) for t in teachers]
        self.predictions = PredictionsInfo.model_validate(predictions) if predictions else None
        if self.predictions and len(self.teachers) != 1:
            raise ValueError("predictions are made by one model")
        self.tokenizers = Tokenizers(self.teachers)
        self.models = []
        for t, k in zip(self.teachers, self.tokenizers.of_teacher):
            model = t.load(self.device)
            tokenizer = self.tokenizers.encodings[k][1]
            t.ready(model, tokenizer, lambda texts: self._outputs(self.tokenizers.encode(k, texts)[0], tokenizer,
                                                                  model, None, t.label_tokens)[0])
            self.models.append(model)

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
        logits = {}  # teacher column -> its (rows, labels) logits
        for t, model, k in zip(self.teachers, self.models, self.tokenizers.of_teacher):
            pooling = t.info.representation.pooling if t.info.representation else None
            outputs = {t.info.column: (np.full((len(ok), t.width(model)), np.nan, np.float32),
                                       self.logits_type)}  # rejected rows keep NaN
            if pooling:
                outputs[representation_column(t.info.name)] = (np.full((len(ok), hidden_width(model.config)), np.nan,
                                                                       np.float32), pa.float16())
            if ok.any():
                ids = pc.filter(batch.column(token_ids_column(k)), keep).combine_chunks()
                computed = self._outputs(ids, self.tokenizers.encodings[k][1], model, pooling, t.label_tokens)
                for (values, _), result in zip(outputs.values(), computed):
                    if result is not None:
                        values[ok] = result
                if t.log_prior is not None:  # calibrated: p(label | post) / p(label | content-free post)
                    outputs[t.info.column][0][ok] -= t.log_prior
            truncated |= batch.column(truncated_column(k)).to_numpy(zero_copy_only=False)
            logits[t.info.column] = outputs[t.info.column][0]
            for column, (values, value_type) in outputs.items():
                flat = pa.array(values.reshape(-1), pa.float32()).cast(value_type)
                columns[column] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        columns["truncated"] = pa.array(truncated)
        if self.predictions:
            joint = logits[self.teachers[0].info.column]
            for task, (index, probs) in task_predictions(joint, self.predictions.tasks).items():
                label, probs_column = self.predictions.columns(task)
                columns[label] = pa.array(np.asarray(self.predictions.tasks[task], dtype=object)[index], pa.string())
                columns[probs_column] = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1])
        return pa.table(columns)


class TeacherClassifier:
    """A teacher scored where kd-ray scores a classifier (``kd-ray evaluate``): ``logits(texts,
    batch_size)`` are what it labels with, through the labeler itself; ``model``, ``path`` and ``layout`` as
    kd_ray.models.multitask.MultiTaskClassifier has them."""

    def __init__(self, info: TeacherInfo, *, batch_size: int = 64):
        import torch

        # the threads the evaluation set, not the labeler's default of one per actor
        self.labeler = TeacherLabeler([info], batch_size=batch_size, threads=torch.get_num_threads())
        self.info, self.path, self.model = info, info.model, self.labeler.models[0]
        self.layout = [TaskSlice(name=info.task, labels=tuple(info.labels))]

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.labeler.batch_size = batch_size
        n = len(texts)
        out = self.labeler(pa.table({"id": [str(i) for i in range(n)], "text": texts,
                                     "label": pa.nulls(n, pa.int32()), "reject_reason": pa.nulls(n, pa.string())}))
        column = out.column(self.info.column).combine_chunks()
        return column.flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.float32)
