"""The same OpenAI app as a Ray Serve deployment: Ray's proxy routes (and, with an autoscaling config, scales)
requests over replicas; each replica is one process that loads the model once, in the app's startup.

From the command line: `stbllm-serve MODEL.stb --ray --replicas N`. From a config file: `serve run serve.yaml`
with `import_path: stbllm_rt.serve.ray_app:build` (see docs/serving.md). Needs `pip install "stbllm[serve]"`.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import fields

from .app import ServerSettings, create_app

DEPLOYMENT_NAME = "stbllm"


def deployment(settings: ServerSettings, replicas: int | None = 1, autoscaling_config: dict | None = None):
    """A bound Ray Serve application serving `settings` on `replicas` replicas (or autoscaled)."""
    from ray import serve

    ingress = serve.ingress(create_app(settings))()
    options = dict(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": settings.threads or 1},
                   # Let every replica's own queue (429 when full) decide, rather than Ray's default of 5.
                   max_ongoing_requests=settings.max_batch + settings.max_queue)
    if autoscaling_config:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas
    return serve.deployment(ingress, **options).bind()


def build(args: dict):
    """Application builder for `serve run` / serve.yaml: `args` holds ServerSettings fields ("model_path" or
    "model", "threads", "max_batch", ...) and optionally "replicas" or "autoscaling_config"."""
    args = dict(args)
    if "model" in args:
        args["model_path"] = args.pop("model")
    replicas = args.pop("replicas", 1)
    autoscaling_config = args.pop("autoscaling_config", None)
    known = {f.name for f in fields(ServerSettings)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown stbllm-serve argument(s) {unknown}; known: {sorted(known)}")
    return deployment(ServerSettings(**args), int(replicas), autoscaling_config)


def run(settings: ServerSettings, replicas: int, host: str, port: int) -> None:
    """Serves on a Ray cluster (the one RAY_ADDRESS names, else a new local one) until interrupted."""
    import ray
    from ray import serve

    # SIGTERM (kill, a service manager) unwinds like Ctrl-C, so a local Ray instance started here goes down too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(settings, replicas), name=DEPLOYMENT_NAME, route_prefix="/", blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()
