"""`kd-ray export`: a trained model to ONNX (and dynamic int8) for serving, checked against PyTorch.

A student serves the stream of posts for months, usually through ONNX Runtime on CPU. The export writes
``model.onnx`` (fp32, its graph fused by ONNX Runtime's transformer optimizer: attention, LayerNorm, GELU) and,
with ``quantize``, ``model.int8.onnx``: onnxruntime's dynamic int8 quantization in the setting (uint8 or int8
weights, a scale per output channel or per tensor) that runs fastest on this CPU among those predicting PyTorch's
class on ``min_agreement`` of the held-out texts. With ``trim_vocab``, ``trimmed/`` holds the model cut to the
vocabulary a corpus uses (kd_ray.models.vocab) as an HF folder, with its own ONNX files. Beside the files: the tokenizer,
``config.json`` (the label names) and, for a multi-task model, ``kd_ray_tasks.json``. ``export.json`` records the
optimizer's fusions, every quantization candidate's agreement and rows/s, and per file its agreement with the
PyTorch model's predictions, the largest logit difference and its size. ``OnnxModel`` runs an exported file
wherever kd-ray runs a model (``kd-ray evaluate`` takes an ``.onnx`` path as a model). Needs the ``export`` extra
(onnx, onnxruntime).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from kd_ray.config import CorpusConfig, ExportConfig
from kd_ray.console import say
from kd_ray.data.corpus import list_shards, read_shard
from kd_ray.data.soft_labels import read_soft_label_info
from kd_ray.errors import ModelError, SoftLabelError
from kd_ray.models.inference import hidden_width
from kd_ray.models.multitask import TASKS_FILE, MultiTaskClassifier
from kd_ray.models.onnx import session
from kd_ray.models.vocab import trim_vocabulary

FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
TRIMMED = "trimmed"  # the trimmed-vocabulary model's folder, inside the output
REPORT = "export.json"
TIMING_PASSES = 3  # a quantization candidate's rows/s: the median of this many passes over the parity texts
# HF model types whose graphs ONNX Runtime's 'bert' fusions fit (the mapping Optimum's ORTOptimizer uses)
OPTIMIZER_TYPES = {t: "bert" for t in ("bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra",
                                       "albert", "mpnet")}


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


def corpus_texts(data: CorpusConfig) -> Iterator[list[str]]:
    """The usable texts of ``data``, a list per table read, as kd-ray reads a corpus (normalised if asked)."""
    for shard in list_shards(data):
        for table in read_shard(shard, data, None):
            yield [t for t, bad in zip(table.column("text").to_pylist(), table.column("reject_reason").to_pylist())
                   if bad is None]


def held_out_texts(data: CorpusConfig, rows: int) -> list[str]:
    """The first ``rows`` usable texts of ``data``."""
    return list(itertools.islice(itertools.chain.from_iterable(corpus_texts(data)), rows))


def export_graph(model_dir: str | Path, output: Path, *, opset: int):
    """Write ``model.onnx`` (fp32) of ``model_dir`` and, into another folder, its tokenizer, label names and task
    layout; return the model's HF config."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # eager attention: ONNX Runtime's attention fusion matches its graph, not the one SDPA exports to
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = tokenizer(["a post to trace the graph with", "and a shorter one"], padding=True, return_tensors="pt")
    names = [n for n in tokenizer.model_input_names if n in sample]
    output.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(_logits_module(model, names), tuple(sample[n] for n in names), str(output / FILES["fp32"]),
                          input_names=names, output_names=["logits"], opset_version=opset, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}})
    if output.resolve() != Path(model_dir).resolve():
        tokenizer.save_pretrained(output)
        model.config.save_pretrained(output)
        if (Path(model_dir) / TASKS_FILE).is_file():
            shutil.copy(Path(model_dir) / TASKS_FILE, output / TASKS_FILE)
    return model.config


def optimize_graph(file: Path, config) -> dict:
    """Fuse ``file``'s graph in place with ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU, the
    embeddings), for the model of HF ``config``; return the fusion used and its fused operators, or why none was."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    model_type = config.model_type
    fusion = OPTIMIZER_TYPES.get(model_type, model_type if model_type in MODEL_TYPES else None)
    if fusion is None:
        return {"model_type": model_type, "fusion": None, "note": f"ONNX Runtime's transformer optimizer knows no "
                f"model_type {model_type!r}: the graph is left as exported (ONNX Runtime's own session optimizations "
                f"still apply)"}
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", 0)  # 0: let it guess
    optimized = optimize_model(str(file), model_type=fusion, num_heads=heads, hidden_size=hidden_width(config))
    optimized.save_model_to_file(str(file))
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    return {"model_type": model_type, "fusion": fusion, "fused_operators": fused}


@dataclass(frozen=True)
class QuantSetting:
    """One setting of onnxruntime's dynamic quantization."""

    weight_type: str = "QUInt8"  # 'QUInt8' or 'QInt8'
    per_channel: bool = True  # a scale per output channel, else one per weight tensor
    reduce_range: bool = False  # 7-bit weights: no u8 x s8 saturation on CPUs without VNNI
    exclude: tuple[str, ...] = ()  # nodes left in fp32 (the ones quantization hurts most)

    @property
    def name(self) -> str:
        scale = "per-channel" if self.per_channel else "per-tensor"
        kept = f", {len(self.exclude)} node(s) kept fp32" if self.exclude else ""
        return f"{self.weight_type} {scale}" + (" reduce-range" if self.reduce_range else "") + kept


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU has VNNI (avx512_vnni or avx_vnni): u8 x s8 dot products without saturation. None where
    /proc/cpuinfo is not there to say."""
    try:
        return re.search(r"\b(avx512_vnni|avx_vnni)\b", cpuinfo.read_text()) is not None
    except OSError:
        return None


def quantization_candidates(vnni: bool | None) -> list[QuantSetting]:
    """uint8 and int8 weights, per channel and per tensor; without VNNI also int8 weights at 7 bits, onnxruntime's
    remedy for the u8 x s8 products that saturate there."""
    kinds = [("QUInt8", False), ("QInt8", False)] + ([] if vnni else [("QInt8", True)])
    return [QuantSetting(weights, per_channel, reduce_range) for weights, reduce_range in kinds
            for per_channel in (True, False)]


def quantize(fp32: Path, output: Path, setting: QuantSetting) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the fused operators (com.microsoft domain) have no ONNX shape inference: their outputs are float32
    quantize_dynamic(str(fp32), str(output), weight_type=getattr(QuantType, setting.weight_type),
                     per_channel=setting.per_channel, reduce_range=setting.reduce_range,
                     nodes_to_exclude=list(setting.exclude),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return output


def weight_nodes(fp32: Path) -> dict[str, int]:
    """The nodes dynamic quantization changes (those of its operator types that read a weight, an initializer) and
    the values of their weights."""
    import onnx
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    graph = onnx.load(str(fp32)).graph
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    return {n.name: sum(sizes.get(i, 0) for i in n.input) for n in graph.node
            if n.op_type in IntegerOpsRegistry and n.name and sizes.keys() & set(n.input)}


@dataclass
class ParityTexts:
    """The held-out texts and the PyTorch model's logits on them: what every exported file is compared with."""

    texts: list[str]
    expected: np.ndarray  # (rows, outputs) float32
    layout: list  # the model's TaskSlices: agreement is each task's argmax over its slice
    max_length: int

    @classmethod
    def of(cls, model_dir: str, texts: list[str], max_length: int) -> ParityTexts:
        reference = MultiTaskClassifier.from_pretrained(model_dir, task="task", max_length=max_length)
        return cls(texts, reference.logits(texts), reference.layout, max_length)

    def agreement(self, logits: np.ndarray) -> float:
        """The share of texts on which ``logits`` predict the PyTorch model's class (the mean over tasks)."""
        return float(np.mean([(t.of(logits).argmax(1) == t.of(self.expected).argmax(1)).mean() for t in self.layout]))

    def batches(self, folder: Path, batch_size: int = 64) -> list[tuple[np.ndarray, dict]]:
        """The texts as inputs of the tokenizer in ``folder``, in batches of alike lengths, tokenized once so that
        timings are the model's alone."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        order = np.argsort([len(t) for t in self.texts], kind="stable")
        return [(idx, dict(tokenizer([self.texts[i] for i in idx], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="np")))
                for idx in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]

    def onnx_logits(self, file: Path, *, tokenizer: Path | None = None, passes: int = 1) -> tuple[np.ndarray, float]:
        """(rows, outputs) logits of an ONNX file, its texts tokenized by the tokenizer in ``tokenizer`` (default: the
        file's folder), and its rows/s: the median of ``passes`` passes, after a warm-up batch."""
        run = session(file)
        names = {i.name for i in run.get_inputs()}
        feeds = [(idx, {k: v for k, v in batch.items() if k in names})
                 for idx, batch in self.batches(tokenizer or file.parent)]
        run.run(["logits"], feeds[0][1])
        seconds = []
        for _ in range(passes):
            start = time.perf_counter()
            outputs = [run.run(["logits"], feed)[0] for _, feed in feeds]
            seconds.append(time.perf_counter() - start)
        logits = np.empty_like(self.expected)
        logits[np.concatenate([idx for idx, _ in feeds])] = np.concatenate(outputs)
        return logits, len(self.texts) / statistics.median(seconds)

    def compare(self, path: Path) -> dict:
        """An ONNX file or an HF folder against the PyTorch model: argmax agreement, largest logit difference, size."""
        if path.suffix == ".onnx":
            logits, size = self.onnx_logits(path)[0], path.stat().st_size
        else:
            logits = MultiTaskClassifier.from_pretrained(path, task="task", max_length=self.max_length).logits(self.texts)
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return {"argmax_agreement": self.agreement(logits),
                "max_abs_logit_diff": float(np.abs(logits - self.expected).max()), "size_mb": size / 1e6}


def choose_quantization(fp32: Path, output: Path, parity: ParityTexts,
                        min_agreement: float) -> tuple[QuantSetting | None, dict]:
    """Quantize ``fp32`` in every candidate setting and keep, as ``output/model.int8.onnx``, the fastest whose
    agreement is at least ``min_agreement``; return it (None: no setting reached it) and every candidate's figures.

    When the fastest setting within a point of the best agreement misses the bar, it is tried with the nodes
    quantization hurts most left in fp32 (accuracy-driven fallback): each weight node is measured alone in fp32 (the
    rest quantized), then the nodes that gain the most agreement per weight kept in fp32 are kept so, one more at a
    time, until the bar is met (at most half of them); it is kept if it runs faster than every setting that met the
    bar as it was."""
    vnni = cpu_has_vnni()
    record, best = {"cpu_vnni": vnni, "candidates": [], "chosen": None}, None
    (output / FILES["int8"]).unlink(missing_ok=True)  # an earlier export's file must not pass for this one's
    counter = itertools.count()
    with tempfile.TemporaryDirectory(dir=output) as scratch:
        def measure(setting: QuantSetting, passes: int = TIMING_PASSES) -> tuple[float, float, Path]:
            file = quantize(fp32, Path(scratch) / f"candidate{next(counter)}.onnx", setting)
            logits, rows_per_s = parity.onnx_logits(file, tokenizer=output, passes=passes)
            return parity.agreement(logits), rows_per_s, file

        for setting in quantization_candidates(vnni):
            agreement, rows_per_s, file = measure(setting)
            record["candidates"].append({"setting": setting.name, **asdict(setting), "exclude": [],
                                         "argmax_agreement": agreement,
                                         "rows_per_s": round(rows_per_s, 1), "size_mb": file.stat().st_size / 1e6})
            if agreement >= min_agreement and (best is None or rows_per_s > best[1]):
                best = setting, rows_per_s, file
        top = max(c["argmax_agreement"] for c in record["candidates"])
        base = max((c for c in record["candidates"] if c["argmax_agreement"] >= top - 0.01),
                   key=lambda c: c["rows_per_s"])
        if best is None or base["rows_per_s"] > best[1]:  # a faster setting misses the bar: try it with a fallback
            found = _fallback(fp32, record, base, min_agreement, measure)
            if found is not None and (best is None or found[1] > best[1]):
                best = found
        if best is not None:
            shutil.move(best[2], output / FILES["int8"])
            record["chosen"] = best[0].name
    return (best[0] if best else None), record


def _fallback(fp32: Path, record: dict, base: dict, min_agreement: float,
              measure) -> tuple[QuantSetting, float, Path] | None:
    """The accuracy-driven fallback of ``choose_quantization`` from candidate ``base``, recorded in
    ``record['fallback']``."""
    setting = QuantSetting(base["weight_type"], base["per_channel"], base["reduce_range"])
    nodes = weight_nodes(fp32)
    alone = {node: measure(QuantSetting(**{**asdict(setting), "exclude": (node,)}), passes=1)[0] for node in nodes}
    # the most agreement for the fewest weights left in fp32: a node's gain over the base per million weights
    gain = {n: (alone[n] - base["argmax_agreement"]) / max(nodes[n], 1) * 1e6 for n in nodes}
    ranked = sorted((n for n in nodes if gain[n] > 0), key=lambda n: -gain[n])
    steps = []
    record["fallback"] = {"base": setting.name, "nodes": len(nodes), "weights": nodes,
                          "agreement_with_one_node_fp32": alone, "steps": steps}
    for k in range(1, min(len(ranked), len(nodes) // 2) + 1):
        kept = QuantSetting(**{**asdict(setting), "exclude": tuple(ranked[:k])})
        agreement, rows_per_s, file = measure(kept)
        steps.append({"setting": kept.name, "exclude": list(kept.exclude), "argmax_agreement": agreement,
                      "rows_per_s": round(rows_per_s, 1), "size_mb": file.stat().st_size / 1e6})
        if agreement >= min_agreement:
            return kept, rows_per_s, file
    return None


def no_setting_message(record: dict, output: Path, rows: int, min_agreement: float) -> str:
    figures = ", ".join(f"{c['setting']} {c['argmax_agreement']:.2%} ({c['rows_per_s']:.0f} rows/s)"
                        for c in record["candidates"] + record.get("fallback", {}).get("steps", [])[-1:])
    return (f"no int8 setting predicts PyTorch's class on export.min_agreement={min_agreement} of the {rows} held-out "
            f"texts: {figures}; {output / FILES['fp32']} (fp32) is written: set export.quantize false to ship it "
            f"alone, or lower export.min_agreement; see {output / REPORT}")


def trim_corpus(cfg: ExportConfig) -> CorpusConfig:
    """``export.trim_corpus``, or the soft labels ``cfg.model`` was distilled from: a run's soft_labels/ folder
    beside the model (or beside its tune/ folder) whose config hash is the one its kd_ray_train.json records."""
    if cfg.trim_corpus is not None:
        return cfg.trim_corpus
    model = Path(cfg.model)
    trained = model / "kd_ray_train.json"
    source = json.loads(trained.read_text()).get("plan", {}).get("source", {}) if trained.is_file() else {}
    for folder in (model.parent / "soft_labels", model.parent.parent / "soft_labels"):
        try:
            labels_hash = read_soft_label_info(str(folder)).metadata.config_hash if folder.is_dir() else None
        except SoftLabelError:
            continue
        if labels_hash is not None and labels_hash == source.get("soft_labels_hash"):
            return CorpusConfig(path=str(folder), format="parquet")
    raise ModelError(f"export.trim_vocab needs the texts whose tokens to keep: no soft_labels/ folder that "
                     f"{cfg.model} was distilled from lies beside it; set export.trim_corpus.path (the soft labels' "
                     f"folder, or the texts the model was trained on)")


def export_trimmed(folder: Path, *, opset: int, setting: QuantSetting | None) -> dict[str, Path]:
    """The ONNX files of the trimmed HF folder, beside it: fp32 (optimized) and, in ``setting``, int8."""
    optimize_graph(folder / FILES["fp32"], export_graph(folder, folder, opset=opset))
    files = {"trimmed": folder, "trimmed_fp32": folder / FILES["fp32"]}
    if setting is not None:
        files["trimmed_int8"] = quantize(files["trimmed_fp32"], folder / FILES["int8"], setting)
    return files


def run_export(cfg: ExportConfig) -> dict:
    """Export, optimize, quantize (and trim), check parity on the held-out texts, write ``export.json``; refuse a
    parity below the bar."""
    output = Path(cfg.output)
    texts = held_out_texts(cfg.parity, cfg.parity_rows)
    if not texts:
        raise ModelError(f"parity.path {cfg.parity.path} has no usable texts to check the export on")
    parity = ParityTexts.of(cfg.model, texts, cfg.max_length)
    report = {"model": cfg.model, "files": {}, "parity": {"rows": len(texts)}}
    files = {"fp32": output / FILES["fp32"]}
    report["optimizer"] = optimize_graph(files["fp32"], export_graph(cfg.model, output, opset=cfg.opset))
    setting = None
    if cfg.quantize:
        setting, report["quantization"] = choose_quantization(files["fp32"], output, parity, cfg.min_agreement)
        if setting is None:
            (output / REPORT).write_text(json.dumps(report, indent=2))  # export_graph made the folder
            raise ModelError(no_setting_message(report["quantization"], output, len(texts), cfg.min_agreement))
        files["int8"] = output / FILES["int8"]
    if cfg.trim_vocab:
        report["vocab"] = trim_vocabulary(cfg.model, corpus_texts(trim_corpus(cfg)), output / TRIMMED)
        files.update(export_trimmed(output / TRIMMED, opset=cfg.opset, setting=setting))
    for variant, path in files.items():
        report["files"][variant] = str(path.relative_to(output))
        report["parity"][variant] = parity.compare(path)
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
        say(f"kd-ray export: {Path(cfg.output) / report['files'][variant]}: {r['size_mb']:.1f} MB, predicts PyTorch's "
            f"class on {r['argmax_agreement']:.2%} of {report['parity']['rows']} held-out texts, largest logit "
            f"difference {r['max_abs_logit_diff']:.3g}")
    if "quantization" in report:
        say(f"kd-ray export: int8 setting {report['quantization']['chosen']}: the fastest on this CPU of the "
            f"{len(report['quantization']['candidates'])} tried that meet export.min_agreement={cfg.min_agreement}")
    if "vocab" in report:
        v = report["vocab"]
        say(f"kd-ray export: trimmed vocabulary {v['tokens_after']:,} of {v['tokens_before']:,} tokens "
            f"({v['corpus_texts']:,} corpus texts): {v['parameters_after']:,} parameters instead of "
            f"{v['parameters_before']:,}")
    return report


ENTRY_POINTS = {"export": main}
