"""Typed configs for every stage, loaded from YAML and overridden from the command line.

Each stage has one pydantic model. A field's ``description`` is its CLI help, its
default is the CLI default, and its ``ge``/``le``/``Literal`` constraints are the
valid range. Unknown keys are refused (``extra="forbid"``), and validation reports
every problem at once, naming the field as both its YAML key and its CLI flag.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names each bad field and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------- shared


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster to use: null starts a local Ray instance (or joins "
        "the one a `ray job submit` job runs in); 'auto' joins a running cluster; or ray://host:port.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance (null: all of this "
        "machine's).")
    dashboard: bool = Field(False, description="Start Ray's dashboard with a local instance (http://127.0.0.1:8265). "
        "Off by default: kd-ray prints its own progress, and on a laptop the dashboard's processes take a second to "
        "start and a share of the cores while they run. A cluster has its own.")


class CorpusConfig(Section):
    path: str | list[str] = Field(description="Corpus: a file, folder or glob (local, s3://, gs://) of Parquet, JSON "
        "Lines, CSV/TSV or text files; a datasets save_to_disk folder; hf://<hub name>; or a list of these.")
    format: Literal["auto", "parquet", "jsonl", "csv", "tsv", "text", "hf"] = Field("auto", description="File "
        "format; 'auto' goes by extension (.parquet, .jsonl/.json, .csv, .tsv, .txt).")
    text_column: str = Field("text", description="Column holding the post text (ignored for text files).")
    id_column: str | None = Field(None, description="Column of unique row ids; null derives a stable id "
        "'<file>:<row>' from each row's position.")
    label_column: str | None = Field(None, description="Column of gold labels, if the corpus has some.")
    unlabeled_path: str | list[str] | None = Field(None, description="More corpus, read like `path` but without gold "
        "labels even where its files carry the gold columns: an unlabeled transfer set labeled only by the teacher, "
        "next to the labeled set in `path`.")
    partial_labels: bool = Field(False, description="Files without the label column are read as unlabeled rows (a "
        "labeled set plus an unlabeled transfer set); otherwise a missing label column is an error.")
    label_names: list[str] | None = Field(None, description="Names of the gold labels; integer labels index into "
        "this list. Needed when the label column holds integers.")
    task_label_columns: dict[str, str] = Field(default_factory=dict, description="Multi-task: task -> column of that "
        "task's gold labels, for tasks other than the first teacher's (whose gold is label_column). An empty or null "
        "cell means the row has no gold label for that task: it still trains that task's distillation term.")
    split: str = Field("train", description="Split of a Hugging Face dataset (hf:// or save_to_disk folder).")
    normalize: bool = Field(False, description="Social-media normalisation: @mentions -> @user, links -> http, "
        "whitespace collapsed; emojis kept. The teacher sees and the labels store the normalised text.")
    bad_rows: Literal["error", "skip"] = Field("error", description="Null, empty, over-long or non-string texts and "
        "unknown gold labels: 'error' stops with the file and row; 'skip' keeps them out of training but records "
        "them under <output>/_rejected/ and in the summary.")
    max_text_chars: int = Field(100_000, ge=1, description="Longest text accepted, in characters; longer ones are "
        "bad rows (see bad_rows). Teachers read only max_length tokens, so a megabyte-long 'post' is almost surely "
        "broken input.")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows per file (for quick trials).")
    split_bytes: int | None = Field(64 << 20, ge=1 << 10, description="Files over this size are read by several "
        "parallel tasks, each streaming its part: JSON Lines, CSV/TSV and text files as line-aligned byte ranges, "
        "Parquet files as runs of row groups. null: one task per file. Compressed files, a CSV whose quoted fields "
        "hold newlines, and corpus.limit read each file whole.")


Verbalizer = dict[str, str | list[str]]  # an LLM teacher's label -> its word, or words whose probabilities add up


class TeacherConfig(Section):
    model: str = Field(description="Teacher: a Hugging Face sequence-classification model folder or hub id (kind "
                       "'classifier'), a causal language model's (kind 'llm'), or an .onnx file `kd-ray export` wrote "
                       "(kind 'onnx', beside its tokenizer and config.json).")
    kind: Literal["classifier", "llm", "onnx"] = Field("classifier", description="'classifier': a fine-tuned sequence "
        "classifier, its logits stored; 'llm': a (instruction-tuned) causal LM prompted with each post, its "
        "next-token log-probabilities of the label words stored as the logits; 'onnx': an exported classifier run "
        "by ONNX Runtime on CPU (a model path ending in .onnx is this kind).")
    prompt: str | None = Field(None, description="kind llm: the prompt, with {text} where the post goes (few-shot "
        "examples may precede it; write other braces as {{ }}). The label word follows it directly.")
    labels: list[str] | None = Field(None, min_length=2, description="The label set, in the order of the stored "
        "logits: an LLM teacher's (required); a classifier's, if set, must be its own (config.json's id2label).")
    verbalizer: Verbalizer | None = Field(None, description="kind llm: label -> the word that "
        "names it after the prompt, or several (their probabilities add up: e.g. [' negative', ' Negative']); each a "
        "single token of the LM's tokenizer, all distinct (null: ' ' + the label).")
    chat: bool = Field(False, description="kind llm: put the filled-in prompt in the LM's chat template as the "
        "user's message, the label word being the first token of the reply (instruction-tuned LMs answer better).")
    calibrate: bool = Field(False, description="kind llm: contextual calibration (Zhao et al. 2021): divide the "
        "label-word probabilities by those the LM gives content-free posts ('N/A', '', '[MASK]'); recorded in the "
        "metadata.")
    name: str = Field("teacher", pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Name of this teacher; its logits "
        "go to the column '<name>_logits'.")
    task: str = Field("sentiment", description="Task this teacher labels (several teachers may share a task).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text; longer texts are truncated and counted.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    representation: Literal["mean", "cls"] | None = Field(None, description="Also store the teacher's sentence "
        "representation in column '<name>_representation' (float16, its hidden size wide: 1,536 bytes a row for a "
        "base model), for loss.beta: its last hidden states averaged over the real tokens ('mean': what sentence "
        "encoders such as all-mpnet-base-v2 were trained to put meaning in) or the first token's ('cls'). null: "
        "logits only.")

    @model_validator(mode="before")
    @classmethod
    def _onnx_file(cls, data: Any) -> Any:
        onnx = isinstance(data, dict) and str(data.get("model", "")).endswith(".onnx")
        return {**data, "kind": "onnx"} if onnx and data.get("kind") in (None, "classifier") else data

    @model_validator(mode="after")
    def _llm_fields(self) -> TeacherConfig:
        if not self.prompted:
            given = [k for k in ("prompt", "verbalizer", "calibrate", "chat") if getattr(self, k) not in (None, False)]
            if given:
                raise ValueError(f"only an LLM teacher (kind: llm) takes {', '.join(given)}; a classifier's "
                                 "prompt is its own fine-tuning")
            return self
        if not self.prompt or not self.labels:
            raise ValueError("an LLM teacher (kind: llm) needs prompt (with {text}) and labels")
        try:
            filled = self.prompt.format(text="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt cannot be filled in with the post ({e!r}); {{text}} is the only placeholder, "
                             "write other braces as {{ and }}") from None
        if "\0" not in filled:
            raise ValueError("prompt has no {text} placeholder: the LM would never see the post")
        if self.verbalizer is not None and sorted(self.verbalizer) != sorted(self.labels):
            raise ValueError(f"verbalizer names labels {sorted(self.verbalizer)}, labels are {sorted(self.labels)}: "
                             "give one word for every label")
        if self.representation is not None:
            raise ValueError("representation is stored for classifier teachers only")
        return self

    @property
    def prompted(self) -> bool:
        """Whether the teacher is a prompted LM (its prompt, labels and label words are its config)."""
        return self.kind == "llm"

    @property
    def encoder(self) -> bool:
        """Whether the teacher is an encoder (a PyTorch classifier): one a student can be cut from, or fine-tuned."""
        return self.kind == "classifier"

    @property
    def label_words(self) -> list[list[str]]:
        """kind llm: the words of each label, in label order."""
        words = [(self.verbalizer or {}).get(label, f" {label}") for label in self.labels or []]
        return [[w] if isinstance(w, str) else list(w) for w in words]


class LabelComputeConfig(Section):
    concurrency: int | None = Field(None, ge=1, description="Teacher actors; null: one per GPU when num_gpus > 0, "
        "else one per CPU / threads.")
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs per teacher actor (fractions share a GPU).")
    num_cpus: float = Field(0.5, gt=0, le=64, description="CPUs Ray reserves per teacher actor (scheduling only; "
        "threads_per_actor sets the threads). Under 1 so that N actors on N cores leave CPUs for the read tasks: "
        "with 1 the pipeline deadlocks.")
    threads_per_actor: int = Field(1, ge=1, le=64, description="torch threads per actor on CPU.")
    batch_size: int = Field(64, ge=1, le=8192, description="Texts per forward pass.")
    batch_tokens: int | None = Field(None, ge=64, description="Also at most this many padded tokens per forward "
        "pass (rows x the batch's longest row): batches of short posts grow, batches of long ones shrink, so a GPU "
        "gets even work without running out of memory. null: batch_size rows.")
    tokenize: Literal["stage", "actor"] = Field("stage", description="Where texts are tokenized: 'stage', Ray Data "
        "tasks of their own on the CPUs the teacher actors leave (a GPU runs block N while block N+1 is tokenized; "
        "where actors and tasks ask for the same resources, as on a CPU-only machine, Ray Data fuses the two into the "
        "actors); 'actor', inside each teacher actor.")
    tokenize_cpus: float = Field(0.5, gt=0, le=64, description="CPUs Ray reserves per tokenize task.")
    block_rows: int = Field(8192, ge=1, le=1_000_000, description="Most rows an actor receives at a time; they are "
        "sorted by length and cut into batches, so larger blocks waste less compute on padding, and each block "
        "costs a Ray task. Where the corpus's size can be told from its files (not compressed ones), blocks are evened "
        "out to a multiple of the actors, so that the actors finish their last blocks together.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Inference precision: 'auto' is "
        "bf16 (fp16 on older GPUs) autocast on a GPU, fp32 on CPU.")


class LabelOutputConfig(Section):
    path: str = Field(description="Output folder (local, s3://, gs://) for the soft-label Parquet files.")
    rows_per_file: int = Field(100_000, ge=1, le=10_000_000, description="Rows per Parquet file, at least: a file closes once it holds this "
                               "many (it may run over by up to one block); the last file may hold fewer.")
    logits_dtype: Literal["float32", "float16"] = Field("float32", description="Storage type of the raw logits "
        "(float16 halves their bytes).")
    overwrite: bool = Field(False, description="Delete an existing, different output folder instead of refusing.")


class AugmentConfig(Section):
    """Perturbed copies of the posts the teacher labels (kd_ray.data.augment): more transfer text where the
    corpus is small. The copies carry no gold; only the teacher's soft labels train on them."""

    copies: int = Field(0, ge=0, le=64, description="Perturbed copies of every post (0: none). Each is labeled by "
                        "the teacher like a post, under the id '<id>#aug<k>'; labeling and distillation cost grow "
                        "by the same factor.")
    mask_prob: float = Field(0.1, ge=0, le=1, description="Chance that a word becomes the teacher's mask token "
                             "(dropped where its tokenizer has none).")
    replace_prob: float = Field(0.1, ge=0, le=1, description="Chance that a word becomes a word drawn from the posts of "
                                "the same block.")
    span_prob: float = Field(0.25, ge=0, le=1, description="Chance that a copy keeps only a random contiguous span "
                             "of at least half its words.")
    seed: int = Field(0, ge=0, description="Copies depend only on this seed, the post's id and text and its block.")

    @model_validator(mode="after")
    def _some_change(self) -> AugmentConfig:
        if self.copies and self.mask_prob + self.replace_prob > 1:
            raise ValueError(f"augment.mask_prob + augment.replace_prob must be at most 1 (the chance a word "
                             f"changes), got {self.mask_prob} + {self.replace_prob}")
        if self.copies and not (self.mask_prob or self.replace_prob or self.span_prob):
            raise ValueError("augment.copies > 0 with mask_prob, replace_prob and span_prob all 0 would label "
                             "exact copies of every post; set one of them above 0")
        return self


class LabelConfig(Section):
    """`kd-ray label`: run one or more teachers over a corpus and store their raw logits as Parquet."""

    corpus: CorpusConfig
    teachers: list[TeacherConfig] = Field(min_length=1, description="Teachers to run; each adds a logits column.")
    compute: LabelComputeConfig = Field(default_factory=LabelComputeConfig)
    output: LabelOutputConfig
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _unique_teacher_names(self) -> LabelConfig:
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names (teachers.N.name, flag --teachers.N.name) must be unique; "
                             f"{dupes} appear more than once")
        return self


# ---------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``_set_dotted(t, "teachers.0.model", "x")`` sets ``t["teachers"][0]["model"]``."""
    keys: list[Any] = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node: Any = tree
    for key, next_key in zip(keys[:-1], keys[1:]):
        empty: Any = [] if isinstance(next_key, int) else {}
        if isinstance(key, int):
            while len(node) <= key:
                node.append({})
            if not isinstance(node[key], type(empty)):
                node[key] = empty
        elif not isinstance(node.get(key), type(empty)):
            node[key] = empty
        node = node[key]
    last = keys[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        flag = "--" + ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
        got = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:  # a check across fields; its message names them
            lines += [f"  {line}" for line in msg.split("\n")]
            continue
        got_text = "" if e["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_text}  [YAML key '{loc}', flag {flag}]")
    return "\n".join(lines)


def load_config(model: type[BaseModel], path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Build ``model`` from a YAML file plus dotted overrides (``{"corpus.path": "x"}``)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of fields, got {type(tree).__name__}")
        source = str(path)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    if overrides:
        source += " + command-line overrides"
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------- training


class TrainArgs(Section):
    """Optimisation and scaling, shared by `finetune` and `distill`."""

    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training data.")
    batch_size: int = Field(32, ge=1, le=65_536, description="Examples per optimizer step on each worker.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(0.06, ge=0, le=0.5, description="Fraction of steps spent warming up the learning rate.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value (null: no clipping).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text for the model being trained.")
    seed: int = Field(0, ge=0, description="Seed for initialisation, shuffling and dropout.")
    shuffle_buffer: int = Field(10_000, ge=0, description="Rows in each worker's local shuffle buffer (0: no shuffle).")
    group_by_length: bool = Field(True, description="Batch rows of alike token counts together (in windows of "
        "length_group batches, batch order shuffled), so that little compute goes to padding.")
    length_group: int = Field(32, ge=2, le=1024, description="Batches per window that group_by_length sorts.")
    num_workers: int = Field(1, ge=0, le=1024, description="Ray Train workers (data-parallel replicas). 0: Ray "
        "Train's local mode, the loop in this process without a worker group (a breakpoint in it stops there); no "
        "checkpoint to resume from and none kept but the last, so train.keep 'auto' keeps the last epoch and 'best' "
        "is refused.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Accelerate mixed precision (GPU).")
    threads_per_worker: int | None = Field(None, ge=1, le=128, description="torch threads per worker on CPU (null: "
        "the CPUs Ray reserves for the worker, rounded).")
    num_cpus_per_worker: float | None = Field(None, gt=0, le=128, description="CPUs Ray reserves per worker (null: "
        "the smallest node's CPUs less 0.5, shared by the workers a node holds: 1.5 for 1 worker on 2 cores, 0.75 "
        "each for 2). Half a CPU stays free for the Ray Data tasks that stream the workers' data.")
    max_failures: int = Field(2, ge=-1, description="Worker failures survived by restarting from the last checkpoint (-1: no limit).")
    deterministic: bool = Field(False, description="GPU: PyTorch's deterministic kernels (torch."
        "use_deterministic_algorithms, a fixed cuBLAS workspace), so that the same config and seed give the same "
        "weights on GPUs too; slower, and an op without a deterministic kernel stops the run naming it. On CPU "
        "runs are reproducible without it.")
    keep: Literal["last", "best", "auto"] = Field("last", description="Which epoch's model becomes the output: "
        "'last'; 'best': the epoch with the highest validation macro-recall (needs validation data; a student "
        "narrowed after training picks among its epochs at ffn_size; Ray Train keeps that checkpoint besides the "
        "latest); 'auto': best with validation data, else last.")


class StudentTrainArgs(TrainArgs):
    """A student's training: TrainArgs with a student's defaults."""

    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training data (for a student narrowed after "
                        "training: those at its final width, after student.wide_epochs and narrow_steps).")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate of AdamW (a cut student takes a "
        "higher one than its teacher's fine-tuning).")
    keep: Literal["last", "best", "auto"] = Field(
        "auto", description=TrainArgs.model_fields["keep"].description + " A student's default is 'auto'.")


class EvalSetConfig(CorpusConfig):
    """Labeled data to measure quality on: a corpus whose gold labels are in column 'label' unless set."""

    label_column: str = Field("label", description="Column holding the gold label.")


class TrainStageConfig(Section):
    """What every training stage has: settings, validation data, where the model and checkpoints go."""

    output: str = Field(description="Folder for the trained model: a Hugging Face folder that `kd-ray label`, "
                        "`kd-ray evaluate` and `transformers.pipeline()` load.")
    validation: EvalSetConfig | None = Field(None, description="Labeled data scored after every epoch.")
    train: TrainArgs = Field(default_factory=TrainArgs)
    storage_path: str | None = Field(None, description="Where Ray Train keeps checkpoints (shared by all nodes); "
                                     "null: <output>/../ray_train.")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _best_needs_validation(self) -> TrainStageConfig:
        check_keep(self.train, "train", self.validation is not None, "validation")
        return self


def check_keep(train: TrainArgs, field: str, validation: bool, validation_field: str) -> None:
    """keep: best picks the epoch by its validation score, from the checkpoints a worker group keeps."""
    if train.keep == "best" and train.num_workers == 0:
        raise ValueError(f"{field}.keep is 'best', but {field}.num_workers is 0 (local mode), which keeps no "
                         f"checkpoint but the last; set {field}.keep: last or {field}.num_workers >= 1")
    if train.keep == "best" and not validation:
        raise ValueError(f"{field}.keep is 'best', which picks the epoch by its validation score, but "
                         f"{validation_field} is not set; set {validation_field}.path or {field}.keep: last")


class FinetuneConfig(TrainStageConfig):
    """`kd-ray finetune`: train a teacher classifier on gold labels."""

    data: CorpusConfig = Field(description="Labeled training data; rows without a gold label are skipped.")
    base_model: str = Field(description="Pretrained encoder to start from: a model folder or hub id.")
    labels: list[str] = Field(min_length=2, description="The label set, in the order the model's outputs take.")


class StudentConfig(Section):
    kind: Literal["cut", "pretrained", "config"] = Field("cut", description="'cut': keep num_layers of the teacher's "
        "layers (DistilBERT-style); 'pretrained': any model folder or hub id in `model`; 'config': a fresh small "
        "BERT with the teacher's vocabulary.")
    model: str | None = Field(None, description="For 'cut': the model to cut, the teacher (null: the soft labels' "
        "teacher) or any pretrained BERT-like encoder with its own tokenizer (e.g. MiniLM-L6 for an MPNet teacher; "
        "it gets a fresh head). For 'pretrained': the student's folder or hub id.")
    num_layers: int = Field(3, ge=1, le=48, description="Encoder layers of a 'cut' or 'config' student.")
    layer_selection: Literal["spread", "bottom", "top"] | list[int] = Field("spread", description="Which of the "
        "source model's layers a 'cut' keeps: 'spread' (evenly spaced, first and last kept), 'bottom' (the lowest "
        "num_layers), 'top', or a list of layer indices (num_layers defaults to its length).")
    ffn_size: int | float | None = Field(0.25, description="For 'cut': feed-forward neurons each kept layer keeps, "
        "those with the largest in and out weight norms: a count, or a fraction in (0, 1] of the teacher's "
        "(MiniLM-L6 has 1536, so 0.25 keeps 384; null: all).")
    wide_epochs: int = Field(2, ge=0, le=100, description="With ffn_size: epochs the cut student first trains at the "
        "teacher's full feed-forward width; it is then narrowed to ffn_size (in narrow_steps) and trains train.epochs "
        "more, on a fresh learning-rate schedule (0: narrowed before training). ")
    narrow_steps: int = Field(3, ge=1, le=10, description="With wide_epochs: reach ffn_size in this many steps, one "
        "an epoch, each keeping the same share of the neurons (2 steps from 1536 to 384: 768 for one epoch, then "
        "384 for train.epochs), each on a fresh learning-rate schedule over the epochs left.")
    hidden_size: int = Field(256, ge=8, le=8192, description="Hidden size of a 'config' student.")
    num_attention_heads: int = Field(4, ge=1, le=128, description="Attention heads of a 'config' student.")
    intermediate_size: int = Field(1024, ge=8, le=32768, description="Feed-forward size of a 'config' student.")

    def check_source(self, teacher: str, *, encoder: bool) -> None:
        """A student built from its teacher (a cut or its config, no student.model) needs an encoder teacher."""
        if not encoder and self.kind != "pretrained" and self.model is None:
            raise ValueError(f"student.kind={self.kind} builds the student from the teacher, but {teacher} is a "
                             "causal LM, not an encoder; set student.model to the encoder to cut (e.g. "
                             "all-MiniLM-L6-v2) or use student.kind: pretrained")

    @field_validator("ffn_size", mode="before")
    @classmethod
    def _count_or_fraction(cls, value: Any) -> Any:
        """One message for anything but a number: pydantic would report the int and float members apart,
        under flags that do not exist."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("expected a neuron count (e.g. 768), a fraction in (0, 1] (e.g. 0.5) or null")
        return value

    @field_validator("ffn_size")
    @classmethod
    def _in_range(cls, size: int | float | None) -> int | float | None:
        if isinstance(size, float) and not 0 < size <= 1 or isinstance(size, int) and not 1 <= size <= 32768:
            raise ValueError("must be a neuron count in [1, 32768] or a fraction in (0, 1]")
        return size

    @model_validator(mode="before")
    @classmethod
    def _narrowing_defaults(cls, data: Any) -> Any:
        """The narrowing defaults (ffn_size, wide_epochs, narrow_steps) apply to cut students narrowed after
        training; set, they must make sense."""
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "cut")
        if isinstance(data.get("layer_selection"), list) and "num_layers" not in data:
            data = {**data, "num_layers": len(data["layer_selection"])}
        if kind != "cut":
            if data.get("ffn_size") is not None or data.get("wide_epochs") or data.get("narrow_steps", 1) != 1:
                raise ValueError(f"student.ffn_size, wide_epochs and narrow_steps narrow a 'cut' student; a '{kind}' "
                                 "student would ignore them (a 'config' student's width is student.intermediate_size)")
            return {**data, "ffn_size": None, "wide_epochs": 0, "narrow_steps": 1}
        if "ffn_size" in data and data["ffn_size"] is None and "wide_epochs" not in data:
            data = {**data, "wide_epochs": 0}  # a full-width student has nothing to narrow
        if data.get("wide_epochs") == 0 and "narrow_steps" not in data:
            data = {**data, "narrow_steps": 1}  # narrowed before training: in one cut
        return data

    @property
    def epochs_before_final_width(self) -> int:
        """Epochs before the student has its final width: the wide ones, then one for each narrowing step
        before the last (0 for a student narrowed before training, whose narrow_steps is 1)."""
        return self.wide_epochs + self.narrow_steps - 1

    @model_validator(mode="after")
    def _listed_layers(self) -> StudentConfig:
        layers = self.layer_selection
        if isinstance(layers, list) and (len(layers) != self.num_layers or layers != sorted(set(layers))
                                         or min(layers) < 0):
            raise ValueError(f"student.layer_selection {layers} must list num_layers ({self.num_layers}) distinct "
                             "layer indices (from 0) in increasing order")
        return self

    @model_validator(mode="after")
    def _ffn_size_cuts(self) -> StudentConfig:
        if self.wide_epochs and self.ffn_size is None:
            raise ValueError("student.wide_epochs trains at full width before narrowing to student.ffn_size, "
                             "which is not set")
        if self.narrow_steps > 1 and not self.wide_epochs:
            raise ValueError(f"student.narrow_steps ({self.narrow_steps}) narrows a student trained at full width "
                             "first; set student.wide_epochs (a student cut narrow from the start has no steps)")
        return self


class DistillLossConfig(Section):
    kind: Literal["kl", "mse", "hard"] = Field("kl", description="'kl': alpha*T^2*KL(teacher_T||student_T) + "
        "(1-alpha)*CE(gold); 'mse': on logits; 'hard': cross-entropy on the teacher's argmax.")
    temperature: float = Field(2.0, gt=0, le=100, description="Softmax temperature T of the distillation term.")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the distillation term; 1 - alpha weighs "
                         "cross-entropy on gold labels (rows without gold get only the distillation term).")
    teachers: dict[str, float] | None = Field(None, description="Teacher name -> weight, to distill from several "
        "teachers' logits at once (null: the soft labels' first teacher).")
    beta: float = Field(0.0, ge=0, le=100, description="Weight of the representation term added to each task's "
        "loss: the student's pooled last hidden states, through a learned linear projection to the teacher's width "
        "(dropped at export), against the representation the task's first teacher stored (teachers.N.representation "
        "at labeling; pooled the same way). 0: logits only.")
    representation_loss: Literal["cosine", "mse"] = Field("cosine", description="'cosine': 1 - cos(projected "
        "student, teacher) (DistilBERT); 'mse': mean squared error of the raw vectors (TinyBERT).")


class TaskLossConfig(Section):
    """One task of a multi-task student: its teachers, its weight w_k, and its own T and alpha if set."""

    teachers: dict[str, float] | None = Field(None, description="Teacher name -> weight for this task (null: every "
        "teacher of the task, equally).")
    weight: float = Field(1.0, ge=0, le=1000, description="w_k: this task's weight in L = sum_k w_k * L_k.")
    kind: Literal["kl", "mse", "hard"] | None = Field(None, description="Loss kind for this task (null: loss.kind).")
    temperature: float | None = Field(None, gt=0, le=100, description="T for this task (null: loss.temperature).")
    alpha: float | None = Field(None, ge=0, le=1, description="alpha for this task (null: loss.alpha).")
    beta: float | None = Field(None, ge=0, le=100, description="beta for this task (null: loss.beta).")


class DistillConfig(TrainStageConfig):
    """`kd-ray distill`: train a small student on a soft-label folder."""

    soft_labels: str = Field(description="Soft-label folder written by `kd-ray label`.")
    student: StudentConfig = Field(default_factory=StudentConfig)
    loss: DistillLossConfig = Field(default_factory=DistillLossConfig)
    train: StudentTrainArgs = Field(default_factory=StudentTrainArgs)
    tasks: dict[str, TaskLossConfig] | None = Field(None, description="Multi-task: task -> its loss settings; the "
        "student gets one head per task and learns L = sum_k w_k * (alpha_k * T_k^2 * KL + (1 - alpha_k) * CE on the "
        "task's gold). Null: one task, the first teacher's (or loss.teachers').")

    @model_validator(mode="after")
    def _one_way_to_pick_teachers(self) -> DistillConfig:
        if self.tasks is not None and self.loss.teachers is not None:
            raise ValueError("set teachers per task (tasks.<task>.teachers) or loss.teachers, not both")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks, when set, needs at least one task")
        return self

    @property
    def total_epochs(self) -> int:
        """Epochs a distillation reports: those at full width (student.wide_epochs), one for each narrowing step
        before the last, then train.epochs at the final width."""
        return self.student.epochs_before_final_width + self.train.epochs


# ---------------------------------------------------------------------------- tuning

# Short names for the hyperparameters people tune most; any dotted path into the distill config also works.
TUNE_ALIASES = {"temperature": "loss.temperature", "alpha": "loss.alpha", "beta": "loss.beta",
                "learning_rate": "train.learning_rate"}


class ParamSpec(Section):
    """One searched hyperparameter: a range to sample from, or values to choose or grid over."""

    distribution: Literal["uniform", "loguniform", "choice", "grid"] = Field(description="'uniform'/'loguniform' "
        "sample from [low, high]; 'choice' samples from values; 'grid' runs every value (times search.num_samples).")
    low: float | None = Field(None, description="Lower end of a uniform/loguniform range.")
    high: float | None = Field(None, description="Upper end of a uniform/loguniform range (> low).")
    values: list[Any] | None = Field(None, description="Candidates for choice/grid (at least one).")

    @model_validator(mode="after")
    def _well_formed(self) -> ParamSpec:
        if self.distribution in ("uniform", "loguniform"):
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.distribution} range needs both low and high")
            if not self.low < self.high:
                raise ValueError(f"empty range: low={self.low} must be below high={self.high}")
            if self.distribution == "loguniform" and self.low <= 0:
                raise ValueError(f"a loguniform range needs low > 0, got low={self.low}")
        elif not self.values:
            raise ValueError(f"'{self.distribution}' needs a non-empty list of values")
        return self


class SearchConfig(Section):
    """The Ray Tune search: what to vary, how many trials, and when to stop a trial early."""

    space: dict[str, ParamSpec] = Field(min_length=1, description="Hyperparameter -> range. Names: temperature, "
        "alpha, beta, learning_rate, or any dotted path into the distill config (e.g. train.weight_decay, "
        "student.num_layers; for a multi-task student tasks.<task>.alpha, tasks.<task>.temperature, "
        "tasks.<task>.weight).")
    num_samples: int = Field(8, ge=1, le=10_000, description="Trials to sample (with grid entries: repeats of the grid).")
    include_default: bool = Field(True, description="Run the distill config's own values as the first trial, so the "
        "table shows what the search gained over the defaults.")
    metric: Literal["val_macro_recall", "val_macro_f1", "val_accuracy"] = Field("val_macro_recall", description="Validation "
        "metric maximised, scored after every epoch.")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="'asha' stops trials that trail at epoch "
                                               "milestones (early stopping); 'fifo' runs every trial to the end.")
    grace_period: int = Field(1, ge=1, description="Epochs every trial gets before ASHA may stop it (at least "
                              "student.wide_epochs + student.narrow_steps: a student narrowed after training is "
                              "judged at its final width).")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the top 1/reduction_factor at each milestone.")
    max_concurrent_trials: int = Field(1, ge=1, le=1024, description="Trials running at once; each trial is a "
                                       "Ray Train run with distill.train.num_workers workers.")
    trial_cpus: float = Field(0.05, gt=0, description="CPUs reserved for each trial's driver process (it only "
                              "launches and watches the Train workers, so a sliver leaves the cores to them).")
    max_failures: int = Field(1, ge=-1, description="Times a failed trial is retried (-1: no limit).")
    seed: int = Field(0, ge=0, description="Seed of the random search.")


LOCAL_MODE_TRIALS = ("{field} is 0 (Ray Train's local mode), which a Ray Tune trial cannot run (each trial is a "
                     "Ray Train run with a worker group); set {field}: 1 or more")


class TuneConfig(Section):
    """`kd-ray tune`: search temperature, alpha and learning rate with Ray Tune, one Ray Train run per trial."""

    distill: DistillConfig = Field(description="The distillation every trial runs, before the searched values "
                                   "are set; distill.validation is required (it scores the trials).")
    search: SearchConfig
    output: str = Field(description="Run folder: trials.csv, trial_epochs.csv, best_config.yaml, the best "
                        "student (student/) and Ray Tune's experiment state (experiment/).")
    overwrite: bool = Field(False, description="Start over when the output folder holds a search with another "
                            "config (otherwise refused); a search with the same config is resumed.")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="before")
    @classmethod
    def _student_goes_to_output(cls, data: Any) -> Any:
        # Trials never export their own model; only the winner is copied, to <output>/student.
        if isinstance(data, dict) and isinstance(data.get("distill"), dict) and data.get("output"):
            data["distill"].setdefault("output", str(Path(str(data["output"])) / "student"))
        return data

    @model_validator(mode="after")
    def _searchable(self) -> TuneConfig:
        """Every searched name must be a field of the distill config, and every value one it accepts."""
        if self.distill.validation is None:
            raise ValueError("distill.validation is required: it scores every trial (flag --distill.validation.path)")
        if self.distill.train.num_workers == 0:
            raise ValueError(LOCAL_MODE_TRIALS.format(field="distill.train.num_workers"))
        base = self.distill.model_dump(mode="json")
        problems = []
        for name, spec in self.search.space.items():
            path = TUNE_ALIASES.get(name, name)
            if path == "train.epochs" and self.search.scheduler == "asha":
                problems.append("search.space.train.epochs: ASHA stops trials at distill.train.epochs, so the epoch "
                                "budget cannot be searched with it; use search.scheduler: fifo")
                continue
            if not _is_scalar_field(DistillConfig, path):
                problems.append(f"search.space.{name}: unknown hyperparameter; use one of {sorted(TUNE_ALIASES)} or "
                                "a dotted path to a number or choice in the distill config (e.g. train.weight_decay, "
                                "tasks.<task>.alpha)")
                continue
            if not _has_parent(base, path):
                problems.append(f"search.space.{name}: the distill config has no {path.rsplit('.', 1)[0]} to set "
                                f"{path.rsplit('.', 1)[1]} in (a task must be listed under distill.tasks)")
                continue
            ends = spec.values if spec.values is not None else [spec.low, spec.high]
            for value in ends:
                tree = copy.deepcopy(base)
                _set_dotted(tree, path, value)
                try:
                    DistillConfig.model_validate(tree)
                except ValidationError as e:
                    problems.append(f"search.space.{name}: value {value!r} is not allowed for {path}: "
                                    f"{e.errors()[0]['msg']}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def unwrap_optional(annotation: Any) -> Any:
    """``X`` for ``X | None``; any other annotation as it is."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1 else annotation


def section_in(annotation: Any, container: type | None = None) -> type[BaseModel] | None:
    """The config section a field holds: itself (optional or not), or with ``container`` (list, dict) the
    section its items are; None for a leaf."""
    annotation = unwrap_optional(annotation)
    if container is not None:
        args = typing.get_args(annotation) if typing.get_origin(annotation) is container else ()
        return section_in(args[-1]) if args else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_scalar_field(model: type[BaseModel], dotted: str) -> bool:
    """True when ``dotted`` names a leaf (not a section) of ``model``."""
    head, _, rest = dotted.partition(".")
    field = model.model_fields.get(head)
    if field is None:
        return False
    section = section_in(field.annotation)
    # a dict of sections (DistillConfig.tasks): the next name is a key, then a field of the section
    keyed = section_in(field.annotation, dict)
    if keyed is not None:
        _, _, after_key = rest.partition(".")
        return bool(after_key) and _is_scalar_field(keyed, after_key)
    if rest:
        return section is not None and _is_scalar_field(section, rest)
    return section is None


def _has_parent(tree: dict, dotted: str) -> bool:
    """True when every section above the leaf ``dotted`` is present in ``tree`` (a config dump)."""
    node: Any = tree
    for key in dotted.split(".")[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            return False
        node = node[key]
    return True


# ---------------------------------------------------------------------------- evaluation and the pipeline


class EvalArgs(Section):
    batch_size: int = Field(64, ge=1, le=8192, description="Texts per forward pass when scoring and timing.")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text for every model compared.")
    threads: int | None = Field(None, ge=1, le=256, description="torch threads for scoring and the CPU throughput "
        "measurement (null: every core this process may use).")
    timing_rows: int = Field(1000, ge=10, description="Test rows timed per model for throughput (rows/s).")
    timing_repeats: int = Field(3, ge=1, le=50, description="Timed passes per model, alternating; the median is kept.")


class EvaluateConfig(Section):
    """`kd-ray evaluate`: teacher and student(s) side by side on a held-out labeled set."""

    test: EvalSetConfig
    teacher: str | TeacherConfig = Field(description="Teacher: a classifier's folder or hub id, or a teacher as "
        "`kd-ray label` runs it (teachers.N: its model, kind and, for an LLM, prompt and labels), scored by the "
        "logits it labels with.")
    student: str = Field(description="Student model folder or hub id.")
    others: dict[str, str] = Field(default_factory=dict, description="More models to report, name -> folder "
                                   "(e.g. the student trained without distillation).")
    eval: EvalArgs = Field(default_factory=EvalArgs)
    output: str = Field(description="Folder for metrics.json.")


class ExportConfig(Section):
    """`kd-ray export`: a model folder to ONNX (and dynamic int8), with its tokenizer and labels, checked
    against the PyTorch model on held-out texts."""

    model: str = Field(description="Model folder to export: a kd-ray student (multi-task too) or any sequence "
        "classifier folder.")
    output: str = Field(description="Folder for model.onnx, model.int8.onnx, the tokenizer, config.json (the labels), "
        "export.json (the parity check, the optimizer's fusions, the int8 candidates) and, with trim_vocab, trimmed/.")
    parity: CorpusConfig = Field(description="Held-out texts the ONNX files are compared with the PyTorch model on "
        "(e.g. the test split; gold labels are not read).")
    parity_rows: int = Field(1000, ge=1, description="Texts of `parity` compared, the first ones.")
    quantize: bool = Field(True, description="Also write model.int8.onnx: onnxruntime's dynamic 8-bit quantization "
        "of the weights (activations quantized at run time), in the setting (uint8 or int8 weights, a scale per "
        "output channel or per tensor) that runs fastest on this CPU among those meeting min_agreement on the parity "
        "texts.")
    min_agreement: float = Field(0.99, ge=0, le=1, description="Fail the export when a file predicts PyTorch's "
        "class on a smaller share of the parity texts than this.")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text in the parity check.")
    opset: int = Field(17, ge=14, le=23, description="ONNX opset of the exported graph.")
    trim_vocab: bool = Field(False, description="Also write trimmed/: the model with only the vocabulary trim_corpus "
        "uses (special tokens and one-character pieces kept; embedding rows sliced), as an HF folder (fp32) with its "
        "ONNX files, checked against the untrimmed model on the parity texts. WordPiece and BPE tokenizers only.")
    trim_corpus: CorpusConfig | None = Field(None, description="Texts whose tokens trim_vocab keeps (e.g. the soft "
        "labels' folder: its text column). null: the soft labels the model was distilled from, found as the run's "
        "soft_labels/ folder beside the model.")

    @model_validator(mode="after")
    def _trim_corpus_needs_trim_vocab(self) -> ExportConfig:
        if self.trim_corpus is not None and not self.trim_vocab:
            raise ValueError("export.trim_corpus is set but export.trim_vocab is false: set trim_vocab true to trim "
                             "the vocabulary to it, or remove trim_corpus")
        return self


class ScoredModelConfig(Section):
    """A trained classifier that `kd-ray predict` and `kd-ray serve` run: its file, its task, its input length."""

    model: str = Field(description="The model: a Hugging Face sequence-classifier folder (a kd-ray student, multi-task "
        "too) or an .onnx file `kd-ray export` wrote (model.int8.onnx: the fast one on CPU).")
    task: str = Field("sentiment", pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="A single-task model's task: its "
        "columns are '<task>_label' and '<task>_probs' (a multi-task model names its own tasks).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text; longer texts are truncated and counted.")

    def teacher(self, name: str = "model") -> TeacherConfig:
        """The model as the labeler runs it."""
        return TeacherConfig(model=self.model, name=name, task=self.task, max_length=self.max_length)


class PredictOutputConfig(Section):
    path: str = Field(description="Output folder (local, s3://, gs://) for the prediction Parquet files.")
    rows_per_file: int = Field(100_000, ge=1, le=10_000_000, description="Rows per Parquet file, at least (the last "
        "file may hold fewer).")
    logits: bool = Field(False, description="Also store the raw logits (column 'model_logits').")
    text: bool = Field(False, description="Also store each post's text (as the model saw it).")
    overwrite: bool = Field(False, description="Delete an existing, different output folder instead of refusing.")


class PredictConfig(ScoredModelConfig):
    """`kd-ray predict`: a trained model's label and probabilities, per task, for every post of a corpus, as
    Parquet: labeling's reading, sharding, resume and exactly-once writing, with the model as the teacher."""

    corpus: CorpusConfig
    compute: LabelComputeConfig = Field(default_factory=LabelComputeConfig)
    output: PredictOutputConfig
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _no_gold(self) -> PredictConfig:
        given = [f"corpus.{k}" for k in ("label_column", "task_label_columns") if getattr(self.corpus, k)]
        if given:
            raise ValueError(f"kd-ray predict reads no gold labels, but {' and '.join(given)} is set: remove it "
                             "(`kd-ray evaluate` scores a model against gold labels)")
        return self

    def label_config(self) -> LabelConfig:
        """The labeling run that writes these predictions."""
        output = LabelOutputConfig(path=self.output.path, rows_per_file=self.output.rows_per_file,
                                   overwrite=self.output.overwrite)
        return LabelConfig(corpus=self.corpus, teachers=[self.teacher()], compute=self.compute, output=output,
                           ray=self.ray)


class ServeConfig(ScoredModelConfig):
    """`kd-ray serve`: the model as a Ray Serve application answering HTTP posts of JSON with each text's label and
    probabilities per task (the columns `kd-ray predict` writes)."""

    normalize: bool = Field(False, description="Normalise each post as the corpus reader does with corpus.normalize "
        "(set it when the model was trained on normalised posts).")
    replicas: int = Field(1, ge=1, le=1024, description="Replicas of the model (Ray Serve deployment replicas).")
    threads_per_replica: int = Field(1, ge=1, le=64, description="Threads each replica's model runs with.")
    num_cpus_per_replica: float = Field(1.0, gt=0, le=64, description="CPUs Ray reserves per replica (scheduling).")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most texts a replica runs in one forward pass: "
        "texts of concurrent requests are batched together (Ray Serve's serve.batch).")
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10, description="Longest a text waits for others to fill "
        "its batch (0: a batch takes what has queued and runs; texts arriving meanwhile form the next one).")
    max_text_chars: int = Field(100_000, ge=1, description="Longest text accepted, in characters (longer: HTTP 400).")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP proxy.")
    route_prefix: str = Field("/", pattern=r"^/", description="Path the application answers under.")
    name: str = Field("kd-ray", description="Name of the Ray Serve application.")
    output: str = Field("runs/serve", description="Folder for the log and serve.json (the model, its tasks, "
        "the URL).")
    ray: RayConfig = Field(default_factory=RayConfig)


class _TeacherLabelsSection(Section):
    """A run or a task of it: its ``labels`` are its teacher's, unless the teacher sets its own."""

    @model_validator(mode="before")
    @classmethod
    def _teacher_takes_the_labels(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("teacher"), dict) and data.get("labels") is not None:
            return {**data, "teacher": {"labels": data["labels"], **data["teacher"]}}
        return data


class RunTeacherConfig(TeacherConfig):
    """A run's teacher: a teacher as `kd-ray label` runs it (teachers.N), ready or fine-tuned here first. Its
    labels are the run's (labels, or tasks.<task>.labels)."""

    model: str | None = Field(None, description="A ready teacher (a classifier's folder or hub id, or the causal LM "
                              "of kind llm); null: fine-tune `base_model` on data.train first.")
    base_model: str | None = Field(None, description="Pretrained encoder to fine-tune into the teacher.")
    train: TrainArgs = Field(default_factory=TrainArgs, description="Fine-tuning settings.")

    @model_validator(mode="after")
    def _one_source(self) -> RunTeacherConfig:
        if (self.model is None) == (self.base_model is None):
            raise ValueError("set exactly one of teacher.model (a ready teacher) and teacher.base_model (fine-tune one)")
        if self.base_model is not None and not self.encoder:
            raise ValueError("teacher.base_model is fine-tuned into a classifier; an LLM teacher (kind: llm) is "
                             "prompted, not fine-tuned: set teacher.model to the causal LM")
        return self

    def labeling(self, model: str, **update) -> TeacherConfig:
        """The teacher as the labeling stage runs it, from ``model``."""
        return TeacherConfig(**self.model_dump(exclude={"base_model", "train"}) | {"model": model, **update})


class PipelineDataConfig(Section):
    train: CorpusConfig = Field(description="Labeled set: fine-tunes the teacher; labeled by it for distillation.")
    transfer: CorpusConfig | None = Field(None, description="Unlabeled transfer set: labeled by the teacher only.")
    validation: EvalSetConfig | None = Field(None, description="Scored after every training epoch.")
    test: EvalSetConfig = Field(description="Held out: touched only by the final evaluation.")

    @model_validator(mode="after")
    def _transfer_read_like_train(self) -> PipelineDataConfig:
        """The run labels train + transfer as one corpus (transfer as its unlabeled_path), so both are read alike."""
        if self.transfer is None:
            return self
        for name in ("format", "text_column", "id_column", "normalize"):
            mine, train = getattr(self.transfer, name), getattr(self.train, name)
            if mine != train:
                raise ValueError(f"data.transfer.{name} is {mine!r} but data.train.{name} is {train!r}: the two are "
                                 f"labeled as one corpus and read alike; set the same {name} on both")
        if self.transfer.label_column or self.transfer.task_label_columns:
            raise ValueError("data.transfer has gold label columns set: the transfer set is read without gold (its "
                             "labels come from the teacher); remove data.transfer.label_column / task_label_columns")
        return self


class PipelineTaskConfig(_TeacherLabelsSection):
    """One task of a multi-task run: its gold column and labels, its teacher, its share of the loss."""

    label_column: str = Field(description="Column of this task's gold labels in data.train, data.validation and "
                              "data.test; empty cells mean the row has no label for this task.")
    labels: list[str] = Field(min_length=2, description="This task's label set, in output order.")
    teacher: RunTeacherConfig
    loss: TaskLossConfig = Field(default_factory=TaskLossConfig, description="w_k, and T and alpha if not loss's.")


class PipelineConfig(_TeacherLabelsSection):
    """`kd-ray run`: fine-tune the teacher, label, distill, evaluate, from one YAML."""

    output: str = Field(description="Run folder: teacher/, soft_labels/, student/, metrics.json land here.")
    labels: list[str] | None = Field(None, min_length=2, description="The label set, in output order (one task; "
                                     "for several, see tasks).")
    tasks: dict[str, PipelineTaskConfig] | None = Field(None, description="Multi-task: task -> its gold column, "
        "labels and teacher. Every teacher labels the corpus in one pass, and one student with a head per task "
        "learns from all of them. Replaces labels and teacher.")
    data: PipelineDataConfig
    teacher: RunTeacherConfig | None = Field(None, description="The teacher (one task; for several, see tasks).")
    label: LabelComputeConfig = Field(default_factory=LabelComputeConfig, description="Labeling compute.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Perturbed copies of the posts "
                                   "for the teacher to label: more transfer text for a small corpus.")
    logits_dtype: Literal["float32", "float16"] = Field("float32", description="Stored logits type.")
    student: StudentConfig = Field(default_factory=StudentConfig)
    loss: DistillLossConfig = Field(default_factory=DistillLossConfig)
    distill: StudentTrainArgs = Field(default_factory=StudentTrainArgs, description="Student training settings.")
    tune: SearchConfig | None = Field(None, description="Search T, alpha and learning rate with Ray Tune instead of "
        "one distillation with `loss` and `distill`, which become the search's first trial; the best trial's student "
        "is the run's student.")
    export: bool = Field(False, description="Also export the student to ONNX (fp32 and int8) into "
        "student_onnx/, checked on data.test (`kd-ray export`); the evaluation scores the int8 file as student_int8.")
    baseline_without_distillation: bool = Field(True, description="Also train the same student with alpha=0 on the "
        "labeled rows only, and report it (skipped when data.train has no gold labels: label_column null).")
    eval: EvalArgs = Field(default_factory=EvalArgs)
    ray: RayConfig = Field(default_factory=RayConfig)

    def teacher_fields(self) -> dict[str, RunTeacherConfig]:
        """Each teacher of the run under its config field name, in task order."""
        if self.tasks is None:
            return {"teacher": self.teacher}
        return {f"tasks.{n}.teacher": t.teacher for n, t in self.tasks.items()}

    @model_validator(mode="after")
    def _teacher_source(self) -> PipelineConfig:
        if self.tasks is not None:
            if self.labels is not None or self.teacher is not None:
                raise ValueError("with tasks, set each task's labels and teacher (tasks.<task>.labels, "
                                 "tasks.<task>.teacher), not the top-level labels and teacher")
            if len(self.tasks) < 2:
                raise ValueError("tasks needs at least two tasks; for one, use labels and teacher")
        elif self.labels is None or self.teacher is None:
            raise ValueError("set labels (the label set) and teacher, or tasks (several tasks)")
        (field, first), *_ = self.teacher_fields().items()  # a student built from its teacher: the first task's
        self.student.check_source(field, encoder=first.encoder)
        if self.tune is not None and self.data.validation is None:
            raise ValueError("tune needs data.validation (flag --data.validation.path): it scores every trial")
        if self.tune is not None and self.distill.num_workers == 0:
            raise ValueError(LOCAL_MODE_TRIALS.format(field="distill.num_workers"))
        missing = [f"{n}.representation" for n, t in self.teacher_fields().items() if t.representation is None]
        if self.loss.beta > 0 and missing:
            raise ValueError(f"loss.beta={self.loss.beta} matches the student to the teachers' stored representations; "
                             f"set {', '.join(missing)}: mean (or cls) so that labeling stores them, or beta: 0")
        return self

    @model_validator(mode="after")
    def _best_needs_validation(self) -> PipelineConfig:
        fine_tuned = {f"{n}.train": t.train for n, t in self.teacher_fields().items() if t.base_model}
        for field, train in {"distill": self.distill, **fine_tuned}.items():
            check_keep(train, field, self.data.validation is not None, "data.validation")
        return self
