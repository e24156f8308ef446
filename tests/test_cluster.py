"""kd-ray on a real two-node Ray cluster on this machine: `ray job submit` of jobs/label.py, then jobs/distill.py.

A head node and a worker node are separate `ray start` processes (tests/cluster_helpers.py over
cluster/local-up.sh), each with its own raylet, object store and temp dir; a local path is shared
storage because both nodes run here. The test process never joins the cluster: it submits jobs and
reads Ray's records through the `ray` CLI, so the session's own Ray instance (``ray_session``) can
run beside it. One labeling job is shared by both tests.

Each node advertises CPUS_PER_NODE CPUs and the teacher actors and training workers each ask for
SPREAD_CPUS, more than half a node: two of them cannot share a node, so every run spans both.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from cluster_helpers import REPO_ROOT, start_local_cluster, stop_local_cluster
from conftest import random_posts

from kd_ray.cli import main
from kd_ray.config import LabelConfig, load_config
from kd_ray.data.soft_labels import MANIFEST
from kd_ray.stages.label import run_label

pytestmark = pytest.mark.cluster

RAY = Path(sys.executable).parent / "ray"
CPUS_PER_NODE = 3
# Over half a node, so two actors (or two training workers) cannot share one; and at most
# CPUS_PER_NODE - 1, so each node keeps a whole CPU for the corpus read tasks (1 CPU each).
SPREAD_CPUS = 1.6
# file -> rows; three files of two formats, cut into many blocks so that both actors get work
FILES = {"a.parquet": 1000, "b.csv": 800, "sub/c.parquet": 600}
ROWS = sum(FILES.values())
BLOCK_ROWS = 128
LABEL_TIMEOUT_S = 300
DISTILL_TIMEOUT_S = 400
MAX_UPLOAD_MIB = 10  # the repository without .venv/, runs/, data/ (.gitignore) is about 1 MiB


# ---------------------------------------------------------------------------- helpers


def write_corpus(root: Path) -> dict[str, str]:
    """Writes FILES under ``root`` (columns ``id``, ``text``); returns id -> text."""
    texts: dict[str, str] = {}
    for seed, (name, rows) in enumerate(FILES.items()):
        ids = [f"post-{len(texts) + i:05d}" for i in range(rows)]
        table = pa.table({"id": ids, "text": random_posts(rows, seed=seed)})
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".csv"):
            pacsv.write_csv(table, path)
        else:
            pq.write_table(table, path)
        texts.update(zip(ids, table.column("text").to_pylist()))
    return texts


def label_flags(corpus: Path, teacher: Path, output: Path) -> dict[str, object]:
    """The labeling config, as dotted flags: the cluster job and the one-node reference share it."""
    return {"corpus.path": str(corpus), "corpus.id_column": "id", "teachers.0.model": str(teacher),
            "output.path": str(output), "output.rows_per_file": 1000, "compute.concurrency": 2,
            "compute.num_cpus": SPREAD_CPUS, "compute.block_rows": BLOCK_ROWS, "compute.batch_size": 32}


def as_argv(flags: dict[str, object]) -> list[str]:
    return [arg for key, value in flags.items() for arg in (f"--{key}", "null" if value is None else str(value))]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port_pair(low: int, high: int) -> int:
    """A port p in [low, high) with p and p + 1 free (the GCS and Ray Client ports of a head)."""
    candidates = list(range(low, high, 2))
    random.shuffle(candidates)  # two test sessions on one machine rarely try the same ports
    for port in candidates:
        if _port_free(port) and _port_free(port + 1):
            return port
    raise RuntimeError(f"no two free consecutive ports in {low}..{high}")


def ray_cli(cluster: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=cluster["env"], capture_output=True, text=True, timeout=timeout)


def _tail(text: str | bytes | None, chars: int = 6000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


def job_record(cluster: dict, submission_id: str) -> dict:
    """Ray's record of a submitted job (status, the driver's job_id, runtime_env), from the state API."""
    result = ray_cli(cluster, "list", "jobs", "--address", cluster["dashboard_url"], "--detail", "--format", "json")
    assert result.returncode == 0, result.stderr
    jobs = [j for j in json.loads(result.stdout) if j.get("submission_id") == submission_id]
    assert len(jobs) == 1, f"ray list jobs has {len(jobs)} records of {submission_id}"
    return jobs[0]


def submit_job(cluster: dict, script: str, flags: dict[str, object], *, timeout: float,
               env_vars: dict[str, str] | None = None) -> dict:
    """`ray job submit --working-dir <repo> -- python <script> <flags>`; returns the job's record once it SUCCEEDED.

    The record has ``output``: what `ray job submit` printed (upload lines and the job's logs).
    """
    submission_id = f"kd-ray-test-{Path(script).stem}-{uuid.uuid4().hex[:8]}"
    cmd = ["job", "submit", "--address", cluster["dashboard_url"], "--submission-id", submission_id,
           "--working-dir", str(REPO_ROOT)]
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    cmd += ["--", "python", script, *as_argv(flags)]
    try:
        result = ray_cli(cluster, *cmd, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        ray_cli(cluster, "job", "stop", "--address", cluster["dashboard_url"], "--no-wait", submission_id)
        pytest.fail(f"{script} did not finish in {timeout} s; `ray job submit` printed:\n{_tail(e.stdout)}")
    output = result.stdout + result.stderr
    record = job_record(cluster, submission_id)
    assert record["status"] == "SUCCEEDED", (
        f"{script} ended {record['status']}: {record.get('message')}\n`ray job submit` printed:\n{_tail(output)}")
    return {**record, "output": output}


def state_list(cluster: dict, kind: str, job_id: str) -> list[dict]:
    """`ray list <kind>` (actors, tasks) of one job, from Ray's state API, with node ids."""
    result = ray_cli(cluster, "list", kind, "--address", cluster["dashboard_url"], "--filter", f"job_id={job_id}",
                     "--detail", "--format", "json", "--limit", "10000")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def alive_node_ids(cluster: dict) -> set[str]:
    result = ray_cli(cluster, "list", "nodes", "--address", cluster["dashboard_url"], "--filter", "state=ALIVE",
                     "--format", "json")
    assert result.returncode == 0, result.stderr
    return {n["node_id"] for n in json.loads(result.stdout)}


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a running process, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), fields[19]


def cluster_processes(cluster: dict) -> dict[int, tuple[str, str]]:
    """pid -> (start time, name) of every process of the cluster: those whose command line names its
    temp dir (GCS, raylets, dashboard, monitors) or its Ray Client server, and all their descendants
    (workers, agents, job drivers)."""
    table: dict[int, tuple[int, str, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = _proc_stat(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if stat is not None:
            table[pid] = (stat[0], stat[1], name, cmdline)
    port = cluster["address"].rsplit(":", 1)[1]
    ours = {pid for pid, (_, _, _, cmd) in table.items()
            if f"{cluster['local_dir']}/" in cmd or ("ray.util.client.server" in cmd and f":{port} " in cmd)}
    ours.discard(os.getpid())
    grew = True
    while grew:
        children = {pid for pid, (ppid, *_) in table.items() if ppid in ours} - ours
        ours |= children
        grew = bool(children)
    return {pid: (table[pid][1], table[pid][2]) for pid in ours}


def read_soft_labels(folder: Path) -> pa.Table:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))
    return table.sort_by("id")


def logits(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("teacher_logits").to_pylist(), dtype=np.float32)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node; on teardown, asserts that no process of the cluster is left."""
    # Short and under /tmp: Ray's socket paths under a node's temp dir must fit in 107 bytes.
    local_dir = tempfile.mkdtemp(prefix="kd-ray-test-", dir="/tmp")
    info = start_local_cluster(num_workers=1, head_port=free_port_pair(6400, 6900),
                               dashboard_port=free_port_pair(8300, 8800), num_cpus_per_node=CPUS_PER_NODE,
                               local_dir=local_dir)
    try:
        yield info
    finally:
        processes = cluster_processes(info)
        names = Counter(name for _, name in processes.values())
        stop_local_cluster(local_dir)
        # Same pid and start time: that very process, not a new one that reused its pid.
        survivors = {pid: name for pid, (start, name) in processes.items()
                     if (stat := _proc_stat(pid)) is not None and stat[1] == start}
        still_named = subprocess.run(["pgrep", "-a", "-f", "--", f"{local_dir}/"], capture_output=True, text=True)
        shutil.rmtree(local_dir, ignore_errors=True)
        assert names["raylet"] == 2 and names["gcs_server"] == 1, f"found no cluster to stop: {dict(names)}"
        assert not survivors, f"cluster processes still running after stop_local_cluster: {survivors}"
        assert still_named.returncode == 1, f"processes naming {local_dir} still run:\n{still_named.stdout}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("cluster-corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def labeled(cluster, corpus, tiny_teacher, tmp_path_factory) -> dict:
    """The labeling job, submitted to the cluster; its record (job_id, output) and the soft-label folder."""
    output = tmp_path_factory.mktemp("cluster-run") / "soft_labels"
    # Ray Data hands out blocks only once both teacher actors are up, not all to the first one ready.
    record = submit_job(cluster, "jobs/label.py", label_flags(corpus[0], tiny_teacher, output),
                        timeout=LABEL_TIMEOUT_S, env_vars={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"})
    return {**record, "soft_labels": output}


# ---------------------------------------------------------------------------- tests


def test_label_then_distill_jobs_on_a_two_node_cluster(cluster, labeled, corpus, tmp_path, capsys):
    texts = corpus[1]
    # The job ran the repository as uploaded and unpacked on the head node: kd_ray/ and jobs/, without
    # .venv/, runs/ or data/ (.gitignore).
    uploaded = re.search(r"Uploading package (gcs://_ray_pkg_\w+)\.zip", labeled["output"])
    assert uploaded, f"no upload line in the `ray job submit` output:\n{_tail(labeled['output'])}"
    assert labeled["runtime_env"]["working_dir"] == uploaded[1] + ".zip"
    package = uploaded[1].rsplit("/", 1)[1]
    unpacked = list(Path(cluster["local_dir"]).glob(f"head/session_latest/runtime_resources/working_dir_files/{package}"))
    assert len(unpacked) == 1, "the job's working dir is not where the head node unpacks it"
    shipped = {p.name for p in unpacked[0].iterdir()}
    assert {"kd_ray", "jobs", "pyproject.toml"} <= shipped and not {".venv", "runs", "data"} & shipped, shipped
    size = sum(f.stat().st_size for f in unpacked[0].rglob("*") if f.is_file())
    assert size < MAX_UPLOAD_MIB * 2**20, f"the job's working dir holds {size / 2**20:.1f} MiB"
    assert f"kd-ray label: {ROWS} rows ->" in labeled["output"]

    # The soft labels are complete: every input id exactly once, with its text; `kd-ray validate` passes.
    folder = labeled["soft_labels"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["rows"] == ROWS and manifest["rejected"] == 0
    assert sorted(manifest["files"]) == sorted(p.name for p in folder.glob("part-*.parquet"))
    assert main(["validate", str(folder)]) == 0
    assert f"ok: {ROWS} rows" in capsys.readouterr().out
    table = read_soft_labels(folder)
    ids = table.column("id").to_pylist()
    assert ids == sorted(texts)  # sorted and equal: no row lost, none doubled
    assert table.column("text").to_pylist() == [texts[i] for i in ids]
    assert np.isfinite(logits(table)).all() and logits(table).shape == (ROWS, 3)

    # Distill on both nodes: two Ray Train workers, one per node (SPREAD_CPUS each).
    student = tmp_path / "student"
    distill = {"soft_labels": str(folder), "output": str(student), "storage_path": str(tmp_path / "ray_train"),
               "student.num_layers": 1, "student.ffn_size": None, "train.num_workers": 2, "train.epochs": 1,
               "train.batch_size": 64,
               "train.num_cpus_per_worker": SPREAD_CPUS, "train.max_failures": 0}
    record = submit_job(cluster, "jobs/distill.py", distill, timeout=DISTILL_TIMEOUT_S)
    assert "kd-ray distill: 1 epochs" in record["output"]
    workers = [a for a in state_list(cluster, "actors", record["job_id"]) if "RayTrainWorker" in a["class_name"]]
    assert len(workers) == 2 and {a["node_id"] for a in workers} == alive_node_ids(cluster), workers

    assert (student / "model.safetensors").is_file() and (student / "config.json").is_file()
    run_info = json.loads((student / "kd_ray_train.json").read_text())
    assert run_info["mode"] == "distill"
    assert [h["epoch"] for h in run_info["history"]] == [1]
    assert math.isfinite(run_info["history"][0]["train_loss"])
    assert run_info["plan"]["rows"] == ROWS and run_info["plan"]["train"]["num_workers"] == 2
    config = json.loads((student / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert list(config["id2label"].values()) == ["negative", "neutral", "positive"]


def test_labeling_ran_on_both_nodes_and_matches_a_one_node_run(cluster, labeled, corpus, tiny_teacher, ray_session,
                                                              tmp_path):
    nodes = alive_node_ids(cluster)
    assert len(nodes) == 2
    # Ray's own records of the job: where the teacher actors lived and where their blocks ran.
    actors = [a for a in state_list(cluster, "actors", labeled["job_id"]) if "TeacherLabeler" in a["class_name"]]
    assert len(actors) == 2 and {a["node_id"] for a in actors} == nodes, actors
    tasks = [t for t in state_list(cluster, "tasks", labeled["job_id"])
             if "TeacherLabeler" in t["name"] and t["name"].endswith(".submit") and t["state"] == "FINISHED"]
    blocks_per_node = Counter(t["node_id"] for t in tasks)
    assert set(blocks_per_node) == nodes, f"labeled blocks per node: {dict(blocks_per_node)}"

    # The same config on one node (this session's local Ray), only with actors that fit on it.
    reference_output = tmp_path / "soft_labels"
    flags = {**label_flags(corpus[0], tiny_teacher, reference_output), "compute.num_cpus": 0.5}
    run_label(load_config(LabelConfig, overrides=flags))
    reference, clustered = read_soft_labels(reference_output), read_soft_labels(labeled["soft_labels"])
    assert clustered.column("id").to_pylist() == reference.column("id").to_pylist()
    assert clustered.column("text").to_pylist() == reference.column("text").to_pylist()
    assert clustered.column("truncated").to_pylist() == reference.column("truncated").to_pylist()
    np.testing.assert_allclose(logits(clustered), logits(reference), rtol=0, atol=1e-5)
    manifests = [json.loads((f / MANIFEST).read_text()) for f in (reference_output, labeled["soft_labels"])]
    assert manifests[0]["config_hash"] == manifests[1]["config_hash"]
