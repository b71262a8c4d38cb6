"""HTTP serving of SEG generation: a thin Ray Serve deployment around the serving core and app.

``POST /v1/generate`` (PNG, or JSON with base64 images and their parameters), ``GET /v1/health``,
``GET /v1/info``; the OpenAI Images API (``/v1/images/generations``, ``/v1/models``), the
AUTOMATIC1111 API (``/sdapi/v1/...``), the playground at ``/`` and ``/metrics``; OpenAPI at ``/docs``
and ``/openapi.json``. The replica loads the model once;
``@serve.batch`` collects concurrent requests and the Ray-free core (``core.py``) groups them
into sampling runs, enforces limits, isolates failures and writes records. Each replica builds its
own FastAPI app (``__serve_build_asgi_app__``), so deployments in one process share no app state.

Latency mode (``branch_parallel: N`` in the config): each replica's placement group holds the
replica (bundle 0) and N ranks (bundles 1..N; 1 CPU, plus 1 GPU for ``branch_parallel_device:
cuda``), so Serve reserves and releases them with the replica; each run's steps are split over the
ranks (``seg_rt.cluster.branch``).

Run it with ``seg-rt serve [--model M]`` (no model: the bundled demo model) or
``serve run seg_rt.cluster.serving.deployment:build_app model=M``.
"""

import asyncio
import logging
import time
from typing import Any

from seg_rt.optional import require

from .config import ServeConfig
from .core import Failure, ServingCore
from .http import build_app as build_http_app

serve = require("ray.serve", "serving")

logger = logging.getLogger(__name__)


@serve.deployment(name="seg-rt", health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress()
class SEGService:
    """One replica: the model loaded once; batched sampling runs through the serving core."""

    def __init__(self, data: dict) -> None:
        config = ServeConfig.model_validate(data)
        if config.branch_parallel > 1:  # latency mode: the ranks use bundles 1.. of this replica's group
            from ray.util import get_current_placement_group

            self.core = ServingCore.load(
                config, "ray", placement_group=get_current_placement_group(), first_bundle=1
            )
        else:
            self.core = ServingCore.load(config)
        self.generate_batched.set_max_batch_size(self.core.config.max_batch_size)
        self.generate_batched.set_batch_wait_timeout_s(self.core.config.batch_wait_timeout_s)

    def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down: close the engine
        core = getattr(self, "core", None)
        if core is not None:
            core.close()

    def __serve_build_asgi_app__(self):
        return build_http_app(self.core, self.generate_batched)

    @serve.batch(
        max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=lambda items: sum(map(len, items))
    )
    async def generate_batched(self, requests: list[list]) -> list[list | Failure]:
        """Requests (their per-image params) → their images or failures, in order."""
        return await asyncio.to_thread(self.core.run_batch, requests)


def build_app(args: dict):
    """Application builder for ``serve run seg_rt.cluster.serving.deployment:build_app model=...`` and ``seg-rt serve``."""
    config = ServeConfig.model_validate(args)
    gpus = config.num_gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": config.num_cpus_per_replica},
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
    }
    parallel = config.parallel("ray")
    if parallel is not None:  # latency mode: one placement group per replica, the ranks after it
        from ..branch import rank_bundle

        options["ray_actor_options"]["num_gpus"] = 0  # the ranks hold the GPUs
        options["placement_group_bundles"] = [{"CPU": config.num_cpus_per_replica}] + [
            rank_bundle(parallel)
        ] * parallel.ranks
        options["placement_group_strategy"] = parallel.strategy
    if config.num_replicas is not None:
        options["num_replicas"] = config.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": max(config.max_replicas, config.min_replicas),
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    return SEGService.options(**options).bind(config.model_dump(mode="json"))


def wait_answering(config: ServeConfig, timeout_s: float = 600.0) -> bool:
    """Until ``GET /v1/health`` answers 200 on the server's port (loopback when bound to all)."""
    import urllib.request

    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = f"http://{host}:{config.port}/v1/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def serve_forever(
    config: ServeConfig,
    *,
    address: str | None = None,
    ray_temp_dir: str | None = None,
    blocking: bool = True,
    ready=None,
    answer_timeout_s: float = 1800.0,
):
    """Start (or join) Ray, start Serve's HTTP proxy on ``config.host:config.port`` and deploy the
    app; ``ready()`` (the CLI's ``serving ... on http://...`` line) is called once the server
    answers ``/v1/health``, never before. A server that does not answer within
    ``answer_timeout_s`` is a ``RuntimeError`` (no ``serving`` line)."""
    from ..jobs.driver import start_ray

    start_ray(address, temp_dir=ray_temp_dir)
    serve.start(http_options={"host": config.host, "port": config.port})
    handle = serve.run(
        build_app(config.model_dump(mode="json")), name="seg-rt", route_prefix="/", blocking=False
    )
    if not wait_answering(config, answer_timeout_s):
        raise RuntimeError(
            f"the server did not answer /v1/health on port {config.port} within {answer_timeout_s:g} s"
        )
    logger.info("seg-rt serving %s on http://%s:%d", config.public_model, config.host, config.port)
    if ready is not None:
        ready()
    if blocking:
        while True:
            time.sleep(3600)
    return handle
