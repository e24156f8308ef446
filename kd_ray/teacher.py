"""Teachers: check a model before any worker loads it, and run it over batches of texts.

``TeacherLabeler`` is the Ray-free core of labeling: a callable that turns an Arrow
batch of rows into the same rows plus each teacher's raw logits. ``kd_ray.label``
hands it to Ray Data as an actor class.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from kd_ray.errors import ModelError
from kd_ray.inference import padded_batches, sorted_logits
from kd_ray.soft_labels import ModelInfo, TeacherInfo, logits_column

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
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
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
    info = describe_model(cfg.model, revision=cfg.revision)
    return TeacherInfo(**info.model_dump(), name=cfg.name, task=cfg.task, max_length=cfg.max_length)


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


class TeacherLabeler:
    """Callable: Arrow batch with ``id, text, label, reject_reason`` -> soft-label rows.

    Each teacher tokenizes with its own tokenizer (once per block for teachers that share one).
    Rows are sorted by token length and cut into batches of ``batch_size`` so that little
    compute goes to padding.
    """

    def __init__(self, teachers: list[TeacherConfig | TeacherInfo], *, batch_size: int, num_gpus: float = 0.0,
                 threads: int = 1, precision: str = "auto", logits_dtype: str = "float32"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if pick_device(num_gpus) == "cpu":
            torch.set_num_threads(threads)
        self.device = pick_device(num_gpus)
        # A GPU actor is starved by tokenizing: let the Rust tokenizer use the node's cores (1.3x-1.65x
        # rows/s on an H100, BENCHMARKS.md). CPU actors keep to their threads_per_actor.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.device == "cuda" else "false"
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.batch_size = batch_size
        self.logits_type = pa.float16() if logits_dtype == "float16" else pa.float32()
        self.teachers = []
        for t in teachers:
            try:
                tokenizer = AutoTokenizer.from_pretrained(t.model, revision=t.revision)
                model = AutoModelForSequenceClassification.from_pretrained(t.model, revision=t.revision)
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot load teacher {t.name!r} from {t.model}: {e}") from e
            model.to(self.device).eval()
            self.teachers.append((t, tokenizer, model))
        # Teachers fine-tuned from one base share its tokenizer: a block is tokenized once for all of them
        self.encoding_keys = [_tokenizer_key(tok, t.max_length) for t, tok, _ in self.teachers]

    @staticmethod
    def _encode(texts: list[str], tokenizer, max_length: int):
        enc = tokenizer(texts, truncation=True, max_length=max_length)  # one call for the whole block
        truncated = np.array([len(e.overflowing) > 0 for e in enc.encodings], dtype=bool) if enc.encodings else (
            np.array([len(ids) >= max_length for ids in enc["input_ids"]], dtype=bool))
        return enc, truncated

    def _logits(self, encoded, tokenizer, model) -> tuple[np.ndarray, np.ndarray]:
        enc, truncated = encoded
        lengths = np.array([len(ids) for ids in enc["input_ids"]])
        order = np.argsort(-lengths, kind="stable")  # longest first: a too-big batch fails at once
        groups = [order[start:start + self.batch_size] for start in range(0, len(lengths), self.batch_size)]
        batches = zip(groups, padded_batches(enc, tokenizer, groups, pin_memory=self.device == "cuda"))
        return sorted_logits(model, batches, len(lengths), device=self.device, amp_dtype=self.amp_dtype), truncated

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = batch.column("reject_reason").is_null().to_numpy(zero_copy_only=False)
        texts = batch.column("text").to_pylist()
        good = [texts[i] for i in np.flatnonzero(ok)]
        columns = {name: batch.column(name) for name in batch.column_names}  # ids, text, gold labels, reasons
        truncated_any = np.zeros(len(texts), dtype=bool)
        encodings: dict = {}
        for (t, tokenizer, model), key in zip(self.teachers, self.encoding_keys):
            width = model.config.num_labels
            logits = np.full((len(texts), width), np.nan, dtype=np.float32)  # rejected rows keep NaN
            if good:
                if key not in encodings:
                    encodings[key] = self._encode(good, tokenizer, t.max_length)
                logits[ok], truncated = self._logits(encodings[key], tokenizer, model)
                truncated_any[ok] |= truncated
            flat = pa.array(logits.reshape(-1), pa.float32()).cast(self.logits_type)
            columns[logits_column(t.name)] = pa.FixedSizeListArray.from_arrays(flat, width)
        columns["truncated"] = pa.array(truncated_any)
        return pa.table(columns)

