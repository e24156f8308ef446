"""`kd-ray export`: ONNX files that predict what the PyTorch model predicts, for one task and several."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LABELS, build_tiny_classifier, random_posts
from kd_ray.config import ExportConfig, load_config

pytest.importorskip("onnxruntime", reason="needs the export extra: pip install -e '.[export]'")


def _posts(folder, n: int = 120):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": random_posts(n, seed=21, min_words=1, max_words=40)}), folder / "posts.parquet")
    return folder / "posts.parquet"


def _export(model, out, texts, **overrides):
    from kd_ray.export import run_export

    return run_export(load_config(ExportConfig, overrides={"model": str(model), "output": str(out),
                                                           "parity.path": str(texts), **overrides}))


def test_the_onnx_files_predict_the_pytorch_models_logits_on_mixed_length_batches(tmp_path, tiny_teacher):
    from kd_ray.export import OnnxModel
    from kd_ray.inference import predict_logits
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = _export(tiny_teacher, tmp_path / "onnx", _posts(tmp_path / "data"), max_length=32, min_agreement=0.8)
    assert report["parity"]["rows"] == 120 and report["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert report["parity"]["fp32"]["argmax_agreement"] == 1.0 and report["parity"]["fp32"]["max_abs_logit_diff"] < 1e-4
    assert report["parity"]["int8"]["argmax_agreement"] >= 0.9  # the export's own bar, on a random tiny model
    assert json.loads((tmp_path / "onnx" / "export.json").read_text()) == report
    for name in ("tokenizer.json", "config.json", "model.onnx", "model.int8.onnx"):
        assert (tmp_path / "onnx" / name).is_file(), name
    texts = random_posts(37, seed=5, min_words=1, max_words=60)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "onnx")
    expected = predict_logits(AutoModelForSequenceClassification.from_pretrained(tiny_teacher), tokenizer, texts,
                              max_length=32, batch_size=8)
    got = predict_logits(OnnxModel(tmp_path / "onnx" / "model.onnx"), tokenizer, texts, max_length=32, batch_size=8)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert OnnxModel(tmp_path / "onnx" / "model.onnx").config.id2label[0] == LABELS[0]


def test_a_multitask_student_exports_with_every_head(tmp_path):
    from kd_ray.export import OnnxModel
    from kd_ray.multitask import MultiTaskClassifier, joint_labels, task_layout, write_layout

    layout = task_layout({"sentiment": LABELS, "reason": ["late", "lost bag", "other"]})
    folder = build_tiny_classifier(tmp_path / "student", labels=joint_labels(layout))
    write_layout(folder, layout)
    report = _export(folder, tmp_path / "onnx", _posts(tmp_path / "data"), quantize=False, max_length=32)
    assert report["parity"]["fp32"]["argmax_agreement"] == 1.0 and "int8" not in report["parity"]
    texts = random_posts(20, seed=8)
    reference = MultiTaskClassifier.from_pretrained(folder)
    onnx = MultiTaskClassifier(OnnxModel(tmp_path / "onnx" / "model.onnx"), reference.tokenizer,
                               reference.layout).predict(texts)
    torch_out = reference.predict(texts)
    assert (tmp_path / "onnx" / "kd_ray_tasks.json").is_file()
    for task in ("sentiment", "reason"):
        assert onnx[task]["labels"] == torch_out[task]["labels"]


def test_evaluate_scores_an_exported_file_as_one_more_model(tmp_path, tiny_teacher):
    from conftest import labeled_corpus
    from kd_ray.config import EvalArgs, EvalSetConfig
    from kd_ray.evaluate import SINGLE_TASK, evaluate_models, metrics_report

    _export(tiny_teacher, tmp_path / "onnx", _posts(tmp_path / "data"), max_length=32, min_agreement=0.8)
    test = EvalSetConfig(path=str(labeled_corpus(tmp_path / "test", 60)))
    report = metrics_report(evaluate_models({SINGLE_TASK: str(tiny_teacher)},
                                            {"student": str(tiny_teacher), "student_int8": str(tmp_path / "onnx" / "model.int8.onnx")},
                                            test, EvalArgs(max_length=32, timing_rows=20, timing_repeats=1)))
    int8 = report["student_int8"]
    assert int8["agreement"] >= 0.9 and int8["rows_per_s"] > 0 and int8["params"] > 0
    assert 0 < int8["size_mb"] < report["student"]["size_mb"]


def test_a_parity_set_without_texts_is_refused(tmp_path, tiny_teacher):
    from kd_ray.errors import ModelError

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(ModelError, match="no usable texts"):
        _export(tiny_teacher, tmp_path / "onnx", empty)
