"""Perturbed copies of the posts a teacher labels: more transfer text where the corpus is small.

A student distilled on a few thousand posts sees the teacher's function at only those points;
the teacher's soft labels on perturbed copies of the same posts show it more of it (Tang et al.
2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks"; TinyBERT's
data augmentation). Each copy takes its post's words and, independently per word, turns one
into the teacher's mask token (``mask_prob``) or into a word drawn from the posts of its block
(``replace_prob``); then, with ``span_prob``, keeps only a random contiguous span of at least
half its words. Copies carry no gold labels: only the teacher's logits train on them.

A copy depends only on the seed, its post's id and text and the block the post was read in, so
a resumed labeling run (kd_ray.stages.label) makes the same copies under the same ids.
"""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.compute as pc

from kd_ray.config import AugmentConfig
from kd_ray.errors import CorpusError

SEPARATOR = "#aug"  # copy k of post <id> has the id '<id>#aug<k>'
COPY_ID_PATTERN = SEPARATOR + r"[0-9]+$"


def perturb(words: list[str], rng: random.Random, pool: list[str], cfg: AugmentConfig,
            mask_token: str | None) -> str:
    """One perturbed copy of a post's words."""
    out = []
    for word in words:
        draw = rng.random()
        if draw < cfg.mask_prob:
            if mask_token is not None:
                out.append(mask_token)
        elif draw < cfg.mask_prob + cfg.replace_prob:
            out.append(rng.choice(pool))
        else:
            out.append(word)
    if len(out) > 1 and rng.random() < cfg.span_prob:
        length = rng.randint((len(out) + 1) // 2, len(out))
        start = rng.randint(0, len(out) - length)
        out = out[start:start + length]
    return " ".join(out) if out else words[0]  # every word masked away: keep the first


def augment_table(table: pa.Table, cfg: AugmentConfig, mask_token: str | None, source: str = "corpus") -> pa.Table:
    """``table`` (kd_ray.data.corpus rows) followed by ``cfg.copies`` perturbed copies of each accepted row.

    The copies keep only id and text; gold labels and reject reasons are null. A post whose own
    id looks like a copy's (``source`` names its file in the error) is refused before any labeling.
    """
    if not cfg.copies or table.num_rows == 0:
        return table
    clash = table.filter(pc.match_substring_regex(table.column("id"), COPY_ID_PATTERN))
    if clash.num_rows:
        raise CorpusError(f"{source}: ids such as {clash.column('id')[0].as_py()!r} end like an augmented copy's id "
                          f"('<id>{SEPARATOR}<k>'); with augment.copies > 0 corpus ids must not end in "
                          f"{SEPARATOR!r} and a number: rename them or set augment.copies: 0")
    accepted = table.filter(pc.is_null(table.column("reject_reason")))
    ids = accepted.column("id").to_pylist()
    words = [text.split() for text in accepted.column("text").to_pylist()]
    pool = [word for post in words for word in post]
    copy_ids, copy_texts = [], []
    for k in range(cfg.copies):
        for post_id, post in zip(ids, words):
            if not post:
                continue
            # A string seed goes through SHA-512: the same copy in every process and run.
            rng = random.Random(f"{cfg.seed}:{k}:{post_id}")
            copy_ids.append(f"{post_id}{SEPARATOR}{k}")
            copy_texts.append(perturb(post, rng, pool, cfg, mask_token))
    columns = {"id": pa.array(copy_ids, pa.string()), "text": pa.array(copy_texts, pa.string())}
    copies = pa.table([columns.get(f.name, pa.nulls(len(copy_ids), f.type)) for f in table.schema],
                      schema=table.schema)
    return pa.concat_tables([table, copies])


def resolve_mask_token(cfg: AugmentConfig, teacher: str, revision: str | None = None) -> str | None:
    """The (first) teacher's mask token, where copies need one: '[MASK]' for BERT-like tokenizers,
    '<mask>' for RoBERTa-like ones, None (masked words are dropped) where it has none."""
    if not cfg.copies or not cfg.mask_prob:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher, revision=revision).mask_token
