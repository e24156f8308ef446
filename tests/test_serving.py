"""Serving a trained model: `kd-ray predict` (a corpus in, predictions per task out, on labeling's path) and
`kd-ray serve` (Ray Serve, real HTTP requests). The kill-and-rerun test of predict is in test_reliability."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_tiny_classifier, kd_ray_command, random_posts

from kd_ray.config import PredictConfig, TeacherConfig, load_config
from kd_ray.data.soft_labels import MANIFEST, validate_soft_labels
from kd_ray.models.multitask import MultiTaskClassifier, task_layout, task_predictions, write_layout
from kd_ray.models.teacher import OnnxTeacher, TeacherLabeler, make_teacher

MULTI = {"sentiment": ["negative", "neutral", "positive"], "topic": ["delay", "service"]}


@pytest.fixture(scope="module")
def multitask_model(tmp_path_factory) -> Path:
    """A tiny two-task classifier: joint outputs 'task:label' and its layout, as a multi-task student is saved."""
    layout = task_layout(MULTI)
    folder = build_tiny_classifier(tmp_path_factory.mktemp("models") / "two-tasks",
                                   labels=[f"{t.name}:{label}" for t in layout for label in t.labels])
    write_layout(folder, layout)
    return folder


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, multitask_model) -> Path:
    """The two-task model exported by `kd-ray export` (fp32; a lower parity bar: its weights are random)."""
    pytest.importorskip("onnxruntime", reason="needs the export extra: pip install -e '.[export]'")
    from kd_ray.config import ExportConfig
    from kd_ray.stages.export import run_export

    root = tmp_path_factory.mktemp("export")
    texts = root / "texts.parquet"
    pq.write_table(pa.table({"text": random_posts(60, seed=5)}), texts)
    run_export(load_config(ExportConfig, overrides={"model": str(multitask_model), "output": str(root / "onnx"),
                                                    "parity.path": str(texts), "max_length": 32,
                                                    "min_agreement": 0.8, "quantize": False}))
    return root / "onnx" / "model.onnx"


def corpus(folder: Path, n: int, seed: int = 3) -> tuple[Path, list[str], list[str]]:
    """A JSON Lines corpus with ids: (file, ids, texts)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = random_posts(n, seed=seed, min_words=1, max_words=40)
    ids = [f"post-{i}" for i in range(n)]
    (folder / "posts.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)))
    return folder / "posts.jsonl", ids, texts


# ---------------------------------------------------------------------------- Ray-free


def test_task_predictions_take_a_softmax_per_task_slice():
    logits = np.array([[1.0, 2.0, 3.0, 5.0, -5.0], [0.0, 0.0, 0.0, -1.0, 1.0]], np.float32)
    predicted = task_predictions(logits, MULTI)
    index, probs = predicted["sentiment"]
    assert index.tolist() == [2, 0] and np.allclose(probs.sum(axis=1), 1)
    assert np.allclose(probs[1], 1 / 3)
    assert predicted["topic"][0].tolist() == [0, 1] and predicted["topic"][1].shape == (2, 2)


def test_an_onnx_file_is_a_teacher_kind_of_its_own_chosen_by_its_suffix(onnx_model):
    cfg = TeacherConfig(model=str(onnx_model))
    assert cfg.kind == "onnx" and not cfg.encoder
    teacher = make_teacher(cfg, hash_weights=True)
    assert isinstance(teacher, OnnxTeacher) and teacher.info.model == str(onnx_model.resolve())
    assert teacher.info.labels[0] == "sentiment:negative" and len(teacher.info.weights_sha256) == 64
    with pytest.raises(ValueError, match="only its logits"):
        make_teacher(TeacherConfig(model=str(onnx_model), representation="mean"))
    with pytest.raises(Exception, match="does not exist"):
        make_teacher(TeacherConfig(model=str(onnx_model.with_name("missing.onnx"))))


@pytest.mark.parametrize("model", ["pytorch", "onnx"])
def test_the_labeler_predicts_what_the_multitask_classifier_predicts(model, multitask_model, onnx_model):
    from kd_ray.stages.predict import predictions_info

    path = str(onnx_model if model == "onnx" else multitask_model)
    texts = random_posts(50, seed=8, min_words=1, max_words=40)
    info = predictions_info(path, "unused")
    assert info.tasks == MULTI
    labeler = TeacherLabeler([make_teacher(TeacherConfig(model=path, name="model", max_length=32)).info],
                             batch_size=16, predictions=info)
    out = labeler(pa.table({"id": [str(i) for i in range(50)], "text": texts, "label": pa.nulls(50, pa.int32()),
                            "reject_reason": pa.nulls(50, pa.string())}))
    expected = MultiTaskClassifier.from_pretrained(path, max_length=32).predict(texts)
    for task in MULTI:
        assert out.column(f"{task}_label").to_pylist() == expected[task]["labels"]
        probs = np.array(out.column(f"{task}_probs").to_pylist())
        np.testing.assert_allclose(probs, expected[task]["probs"], atol=1e-5)


def test_predict_refuses_gold_labels_and_serve_names_a_bad_request():
    from kd_ray.stages.serve import BadRequest, request_texts

    with pytest.raises(ValueError, match="reads no gold labels, but corpus.label_column"):
        PredictConfig(model="m", corpus={"path": "a.jsonl", "label_column": "y"}, output={"path": "o"})
    assert request_texts({"text": "late again"}, 100) == ["late again"]
    assert request_texts({"texts": ["a", "b"]}, 100) == ["a", "b"]
    for body, message in [({"txt": "x"}, "POST JSON"), ({"texts": []}, "POST JSON"), ([1], "POST JSON"),
                          ({"texts": ["ok", ""]}, r"texts\[1\] must be a non-empty string"),
                          ({"text": 3}, "text must be a non-empty string"),
                          ({"text": "x" * 101}, "101 characters; at most 100")]:
        with pytest.raises(BadRequest, match=message):
            request_texts(body, 100)


# ---------------------------------------------------------------------------- with Ray


def read_predictions(folder: Path) -> pa.Table:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))
    return table.sort_by("id")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pytorch", "onnx"])
def test_predict_writes_every_task_of_every_post_once_and_validates(model, ray_session, multitask_model, onnx_model,
                                                                    tmp_path):
    from kd_ray.stages.predict import run_predict

    path = onnx_model if model == "onnx" else multitask_model
    file, ids, texts = corpus(tmp_path / "corpus", 600)
    cfg = load_config(PredictConfig, overrides={
        "model": str(path), "max_length": 32, "corpus.path": str(file), "corpus.id_column": "id",
        "output.path": str(tmp_path / "out"), "output.logits": True, "compute.block_rows": 100,
        "output.rows_per_file": 200})
    summary = run_predict(cfg)
    assert summary.rows == 600 and summary.line().startswith("kd-ray predict: 600 rows")
    table = read_predictions(tmp_path / "out")
    assert table.column_names == ["id", "sentiment_label", "sentiment_probs", "topic_label", "topic_probs",
                                  "model_logits", "truncated"]
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    expected = MultiTaskClassifier.from_pretrained(path, max_length=32).predict(texts)
    order = np.argsort(ids)
    for task in MULTI:
        assert table.column(f"{task}_label").to_pylist() == [expected[task]["labels"][i] for i in order]
        np.testing.assert_allclose(np.array(table.column(f"{task}_probs").to_pylist()),
                                   expected[task]["probs"][order], atol=1e-5)
    assert validate_soft_labels(str(tmp_path / "out"))["rows"] == 600
    assert run_predict(cfg).skipped_existing  # the same config again: nothing to do


# ---------------------------------------------------------------------------- kd-ray serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_serve_answers_http_posts_with_what_predict_wrote(ray_session, multitask_model, tmp_path):
    file, ids, texts = corpus(tmp_path / "corpus", 40, seed=11)
    predicted = kd_ray_command(["predict", "--model", str(multitask_model), "--max_length", "32", "--corpus.path",
                                str(file), "--corpus.id_column", "id", "--output.path", str(tmp_path / "predictions")],
                               ray_session)
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    rows = {r["id"]: r for r in read_predictions(tmp_path / "predictions").to_pylist()}

    port = free_port()
    command = [str(Path(sys.executable).with_name("kd-ray")), "serve", "--model", str(multitask_model),
               "--max_length", "32", "--port", str(port), "--max_batch_size", "8", "--output", str(tmp_path / "serve"),
               "--num_cpus_per_replica", "0.5", "--ray.address", ray_session.get_runtime_context().gcs_address]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while not (tmp_path / "serve" / "serve.json").exists() and server.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert server.poll() is None, server.stdout.read()
        assert json.loads((tmp_path / "serve" / "serve.json").read_text())["url"] == url

        status, one = post(url, {"text": texts[0]})
        assert status == 200 and one["labels"] == MULTI
        status, many = post(url, {"texts": texts})
        assert status == 200 and len(many["predictions"]) == len(texts)
        for i, answer in zip([ids[0], *ids], [one["predictions"][0], *many["predictions"]]):
            for task in MULTI:
                assert answer[f"{task}_label"] == rows[i][f"{task}_label"]
                np.testing.assert_allclose(answer[f"{task}_probs"], rows[i][f"{task}_probs"], atol=1e-5)
        status, error = post(url, {"texts": ["fine", ""]})
        assert status == 400 and "texts[1] must be a non-empty string" in error["error"]
        with urllib.request.urlopen(url, timeout=30) as response:  # GET: what is served
            assert json.loads(response.read())["tasks"] == MULTI
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=120)
    assert server.returncode == 0, output
    assert "kd-ray serve: stopped" in output
    assert (tmp_path / "predictions" / MANIFEST).is_file()


def test_a_missing_or_wrong_model_is_named_before_any_ray_work(tmp_path):
    from kd_ray.errors import ModelError
    from kd_ray.stages.predict import run_predict
    from kd_ray.stages.serve import build_app

    (tmp_path / "not-a-model").mkdir()
    for model, message in [(tmp_path / "gone" / "model.int8.onnx", "the model file .*model.int8.onnx does not exist"),
                           (tmp_path / "not-a-model", "the model folder .*not-a-model has no config.json")]:
        cfg = load_config(PredictConfig, overrides={"model": str(model), "corpus.path": str(tmp_path / "x.jsonl"),
                                                    "output.path": str(tmp_path / "out")})
        with pytest.raises(ModelError, match=message):
            run_predict(cfg)
        with pytest.raises(ModelError, match=message):
            build_app({"model": str(model)})
    assert not (tmp_path / "out").exists()
