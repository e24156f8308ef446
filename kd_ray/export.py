"""`kd-ray export`: a trained model to ONNX (and dynamic int8) for serving, checked against PyTorch.

A student serves the stream of posts for months, usually through ONNX Runtime on CPU. The export
writes ``model.onnx`` (fp32) and, with ``quantize``, ``model.int8.onnx`` (onnxruntime's dynamic
int8 quantization of the linear layers' weights), beside the tokenizer, ``config.json`` (the label
names) and, for a multi-task model, ``kd_ray_tasks.json``. It then scores held-out texts with
PyTorch and with each ONNX file and writes the agreement of their predictions and the largest logit
difference to ``export.json``. ``OnnxModel`` runs an exported file wherever kd-ray runs a model
(``kd-ray evaluate`` takes an ``.onnx`` path as a model). Needs the ``export`` extra (onnx,
onnxruntime).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kd_ray.config import CorpusConfig, ExportConfig
from kd_ray.console import say
from kd_ray.errors import ModelError

FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
REPORT = "export.json"


class OnnxModel:
    """An exported ``.onnx`` file behind the calls kd-ray makes of a PyTorch classifier: ``model(**batch).logits``
    (a torch tensor), ``config.num_labels``, ``parameters()``, ``eval()`` and ``to()``."""

    def __init__(self, file: str | Path):
        import onnxruntime as ort
        import torch
        from transformers import AutoConfig

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many as a PyTorch model here: a fair timing
        self.file = Path(file)
        self.session = ort.InferenceSession(str(self.file), options, providers=["CPUExecutionProvider"])
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


def _logits_module(model, names: list[str]):
    """The classifier as a function of its tokenizer's inputs, positional, returning the logits: what the
    exporter traces."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs))).logits

    return Logits()


def held_out_texts(data: CorpusConfig, rows: int) -> list[str]:
    """The first ``rows`` usable texts of ``data``, read as kd-ray reads a corpus (normalised if asked)."""
    from kd_ray.corpus import list_shards, read_shard

    texts: list[str] = []
    for shard in list_shards(data):
        for table in read_shard(shard, data, None):
            texts += [t for t, bad in zip(table.column("text").to_pylist(), table.column("reject_reason").to_pylist())
                      if bad is None]
            if len(texts) >= rows:
                return texts[:rows]
    return texts


def export_onnx(model_dir: str, output: Path, *, opset: int, quantize: bool) -> dict[str, Path]:
    """Write the ONNX file(s), the tokenizer and the label names to ``output``; return variant -> file."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_ray.multitask import TASKS_FILE

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = tokenizer(["a post to trace the graph with", "and a shorter one"], padding=True, return_tensors="pt")
    names = [n for n in tokenizer.model_input_names if n in sample]
    output.mkdir(parents=True, exist_ok=True)
    files = {"fp32": output / FILES["fp32"]}
    with torch.inference_mode():
        torch.onnx.export(_logits_module(model, names), tuple(sample[n] for n in names), str(files["fp32"]),
                          input_names=names, output_names=["logits"], opset_version=opset, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}})
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        files["int8"] = output / FILES["int8"]
        # uint8 weights, a scale per output channel: signed int8 weights saturate on CPUs without AVX-512 VNNI
        # (onnxruntime's quantization notes); on the demo student 96.1 % argmax parity -> 99.1 % (BENCHMARKS.md)
        quantize_dynamic(str(files["fp32"]), str(files["int8"]), weight_type=QuantType.QUInt8, per_channel=True)
    tokenizer.save_pretrained(output)
    model.config.save_pretrained(output)
    if (Path(model_dir) / TASKS_FILE).is_file():
        shutil.copy(Path(model_dir) / TASKS_FILE, output / TASKS_FILE)
    return files


def parity(model_dir: str, files: dict[str, Path], texts: list[str], max_length: int) -> dict:
    """Per ONNX variant: the share of ``texts`` on which it predicts PyTorch's class (per task for a
    multi-task model: the argmax of each task's slice) and the largest logit difference."""
    from kd_ray.multitask import MultiTaskClassifier

    reference = MultiTaskClassifier.from_pretrained(model_dir, task="task", max_length=max_length)
    expected = reference.logits(texts)
    report = {"rows": len(texts)}
    for variant, file in files.items():
        onnx = MultiTaskClassifier(OnnxModel(file), reference.tokenizer, reference.layout, max_length=max_length)
        got = onnx.logits(texts)
        agree = np.mean([(t.of(got).argmax(1) == t.of(expected).argmax(1)).mean() for t in reference.layout])
        report[variant] = {"argmax_agreement": float(agree), "max_abs_logit_diff": float(np.abs(got - expected).max()),
                           "size_mb": file.stat().st_size / 1e6}
    return report


def run_export(cfg: ExportConfig) -> dict:
    """Export, check parity on the held-out texts, write ``export.json``; refuse a parity below the bar."""
    output = Path(cfg.output)
    files = export_onnx(cfg.model, output, opset=cfg.opset, quantize=cfg.quantize)
    texts = held_out_texts(cfg.parity, cfg.parity_rows)
    if not texts:
        raise ModelError(f"parity.path {cfg.parity.path} has no usable texts to check the export on")
    report = {"model": cfg.model, "files": {v: f.name for v, f in files.items()},
              "parity": parity(cfg.model, files, texts, cfg.max_length)}
    (output / REPORT).write_text(json.dumps(report, indent=2))
    low = {v: r["argmax_agreement"] for v, r in report["parity"].items() if v != "rows"
           and r["argmax_agreement"] < cfg.min_agreement}
    if low:
        raise ModelError(f"the ONNX export in {output} predicts PyTorch's class on only {low} of {len(texts)} "
                         f"held-out texts (export.min_agreement={cfg.min_agreement}); see {output / REPORT}")
    return report


def main(cfg: ExportConfig) -> dict:
    report = run_export(cfg)
    for variant, r in ((v, r) for v, r in report["parity"].items() if v != "rows"):
        say(f"kd-ray export: {Path(cfg.output) / FILES[variant]}: {r['size_mb']:.1f} MB, predicts PyTorch's class on "
            f"{r['argmax_agreement']:.2%} of {report['parity']['rows']} held-out texts, largest logit difference "
            f"{r['max_abs_logit_diff']:.3g}")
    return report


ENTRY_POINTS = {"export": main}
