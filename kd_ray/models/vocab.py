"""A classifier's vocabulary trimmed to the tokens a corpus uses (Ray-free: torch, tokenizers, an HF folder).

Most of a small student's weights are the embedding rows of a 30,522-token vocabulary that a corpus of posts
mostly never uses. ``trim_vocabulary`` keeps the special tokens, every token the corpus's texts tokenize to and
the one-character pieces of their characters (so that an unseen word still splits into pieces), rebuilds the
tokenizer over the kept tokens (new ids in the old order), keeps the embedding rows of the kept tokens and writes
an ordinary Hugging Face folder.

A corpus text tokenizes to exactly its original pieces: WordPiece's greedy longest match and BPE's ranked merges
only ever chose kept tokens for it, so the trimmed model's logits on it are the original's. An unseen word falls
back as the original algorithm would over the smaller vocabulary: to shorter pieces, or to the unknown token.
WordPiece (BERT, MiniLM) and BPE (RoBERTa, GPT-2) tokenizers are supported; others are refused by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from kd_ray.errors import ModelError
from kd_ray.models.multitask import TASKS_FILE

SUPPORTED = ("WordPiece", "BPE")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")


def tokenizer_spec(folder: str | Path) -> dict:
    """The fast tokenizer's ``tokenizer.json`` of a model folder, refused unless its model is WordPiece or BPE."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise ModelError(f"{folder} has no {TOKENIZER_FILE} (a slow tokenizer): vocabulary trimming rebuilds a fast "
                         f"tokenizer; set export.trim_vocab false")
    spec = json.loads(path.read_text())
    kind = spec["model"]["type"]
    if kind not in SUPPORTED:
        raise ModelError(f"{folder} has a {kind} tokenizer: kd-ray trims WordPiece (BERT, MiniLM) and BPE (RoBERTa) "
                         f"vocabularies only; set export.trim_vocab false")
    return spec


def used_token_ids(spec: dict, batches: Iterable[list[str]]) -> tuple[set[int], int]:
    """The ids the texts of ``batches`` tokenize to (whole texts, no special tokens) and the number of texts."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    used, rows = set(), 0
    for texts in batches:
        for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
            used.update(encoding.ids)
        rows += len(texts)
    return used, rows


def _affixes(model: dict) -> tuple[str, str]:
    return model.get("continuing_subword_prefix") or "", model.get("end_of_word_suffix") or ""


def _bare(token: str, prefix: str, suffix: str) -> str:
    """A piece without its continuing-subword prefix and end-of-word suffix: its characters."""
    return token.removeprefix(prefix).removesuffix(suffix)


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """BPE merges as pairs (tokenizers writes them as ``[a, b]``, older files as ``"a b"``)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def _merged(a: str, b: str, prefix: str) -> str:
    return a + b.removeprefix(prefix)


def _merge_closure(keep: set[str], merges: list[tuple[str, str]], prefix: str) -> set[str]:
    """``keep`` plus both parts of every merge that builds a kept token, down to the characters: BPE reaches a
    kept token only through them."""
    makers: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        makers.setdefault(_merged(a, b, prefix), []).append((a, b))
    todo, keep = list(keep), set(keep)
    while todo:
        for part in (p for pair in makers.get(todo.pop(), ()) for p in pair):
            if part not in keep:
                keep.add(part)
                todo.append(part)
    return keep


def kept_tokens(spec: dict, used: set[int]) -> set[str]:
    """The tokens a trimmed vocabulary keeps: the added (special) tokens, the ``used`` ones, the one-character
    pieces (WordPiece: of the kept tokens' characters; BPE: its whole alphabet, so no byte is ever lost) and,
    for BPE, every token a kept one is merged from."""
    model, vocab = spec["model"], spec["model"]["vocab"]
    prefix, suffix = _affixes(model)
    id_to_token = {i: t for t, i in vocab.items()}
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    keep = {id_to_token[i] for i in used if i in id_to_token} | {t for t in specials if t in vocab}
    if model["type"] == "WordPiece":
        chars = {c for t in keep - specials for c in _bare(t, prefix, suffix)}
        pieces = chars | {prefix + c for c in chars}
        return keep | (pieces & vocab.keys())
    alphabet = {t for t in vocab if len(_bare(t, prefix, suffix)) == 1}
    if model.get("byte_fallback"):
        alphabet |= {t for t in vocab if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
    return _merge_closure(keep | alphabet, _merge_pairs(model), prefix)


def _remap_processor(processor: dict | None, new_id: dict[str, int]) -> dict | None:
    """A post-processor with its special tokens' ids in the trimmed vocabulary."""
    if not processor:
        return processor
    processor = dict(processor)
    kind = processor["type"]
    if kind == "Sequence":
        processor["processors"] = [_remap_processor(p, new_id) for p in processor["processors"]]
    elif kind == "TemplateProcessing":
        processor["special_tokens"] = {name: {**s, "ids": [new_id[t] for t in s["tokens"]]}
                                       for name, s in processor["special_tokens"].items()}
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for field in ("sep", "cls"):
            processor[field] = [processor[field][0], new_id[processor[field][0]]]
    return processor


def trimmed_spec(spec: dict, keep: set[str]) -> tuple[dict, np.ndarray]:
    """``spec`` over the kept tokens, renumbered in their old order, and the old id of each new one: (kept,)."""
    model = dict(spec["model"])
    old_ids = np.array(sorted(model["vocab"][t] for t in keep), dtype=np.int64)
    id_to_token = {i: t for t, i in model["vocab"].items()}
    model["vocab"] = {id_to_token[int(i)]: new for new, i in enumerate(old_ids)}
    new_id = model["vocab"]
    outside = [t["content"] for t in spec.get("added_tokens", []) if t["content"] not in new_id]
    if outside:
        raise ModelError(f"the tokenizer's added tokens {outside} are not in its {model['type']} vocabulary: kd-ray "
                         f"trims vocabularies whose special tokens are part of them; set export.trim_vocab false")
    if model["type"] == "BPE":
        prefix = _affixes(model)[0]
        model["merges"] = [[a, b] for a, b in _merge_pairs(model)
                           if a in new_id and b in new_id and _merged(a, b, prefix) in new_id]
    trimmed = {**spec, "model": model,
               "added_tokens": [{**t, "id": new_id[t["content"]]} for t in spec.get("added_tokens", [])],
               "post_processor": _remap_processor(spec.get("post_processor"), new_id)}
    if spec.get("padding"):
        trimmed["padding"] = {**spec["padding"], "pad_id": new_id[spec["padding"]["pad_token"]]}
    return trimmed, old_ids


def _save_tokenizer(source: Path, output: Path, trimmed: dict, old_to_new: dict[int, int]) -> None:
    """The trimmed ``tokenizer.json`` and the source's tokenizer settings (ids renumbered); vocab.txt,
    vocab.json and merges.txt are left behind: the rebuilt tokenizer.json is the whole tokenizer."""
    from tokenizers import Tokenizer

    Tokenizer.from_str(json.dumps(trimmed))  # fails here, not at load time, if the rebuilt tokenizer is invalid
    (output / TOKENIZER_FILE).write_text(json.dumps(trimmed, ensure_ascii=False, indent=2))
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, output / name)
    config = output / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        if "added_tokens_decoder" in settings:
            settings["added_tokens_decoder"] = {str(old_to_new[int(i)]): t
                                                for i, t in settings["added_tokens_decoder"].items()}
            config.write_text(json.dumps(settings, ensure_ascii=False, indent=2))


def trimmed_model(model, old_ids: np.ndarray):
    """A copy of ``model`` whose input embedding holds only the rows ``old_ids`` (position and token-type
    embeddings unchanged), its config's vocab_size and special-token ids renumbered."""
    import torch
    from transformers import AutoModelForSequenceClassification

    rows = model.get_input_embeddings().weight
    if int(old_ids.max()) >= rows.shape[0]:
        raise ModelError(f"the tokenizer has token id {int(old_ids.max())} but the model only {rows.shape[0]} "
                         f"embedding rows")
    old_to_new = {int(o): n for n, o in enumerate(old_ids)}
    config = model.config.to_dict()
    config.update({k: old_to_new.get(config[k]) for k in CONFIG_IDS if config.get(k) is not None},
                  vocab_size=len(old_ids))
    new = AutoModelForSequenceClassification.from_config(type(model.config).from_dict(config)).eval()
    name = next(n for n, p in model.named_parameters() if p is rows)
    state = model.state_dict()
    state[name] = rows.detach()[torch.from_numpy(old_ids)].clone()
    new.load_state_dict(state)
    return new


def trim_vocabulary(model_dir: str | Path, corpus: Iterable[list[str]], output: str | Path) -> dict:
    """Write to ``output`` the classifier of ``model_dir`` with the vocabulary its ``corpus`` (batches of texts)
    uses, fp32, loadable by ``AutoModelForSequenceClassification`` and ``transformers.pipeline``; return the
    counts (tokens before and after, corpus texts, parameters before and after)."""
    from transformers import AutoModelForSequenceClassification

    source, output = Path(model_dir), Path(output)
    spec = tokenizer_spec(source)
    used, rows = used_token_ids(spec, corpus)
    if rows == 0:
        raise ModelError("the trimming corpus has no texts: set export.trim_corpus.path to the texts the model reads")
    trimmed, old_ids = trimmed_spec(spec, kept_tokens(spec, used))
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    small = trimmed_model(model, old_ids)
    output.mkdir(parents=True, exist_ok=True)
    small.save_pretrained(output)
    _save_tokenizer(source, output, trimmed, {int(o): n for n, o in enumerate(old_ids)})
    if (source / TASKS_FILE).is_file():
        shutil.copy(source / TASKS_FILE, output / TASKS_FILE)
    return {"tokenizer": spec["model"]["type"], "corpus_texts": rows, "tokens_before": len(spec["model"]["vocab"]),
            "tokens_after": len(old_ids), "parameters_before": sum(p.numel() for p in model.parameters()),
            "parameters_after": sum(p.numel() for p in small.parameters())}
