"""Teachers: check a model before any worker loads it, and run it over batches of texts.

``TeacherLabeler`` is the Ray-free core of labeling: a callable that turns an Arrow
batch of rows into the same rows plus each teacher's raw logits. ``kd_ray.label``
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

from kd_ray.errors import ModelError
from kd_ray.inference import (encode, encoder, hidden_width, is_classifier_config, length_groups, padded_batches,
                              sorted_outputs)
from kd_ray.soft_labels import ModelInfo, RepresentationInfo, TeacherInfo, logits_column, representation_column

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
                   hash_weights: bool = True) -> ModelInfo:
    """Check that ``model`` is a loadable sequence classifier; return its provenance.

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
    if not is_classifier_config(config):
        raise ModelError(
            f"{what} {model!r} is a {architectures or config.model_type} model, not a sequence classifier "
            f"(its config.architectures should end in 'ForSequenceClassification'); fine-tune it first with "
            f"`kd-ray finetune`"
        )
    id2label = {str(k): v for k, v in sorted(config.id2label.items(), key=lambda kv: int(kv[0]))}
    return ModelInfo(
        model=str(folder.resolve()) if is_local else model,
        revision=revision,
        weights_sha256=(weights_sha256(folder) if is_local else f"hub:{model}@{revision or 'main'}")
        if hash_weights else None,
        id2label=id2label,
        architecture=architectures[0],
    )


def teacher_metadata(cfg: TeacherConfig) -> TeacherInfo:
    from transformers import AutoConfig

    info = describe_model(cfg.model, revision=cfg.revision)
    representation = None
    if cfg.representation:
        width = hidden_width(AutoConfig.from_pretrained(info.model, revision=cfg.revision))
        representation = RepresentationInfo(pooling=cfg.representation, width=width)
    return TeacherInfo(**info.model_dump(), name=cfg.name, task=cfg.task, max_length=cfg.max_length,
                       representation=representation)


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
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(t.model, revision=t.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of teacher {t.name!r} from {t.model}: {e}") from e


class Tokenizers:
    """Callable: Arrow batch of rows -> the same rows plus, per distinct encoding (teachers fine-tuned
    from one base share theirs), token ids (``_token_ids_<k>``, list<int32>) and ``_truncated_<k>``.

    The CPU half of labeling: Ray Data runs it as its own stage, so that a GPU actor's next block
    is tokenized on other cores while it runs the last one; ``TeacherLabeler`` runs it itself
    when its rows come without token ids."""

    def __init__(self, teachers: list[TeacherConfig | TeacherInfo]):
        self.encodings: list[tuple] = []  # (tokenizer, Rust backend, max_length) of each distinct encoding
        self.of_teacher: list[int] = []  # index of each teacher's encoding
        keys: list[tuple] = []
        for t in teachers:
            tokenizer = load_tokenizer(t)
            key = _tokenizer_key(tokenizer, t.max_length)
            if key not in keys:
                keys.append(key)
                self.encodings.append((tokenizer, encoder(tokenizer, t.max_length), t.max_length))
            self.of_teacher.append(keys.index(key))

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = batch.column("reject_reason").is_null().to_numpy(zero_copy_only=False)
        good = pc.filter(batch.column("text"), pa.array(ok)).to_pylist()
        rows = np.flatnonzero(ok)
        for k, (tokenizer, backend, max_length) in enumerate(self.encodings):
            ids, cut = encode(tokenizer, good, max_length, backend)
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
        from transformers import AutoModelForSequenceClassification

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
        self.teachers = []
        for t in teachers:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(t.model, revision=t.revision)
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot load teacher {t.name!r} from {t.model}: {e}") from e
            self.teachers.append((t, model.to(self.device).eval()))

    def _outputs(self, ids: pa.ListArray, tokenizer, model, pooling: str | None):
        lengths = np.diff(ids.offsets.to_numpy()[:len(ids) + 1])
        groups = length_groups(lengths, self.batch_size, self.batch_tokens)
        batches = zip(groups, padded_batches(ids, tokenizer, groups, pin_memory=self.device == "cuda"))
        return sorted_outputs(model, batches, len(lengths), device=self.device, amp_dtype=self.amp_dtype,
                              pooling=pooling)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if token_ids_column(0) not in batch.column_names:
            batch = self.tokenizers(batch)
        ok = batch.column("reject_reason").is_null().to_numpy(zero_copy_only=False)
        keep = pa.array(ok)
        columns = {n: batch.column(n) for n in batch.column_names if not n.startswith(("_token_ids_", "_truncated_"))}
        truncated = np.zeros(len(ok), dtype=bool)
        for (t, model), k in zip(self.teachers, self.tokenizers.of_teacher):
            pooling = _pooling(t)
            outputs = {logits_column(t.name): (np.full((len(ok), model.config.num_labels), np.nan, np.float32),
                                               self.logits_type)}  # rejected rows keep NaN
            if pooling:
                outputs[representation_column(t.name)] = (np.full((len(ok), hidden_width(model.config)), np.nan,
                                                                  np.float32), pa.float16())
            if ok.any():
                ids = pc.filter(batch.column(token_ids_column(k)), keep).combine_chunks()
                for (values, _), computed in zip(outputs.values(),
                                                 self._outputs(ids, self.tokenizers.encodings[k][0], model, pooling)):
                    if computed is not None:
                        values[ok] = computed
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
