"""`kd-ray serve`: a trained model answering HTTP posts, as a Ray Serve application.

POST ``{"text": "..."}`` or ``{"texts": ["...", ...]}`` (JSON) to the route; the answer holds, per text, the
columns `kd-ray predict` writes (``<task>_label``, ``<task>_probs``, ``truncated``) and each task's labels in
the order of its probabilities. Each replica runs the model through the labeler that `kd-ray predict`'s actors
run (``kd_ray.models.teacher.TeacherLabeler``), on the texts of concurrent requests batched by ``serve.batch``.

On a cluster, the same application is deployed from a Serve config that names ``kd_ray.stages.serve:build_app``
and gives a ``ServeConfig`` as its ``args`` (``serve deploy``, or a KubeRay RayService: cluster/rayservice.yaml).
"""
# No `from __future__ import annotations`: Ray Serve reads build_app's annotation to validate its args.

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from kd_ray.config import ServeConfig
from kd_ray.console import say
from kd_ray.data.normalize import normalize_post
from kd_ray.models.teacher import TeacherLabeler, make_teacher
from kd_ray.runtime import init_ray
from kd_ray.stages.predict import predictions_info

USAGE = 'POST JSON {"text": "a post"} or {"texts": ["a post", ...]}'


class BadRequest(ValueError):
    """A request kd-ray answers with HTTP 400 and this message."""


def request_texts(body: Any, max_chars: int) -> list[str]:
    """The texts of a request's JSON body, checked: each a non-empty string of at most ``max_chars`` characters."""
    if isinstance(body, dict) and len(body) == 1 and "text" in body:
        texts, field = [body["text"]], "text"
    elif isinstance(body, dict) and len(body) == 1 and isinstance(body.get("texts"), list) and body["texts"]:
        texts, field = body["texts"], "texts"
    else:
        raise BadRequest(f"{USAGE}; got {json.dumps(body)[:200]}")
    for i, text in enumerate(texts):
        where = field if field == "text" else f"texts[{i}]"
        if not isinstance(text, str) or not text.strip():
            raise BadRequest(f"{where} must be a non-empty string, got {json.dumps(text)[:100]}")
        if len(text) > max_chars:
            raise BadRequest(f"{where} has {len(text):,} characters; at most {max_chars:,} are accepted "
                             "(max_text_chars)")
    return texts


@serve.deployment
class ModelServer:
    """One replica: the model loaded once, texts of concurrent requests run in batches."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.predictions = predictions_info(cfg.model, cfg.task)
        info = make_teacher(cfg.teacher(), hash_weights=True).info
        self.labeler = TeacherLabeler([info], batch_size=cfg.max_batch_size, threads=cfg.threads_per_replica,
                                      predictions=self.predictions)
        self.classify.set_max_batch_size(cfg.max_batch_size)
        self.classify.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.columns = [c for task in self.predictions.tasks for c in self.predictions.columns(task)] + ["truncated"]
        self.model = {"model": info.model, "weights_sha256": info.weights_sha256, "tasks": self.predictions.tasks}

    @serve.batch
    async def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        n = len(texts)
        out = self.labeler(pa.table({"id": [str(i) for i in range(n)], "text": texts,
                                     "label": pa.nulls(n, pa.int32()), "reject_reason": pa.nulls(n, pa.string())}))
        return out.select(self.columns).to_pylist()

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":  # what is served
            return JSONResponse(self.model)
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not JSON ({e}); {USAGE}") from None
            texts = request_texts(body, self.cfg.max_text_chars)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if self.cfg.normalize:
            texts = [normalize_post(t) for t in texts]
        rows = await asyncio.gather(*(self.classify(t) for t in texts))
        return JSONResponse({"predictions": rows, "labels": self.predictions.tasks})


def build_app(args: ServeConfig) -> serve.Application:
    """The application, from a ServeConfig (Ray Serve validates a Serve config's ``args`` against it)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    predictions_info(cfg.model, cfg.task)  # a bad model path fails here, not in every replica
    return ModelServer.options(
        num_replicas=cfg.replicas, max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
        ray_actor_options={"num_cpus": cfg.num_cpus_per_replica}).bind(cfg)


def served_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host == "0.0.0.0" else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix}"


def main(cfg: ServeConfig) -> int:
    """Start the application on the local Ray (or ``ray.address``'s cluster) and answer until interrupted."""
    app = build_app(cfg)
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.name, route_prefix=cfg.route_prefix)
    url = served_url(cfg)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    record = {"url": url, "name": cfg.name, "config": cfg.model_dump(mode="json"), "started": time.time(),
              "tasks": predictions_info(cfg.model, cfg.task).tasks}
    (Path(cfg.output) / "serve.json").write_text(json.dumps(record, indent=2))
    say(f"kd-ray serve: {cfg.model} answers at {url} ({cfg.replicas} replica(s)); try: curl -s {url} "
        f"-H 'Content-Type: application/json' -d '{{\"text\": \"the flight was late again\"}}'; Ctrl-C stops it")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    serve.delete(cfg.name)
    if cfg.ray.address is None:
        serve.shutdown()
    say("kd-ray serve: stopped")
    return 0


ENTRY_POINTS = {"serve": main}
