"""The one inference loop: a classifier over length-sorted batches (Ray-free).

Labeling (``TeacherLabeler``), validation after each epoch, evaluation and
``MultiTaskClassifier`` all run their models through ``sorted_outputs``.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from kd_ray.models.losses import pool


def hidden_width(config) -> int:
    """The width of a model's hidden states (DistilBERT calls it ``dim``)."""
    return getattr(config, "hidden_size", None) or config.dim


def is_classifier_config(config) -> bool:
    """Whether a model config says it is a sequence classifier (a bare encoder's does not)."""
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def encoder(tokenizer, max_length: int):
    """A fast tokenizer's Rust backend set to truncate at ``max_length`` on the tokenizer's side and not
    to pad; None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
    return backend


def encode(tokenizer, texts: list[str], max_length: int, backend=None) -> tuple[pa.ListArray, np.ndarray]:
    """Token ids of ``texts`` as list<int32> (special tokens added, at most ``max_length``) and a bool
    array of the texts that were cut. ``backend`` (from ``encoder``) skips transformers' Python
    lists of masks: the same ids, faster."""
    if backend is not None:
        encodings = backend.encode_batch_fast(texts)
        ids = [e.ids for e in encodings]
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), bool, len(encodings))
    else:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        truncated = np.array([len(i) >= max_length for i in ids], dtype=bool)
    return list_array(ids), truncated


def encode_prompts(tokenizer, texts: list[str], max_length: int, prompt: str,
                   chat: bool = False) -> tuple[pa.ListArray, np.ndarray]:
    """Token ids of ``prompt`` with each text in it (an LLM teacher's input) and which texts were cut: a
    text is cut to ``max_length`` tokens of its own before it goes into the prompt, which is never cut.
    With ``chat``, the filled-in prompt is the user's message in the tokenizer's chat template, ready for
    the assistant's reply."""
    alone = tokenizer(texts, add_special_tokens=False)["input_ids"]
    truncated = np.array([len(i) > max_length for i in alone], dtype=bool)
    posts = [tokenizer.decode(i[:max_length]) if cut else t for t, i, cut in zip(texts, alone, truncated)]
    filled = [prompt.format(text=p) for p in posts]
    if not chat:
        return list_array(tokenizer(filled)["input_ids"]), truncated
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": f}], tokenize=False,
                                           add_generation_prompt=True) for f in filled]
    return list_array(tokenizer(chats, add_special_tokens=False)["input_ids"]), truncated


def list_array(ids: list[list[int]]) -> pa.ListArray:
    """Python lists of token ids as an Arrow list<int32>."""
    lengths = np.fromiter(map(len, ids), np.int32, len(ids))
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(offsets[-1]))  # faster than pa.array(ids)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def padded_batches(ids: pa.ListArray, tokenizer, groups: list[np.ndarray], *,
                   pin_memory: bool = False) -> Iterator[dict]:
    """Model inputs for each group of rows of ``ids``, padded to the group's longest row on the
    tokenizer's side, one group at a time (on a GPU the next is padded while the last runs)."""
    import torch

    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    offsets = ids.offsets.to_numpy()[:len(ids) + 1].astype(np.int64)
    values = ids.values.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    pad_left = tokenizer.padding_side == "left"
    token_types = "token_type_ids" in tokenizer.model_input_names
    for idx in groups:
        width = int(lengths[idx].max())
        column = np.arange(width)[None, :]
        shift = (width - lengths[idx])[:, None] if pad_left else 0
        mask = (column >= shift) if pad_left else (column < lengths[idx][:, None])
        input_ids = np.full((len(idx), width), tokenizer.pad_token_id or 0, dtype=np.int64)
        input_ids[mask] = values[(offsets[idx][:, None] + column - shift)[mask]]
        batch = {"input_ids": input_ids, "attention_mask": mask.astype(np.int64)}
        if token_types:
            batch["token_type_ids"] = np.zeros_like(input_ids)
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        yield {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch


def length_groups(lengths: np.ndarray, batch_size: int, batch_tokens: int | None = None) -> list[np.ndarray]:
    """Row indices in batches of alike lengths, longest first (a batch too big for memory fails at
    once): at most ``batch_size`` rows and, if given, ``batch_tokens`` padded tokens each."""
    order = np.argsort(-lengths, kind="stable")
    if not batch_tokens:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    groups, start = [], 0
    while start < len(order):
        rows = max(1, min(batch_size, batch_tokens // max(1, int(lengths[order[start]]))))
        groups.append(order[start:start + rows])
        start += rows
    return groups


def sorted_outputs(model, batches: Iterable[tuple[np.ndarray, dict]], rows: int, *, device: str = "cpu",
                   amp_dtype=None, pooling: str | None = None,
                   label_tokens: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, num_labels) float32 logits of ``model`` over ``(row indices, input tensors)`` batches and,
    with ``pooling`` ('mean' or 'cls', kd_ray.models.losses.pool), its (rows, hidden) float32 sentence
    representations from the last hidden states (None without).

    A causal LM (``label_tokens``: the tokens of each label, left-padded batches): each label's next-token
    log-probability after each row's last token (its tokens' probabilities added), from the last
    position's logits alone; position ids count real tokens only, so a padded row gets the logits it
    gets alone.

    Inputs are copied to ``device`` without blocking and the host waits once, at the end: on a
    GPU the next batch is prepared while the last one runs."""
    import torch

    amp = torch.autocast(device, dtype=amp_dtype) if amp_dtype else nullcontext()
    indices, logits, pooled = [], [], []
    with torch.inference_mode(), amp:
        for idx, batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if label_tokens is not None:
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                out = model(**batch, position_ids=positions, logits_to_keep=1)
                logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
                logits.append(torch.stack([torch.logsumexp(logp[:, group], dim=-1) for group in label_tokens], 1))
            else:
                out = model(**batch, output_hidden_states=pooling is not None)
                logits.append(out.logits.float())
            if pooling:
                pooled.append(pool(out.hidden_states[-1], batch["attention_mask"], pooling))
            indices.append(idx)
    width = len(label_tokens) if label_tokens is not None else model.config.num_labels
    results = [np.empty((rows, width), dtype=np.float32)]
    if pooling:
        results.append(np.empty((rows, hidden_width(model.config)), dtype=np.float32))
    if indices:
        order = np.concatenate(indices)
        for out, parts in zip(results, (logits, pooled)):
            out[order] = torch.cat(parts).cpu().numpy()
    return results[0], results[1] if pooling else None


def predict_logits(model, tokenizer, texts: list[str], *, max_length: int, batch_size: int,
                   device: str = "cpu") -> np.ndarray:
    """(len(texts), num_labels) float32 logits, rows in the order of ``texts``; batches of alike
    lengths, each tokenized as it is needed."""
    order = np.argsort([len(t) for t in texts])
    groups = [order[start:start + batch_size] for start in range(0, len(texts), batch_size)]
    batches = ((idx, tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt")) for idx in groups)
    model.eval()
    return sorted_outputs(model, batches, len(texts), device=str(device))[0]
