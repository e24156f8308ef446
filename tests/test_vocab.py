"""Vocabulary trimming (kd_ray.models.vocab): corpus texts keep their pieces and logits; unseen words fall back as
the original tokenizer's algorithm would; WordPiece and byte-level BPE; any other tokenizer is refused."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import WORDS, build_tiny_classifier, byte_level_bpe, random_posts

KNOWN = WORDS[:20]  # the trimming corpus uses these words only; held-out posts use them all
CORPUS = [" ".join(random.Random(i).choices(KNOWN, k=8)) for i in range(60)]
HELD_OUT = random_posts(40, seed=4, max_words=20) + ["snowman ☃ lateflight crewgate", "planeseat okthanks"]
SPECIALS = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


def build_tiny_roberta(folder):
    """A 2-layer RoBERTa classifier with a byte-level BPE trained on a few lines."""
    import torch
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    tok = byte_level_bpe(random_posts(200, seed=1) + [" ".join(WORDS)], ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, initializer_range=0.2, num_labels=3,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2)
    folder.mkdir(parents=True, exist_ok=True)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    from kd_ray.models.vocab import trim_vocabulary

    root = tmp_path_factory.mktemp("wordpiece")
    model = build_tiny_classifier(root / "model")
    counts = trim_vocabulary(model, [CORPUS[:30], CORPUS[30:]], root / "trimmed")
    return model, root / "trimmed", counts


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from kd_ray.models.vocab import trim_vocabulary

    root = tmp_path_factory.mktemp("bpe")
    model = build_tiny_roberta(root / "model")
    counts = trim_vocabulary(model, [CORPUS], root / "trimmed")
    return model, root / "trimmed", counts


def _tokenizers(pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pair[0]), AutoTokenizer.from_pretrained(pair[1])


def _logits(folder, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_ray.models.inference import predict_logits

    return predict_logits(AutoModelForSequenceClassification.from_pretrained(folder),
                          AutoTokenizer.from_pretrained(folder), texts, max_length=64, batch_size=16)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_corpus_texts_tokenize_to_the_same_pieces_and_give_the_same_logits(kind, request):
    model, trimmed, counts = pair = request.getfixturevalue(kind)
    original, small = _tokenizers(pair)
    assert counts["tokens_after"] < counts["tokens_before"] and counts["corpus_texts"] == len(CORPUS)
    assert counts["parameters_after"] < counts["parameters_before"]
    for text in CORPUS:
        pieces = original.tokenize(text)
        assert small.tokenize(text) == pieces
        assert small(text)["input_ids"] == small.convert_tokens_to_ids(
            original.convert_ids_to_tokens(original(text)["input_ids"]))
    np.testing.assert_allclose(_logits(trimmed, CORPUS), _logits(model, CORPUS), atol=1e-5)


def test_the_special_tokens_are_kept_in_their_order_and_the_embeddings_sliced(wordpiece):
    from transformers import AutoModelForSequenceClassification

    model, trimmed, counts = wordpiece
    original, small = _tokenizers(wordpiece)
    vocab = small.get_vocab()
    assert SPECIALS <= vocab.keys() and len(vocab) == counts["tokens_after"]
    assert sorted(vocab, key=vocab.get) == sorted(vocab, key=original.get_vocab().get)  # the old order
    assert small.pad_token_id == 0 and small.unk_token == "[UNK]"
    big, cut = (AutoModelForSequenceClassification.from_pretrained(f) for f in (model, trimmed))
    assert cut.config.vocab_size == cut.get_input_embeddings().weight.shape[0] == len(vocab)
    for token, new in vocab.items():
        np.testing.assert_array_equal(cut.get_input_embeddings().weight[new].detach().numpy(),
                                      big.get_input_embeddings().weight[original.convert_tokens_to_ids(token)]
                                      .detach().numpy())
    emb = "bert.embeddings"
    for name in ("position_embeddings", "token_type_embeddings"):
        np.testing.assert_array_equal(cut.get_submodule(f"{emb}.{name}").weight.detach().numpy(),
                                      big.get_submodule(f"{emb}.{name}").weight.detach().numpy())


def _words(tokenizer, text: str) -> list[str]:
    """``text`` as the tokenizer's pre-tokenizer splits it (after normalisation)."""
    backend = tokenizer.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


def test_an_unseen_word_falls_back_as_wordpiece_would_over_the_kept_pieces(wordpiece):
    original, small = _tokenizers(wordpiece)
    kept = small.get_vocab()
    seen_same = fell_back = 0
    for word in {w for text in HELD_OUT for w in _words(original, text)}:
        before, after = original.tokenize(word), small.tokenize(word)
        if set(before) <= kept.keys():
            assert after == before, word  # its original pieces are all kept: the same pieces
            seen_same += 1
        elif after != ["[UNK]"]:
            assert "".join(p.removeprefix("##") for p in after) == word, (word, after)  # shorter pieces, same word
            fell_back += 1
        else:  # the unknown token only for a word with a character the corpus never showed
            assert not set(word) <= kept.keys(), word
    assert original.tokenize("☃") == small.tokenize("☃") == ["[UNK]"]  # a character no vocabulary holds
    assert seen_same > 10 and fell_back >= 1


def test_a_bpe_vocabulary_keeps_every_byte_so_an_unseen_word_still_spells_itself(bpe):
    original, small = _tokenizers(bpe)
    for text in HELD_OUT:
        pieces = small.tokenize(text)
        assert small.convert_tokens_to_string(pieces) == original.convert_tokens_to_string(original.tokenize(text))
        assert "<unk>" not in pieces
    assert small.pad_token_id == 1 and small.bos_token_id == 0  # RoBERTa's positions count from the padding id


def test_the_trimmed_folder_loads_in_a_transformers_pipeline(wordpiece):
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(wordpiece[1]))
    assert {r["label"] for r in classify(["the flight was late", "great crew"])} <= {"negative", "neutral", "positive"}


@pytest.mark.parametrize("kind", ["WordLevel", "Unigram"])
def test_other_tokenizer_models_are_refused_by_name(tmp_path, kind):
    from kd_ray.errors import ModelError
    from kd_ray.models.vocab import trim_vocabulary

    vocab = {"WordLevel": {"[UNK]": 0, "hello": 1}, "Unigram": [["<unk>", 0.0], ["hello", -1.0]]}[kind]
    model = {"type": kind, "vocab": vocab, **({"unk_token": "[UNK]"} if kind == "WordLevel" else {"unk_id": 0})}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": model}))
    with pytest.raises(ModelError, match=f"a {kind} tokenizer: kd-ray trims WordPiece .* and BPE"):
        trim_vocabulary(tmp_path, [["hello"]], tmp_path / "out")


def test_a_folder_without_a_fast_tokenizer_is_refused(tmp_path):
    from kd_ray.errors import ModelError
    from kd_ray.models.vocab import trim_vocabulary

    with pytest.raises(ModelError, match="no tokenizer.json"):
        trim_vocabulary(tmp_path, [["hello"]], tmp_path / "out")
