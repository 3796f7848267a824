"""`stbllm-serve MODEL.stb`: the OpenAI-compatible server (uvicorn), or the same app on Ray Serve (--ray)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .app import ServerSettings, create_app


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stbllm-serve", description="OpenAI-compatible server for a .stb model "
                                "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)")
    p.add_argument("model", help="the .stb file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="compute device (only cpu for now)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per model (default: all cores)")
    p.add_argument("--kv-cache", choices=["f16", "f32"], default="f16",
                   help="KV cache element type: f16 (default, half the memory) or f32 (exact)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (each holds a KV cache)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--api-key", default=os.environ.get("STBLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $STBLLM_API_KEY, else none)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the file name)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (pip install 'stbllm[serve]')")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, each loading the model once")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not os.path.isfile(args.model):
        print(f"stbllm-serve: no such model file: {args.model}", file=sys.stderr)
        return 2
    for name in ("max_batch", "replicas"):
        if getattr(args, name) < 1:
            print(f"stbllm-serve: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.max_queue < 0 or args.timeout <= 0:
        print("stbllm-serve: need --max-queue >= 0 and --timeout > 0", file=sys.stderr)
        return 2
    settings = ServerSettings(model_path=args.model, model_name=args.model_name, threads=args.threads,
                              kv_cache=args.kv_cache,
                              max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                              timeout=args.timeout)
    if args.ray:
        if importlib.util.find_spec("ray") is None:
            print("stbllm-serve: --ray needs Ray Serve: pip install 'stbllm[serve]'", file=sys.stderr)
            return 2
        from .ray_app import run

        run(settings, args.replicas, args.host, args.port)
        return 0
    import uvicorn

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
