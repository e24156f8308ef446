"""Exported ``.onnx`` files run where kd-ray runs a PyTorch classifier (needs the ``export`` extra)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kd_ray.errors import ModelError


def session(file: str | Path):
    """An ONNX Runtime CPU session with as many threads as PyTorch uses here: a fair timing."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """An exported ``.onnx`` file behind the calls kd-ray makes of a PyTorch classifier: ``model(**batch).logits``
    (a torch tensor), ``config.num_labels``, ``parameters()``, ``eval()`` and ``to()``."""

    def __init__(self, file: str | Path):
        from transformers import AutoConfig

        self.file = Path(file)
        self.session = session(self.file)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.config = AutoConfig.from_pretrained(self.file.parent)

    def __call__(self, **batch):
        import torch

        feed = {k: v.numpy() for k, v in batch.items() if k in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))

    def parameters(self):
        """The weights stored in the file (int8 ones counted like the fp32 they replace)."""
        import onnx
        import torch
        from onnx import numpy_helper

        for init in onnx.load(str(self.file)).graph.initializer:
            if init.data_type != onnx.TensorProto.INT64 and not init.name.endswith(("_scale", "_zero_point")):
                yield torch.from_numpy(np.array(numpy_helper.to_array(init)))

    def eval(self):
        return self

    def to(self, device):
        if str(device) != "cpu":
            raise ModelError(f"{self.file} runs on CPU (ONNX Runtime's CPU provider), not {device}")
        return self
