"""Start and stop a real multi-node Ray cluster on this machine, for `cluster`-marked tests.

A thin wrapper over ``cluster/local-up.sh`` and ``cluster/local-down.sh`` (one `ray start`
per node, joined over 127.0.0.1), so tests exercise exactly what a user runs::

    info = start_local_cluster(num_workers=1)
    try:
        subprocess.run(["ray", "job", "submit", "--address", info["dashboard_url"], ...],
                       env=info["env"], check=True)
    finally:
        stop_local_cluster()

The ``ray`` used is the one next to this interpreter, so the cluster and the jobs run in the
test's own environment. ``stop_local_cluster`` stops only this cluster's processes, by pid (see
local-down.sh); it raises if any of them survive.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_UP = REPO_ROOT / "cluster" / "local-up.sh"
LOCAL_DOWN = REPO_ROOT / "cluster" / "local-down.sh"
DEFAULT_LOCAL_DIR = "/tmp/kd-ray-local"


def _script_env(local_dir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    ray_bin = Path(sys.executable).parent / "ray"
    if ray_bin.exists():
        env["RAY"] = str(ray_bin)
    env["KD_RAY_LOCAL_DIR"] = local_dir
    env.update(extra or {})
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {result.returncode}\n"
            f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
        )
    return result


def start_local_cluster(
    num_workers: int = 1,
    head_port: int = 6390,
    dashboard_port: int = 8275,
    num_cpus_per_node: int = 2,
    local_dir: str = DEFAULT_LOCAL_DIR,
    timeout_s: float = 300,
) -> dict:
    """Start a head and ``num_workers`` worker nodes; return once all are registered.

    Returns a dict with ``address`` ("127.0.0.1:<head_port>", for ``ray.init``/``ray status``),
    ``dashboard_url`` ("http://127.0.0.1:<dashboard_port>", for ``ray job submit``),
    ``num_nodes``, ``local_dir`` (node logs) and ``env`` (os.environ plus the RAY_AUTH_MODE the
    cluster runs with, for ``ray`` CLI subprocesses), and ``stdout`` of local-up.sh.
    """
    env = _script_env(
        local_dir,
        {
            "RAY_PORT": str(head_port),
            "DASHBOARD_PORT": str(dashboard_port),
            "RAY_CLIENT_SERVER_PORT": str(head_port + 1),
        },
    )
    cmd = ["bash", str(LOCAL_UP), "--workers", str(num_workers), "--num-cpus", str(num_cpus_per_node)]
    result = _run(cmd, env, timeout_s)

    info = _read_cluster_env(local_dir)
    client_env = dict(os.environ)
    client_env["RAY_AUTH_MODE"] = info["RAY_AUTH_MODE"]
    return {
        "address": info["RAY_ADDRESS"],
        "dashboard_url": info["DASHBOARD_URL"],
        "num_nodes": int(info["NUM_NODES"]),
        "local_dir": local_dir,
        "env": client_env,
        "stdout": result.stdout,
    }


def stop_local_cluster(local_dir: str = DEFAULT_LOCAL_DIR, timeout_s: float = 120) -> None:
    """Stop the cluster that ``start_local_cluster`` started (a no-op when none runs).

    Always by pid (``local-down.sh --by-pid``), never `ray stop`: a test must not stop another
    Ray instance on the machine, even one that starts while this cluster goes down.
    """
    _run(["bash", str(LOCAL_DOWN), "--by-pid"], _script_env(local_dir), timeout_s)


def _read_cluster_env(local_dir: str) -> dict[str, str]:
    path = Path(local_dir) / "cluster.env"
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}
