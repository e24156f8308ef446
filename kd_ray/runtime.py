"""Connecting to Ray: join the cluster a job runs in, or start a local instance."""

from __future__ import annotations

import os

from kd_ray.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process.

    Inside `ray job submit`, RAY_ADDRESS is set and ``ray.init()`` joins that cluster;
    on a laptop with no cluster it starts a local instance (the embedded default).
    """
    import ray

    if ray.is_initialized():
        return
    kwargs = {"address": cfg.address, "log_to_driver": True}
    if cfg.address is None and "RAY_ADDRESS" not in os.environ:  # a local instance, started here
        kwargs["include_dashboard"] = cfg.dashboard
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
    ray.init(**kwargs)
