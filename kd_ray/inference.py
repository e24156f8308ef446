"""The one inference loop: a classifier over length-sorted batches (Ray-free).

Labeling (``TeacherLabeler``), validation after each epoch, evaluation and
``MultiTaskClassifier`` all run their models through ``sorted_logits``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Iterator

import numpy as np


def padded_batches(enc, tokenizer, groups: list[np.ndarray], *, pin_memory: bool = False) -> Iterator[dict]:
    """Tensors for each group of rows of one tokenizer call, padded to the group's longest row
    on the tokenizer's side, one group at a time (on a GPU the next is padded while the last
    runs). Padding with numpy is far cheaper than ``tokenizer.pad`` on dicts."""
    import torch

    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    pad_values = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
    pad_left = tokenizer.padding_side == "left"
    for idx in groups:
        width = max(len(enc["input_ids"][i]) for i in idx)
        batch = {}
        for key in keys:
            array = np.full((len(idx), width), pad_values[key], dtype=np.int64)
            for row, i in enumerate(idx):
                values = enc[key][i]
                if pad_left:
                    array[row, width - len(values):] = values
                else:
                    array[row, :len(values)] = values
            tensor = torch.from_numpy(array)
            batch[key] = tensor.pin_memory() if pin_memory else tensor
        yield batch


def sorted_logits(model, batches: Iterable[tuple[np.ndarray, dict]], rows: int, *, device: str = "cpu",
                  amp_dtype=None) -> np.ndarray:
    """(rows, num_labels) float32 logits of ``model`` over ``(row indices, input tensors)`` batches.

    Inputs are copied to ``device`` without blocking and the host waits once, at the end: on a
    GPU the next batch is prepared while the last one runs."""
    import torch

    amp = torch.autocast(device, dtype=amp_dtype) if amp_dtype else nullcontext()
    indices, results = [], []
    with torch.inference_mode(), amp:
        for idx, batch in batches:
            results.append(model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).logits.float())
            indices.append(idx)
    out = np.empty((rows, model.config.num_labels), dtype=np.float32)
    if results:
        out[np.concatenate(indices)] = torch.cat(results).cpu().numpy()
    return out


def predict_logits(model, tokenizer, texts: list[str], *, max_length: int, batch_size: int,
                   device: str = "cpu") -> np.ndarray:
    """(len(texts), num_labels) float32 logits, rows in the order of ``texts``; batches of alike
    lengths, each tokenized as it is needed."""
    order = np.argsort([len(t) for t in texts])
    groups = [order[start:start + batch_size] for start in range(0, len(texts), batch_size)]
    batches = ((idx, tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt")) for idx in groups)
    model.eval()
    return sorted_logits(model, batches, len(texts), device=str(device))
