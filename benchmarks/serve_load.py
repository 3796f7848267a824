"""Load benchmark of stbllm-serve on loopback: N concurrent streaming clients against the same requests served one
at a time. Starts the server as a subprocess, runs a bounded number of requests per level (and stops sending new
ones after --max-seconds), and writes a JSON with the machine, commit, date and load average.

    python benchmarks/serve_load.py smol.stb --clients 1 8 32 --json benchmarks/results/serve-load.json

Per level: aggregate completion tokens/s (all tokens / wall time of the phase), p50/p99 time to first token
(request sent -> first streamed text) and inter-token latency (gaps between streamed text chunks), requests
completed / sent, the server's RSS, and the mean sequences per batched step (from /metrics). At the end the largest
level runs once more, to show the server's RSS does not grow once its KV slots have been used. Before the server
starts, the C++ batch engine alone is timed per decode step at each batch size (the ceiling for the server).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from stbllm_rt.bench import cpu_name, git_commit

PROMPTS = [
    "The history of the printing press begins",
    "Here is a short story about a lighthouse keeper:",
    "Explain how rain forms, step by step.",
    "The three most important ideas in economics are",
    "Write a letter to a friend describing your city.",
    "A recipe for a simple tomato soup:",
    "The main differences between cats and dogs are",
    "Once upon a time, in a village by the sea,",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def server_counters(base: str) -> dict:
    out = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(("stbllm_generated_tokens_total ", "stbllm_batch_steps_total ")):
            name, value = line.split()
            out[name] = float(value)
    return out


async def one_request(client: httpx.AsyncClient, prompt: str, seed: int, max_tokens: int, model: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    text_times, tokens, finished = [], 0, False
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"ok": False, "status": response.status_code, "start": start, "end": time.perf_counter()}
        async for line in response.aiter_lines():
            finished |= line == "data: [DONE]"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                text_times.append(time.perf_counter())
    # Done when the stream ends with [DONE]; a completion may be empty text (the model ended at once).
    return {"ok": finished, "start": start, "end": time.perf_counter(), "tokens": tokens,
            "ttft": text_times[0] - start if text_times else None, "gaps": list(np.diff(text_times))}


async def run_phase(base: str, model: str, requests: list, concurrency: int, max_tokens: int,
                    max_seconds: float) -> list[dict]:
    """`concurrency` clients take the next request from `requests` until none is left or time is up."""
    todo = list(requests)
    results = []
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)

    async def client_loop(client):
        while todo and time.perf_counter() < deadline:
            prompt, seed = todo.pop(0)
            results.append(await one_request(client, prompt, seed, max_tokens, model))

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return results


def summarize(results: list[dict], sent_limit: int) -> dict:
    done = [r for r in results if r["ok"]]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    gaps = [g for r in done for g in r["gaps"]]
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731
    return {"requests_planned": sent_limit, "requests_sent": len(results), "requests_completed": len(done),
            "failed_status": sorted({r.get("status") for r in results if not r["ok"]} - {None}),
            "completion_tokens": tokens, "wall_s": round(wall, 3), "aggregate_tok_s": round(tokens / wall, 1),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(gaps, 50), "itl_ms_p99": pct(gaps, 99)}


def engine_step_times(model_path: str, threads: int, batches: list[int], steps: int = 10) -> dict:
    """ms per decode step of the C++ batch engine alone (no HTTP, no Python per token) at each batch size: the
    ceiling of what batching can give the server on this machine."""
    import stbllm_rt
    from stbllm_rt import _core

    model = stbllm_rt.Model(model_path, threads=threads)
    prompt = model.tokenize(PROMPTS[0])
    out = {}
    for batch in batches:
        engine = _core.BatchEngine(model._model, batch)
        for i in range(batch):
            engine.add(i, prompt, steps + 8, 0.8, 0, 1.0, 0.0, 1.0, i, [])
        for _ in range(4):  # prefill and warm-up
            engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        ms = (time.perf_counter() - start) / steps * 1000
        out[str(batch)] = {"ms_per_step": round(ms, 2), "tok_s": round(batch * 1000 / ms, 1)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help=".stb file to serve")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=120.0, help="per phase: no new requests after this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    engine_steps = engine_step_times(args.model, args.threads, sorted(set(args.clients)))
    print("engine alone:", json.dumps(engine_steps), flush=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    model_name = "bench"
    server = subprocess.Popen([sys.executable, "-m", "stbllm_rt.serve.cli", args.model, "--port", str(port),
                               "--threads", str(args.threads), "--max-batch", str(args.max_batch),
                               "--max-queue", "256", "--model-name", model_name, "--log-level", "warning"])
    load_before = os.getloadavg()
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        asyncio.run(run_phase(base, model_name, [(PROMPTS[0], 0)], 1, 8, 60))  # warm-up
        rss = {"after_warmup": rss_bytes(server.pid)}
        levels = []
        for clients in args.clients:
            requests = [(PROMPTS[i % len(PROMPTS)], i) for i in range(clients * args.requests_per_client)]
            level = {"clients": clients}
            phases = [("one_at_a_time", 1)] + ([("concurrent", clients)] if clients > 1 else [])
            for name, concurrency in phases:
                before = server_counters(base)
                results = asyncio.run(run_phase(base, model_name, requests, concurrency, args.max_tokens,
                                                args.max_seconds))
                after = server_counters(base)
                summary = summarize(results, len(requests))
                steps = after["stbllm_batch_steps_total"] - before["stbllm_batch_steps_total"]
                generated = after["stbllm_generated_tokens_total"] - before["stbllm_generated_tokens_total"]
                summary["mean_sequences_per_step"] = round(generated / steps, 2) if steps else None
                summary["server_rss_bytes"] = rss_bytes(server.pid)
                level[name] = summary
                print(f"clients {clients:3d} {name:14s} {summary['aggregate_tok_s']:7.1f} tok/s  "
                      f"TTFT p50 {summary['ttft_ms_p50']} ms p99 {summary['ttft_ms_p99']} ms  "
                      f"ITL p50 {summary['itl_ms_p50']} ms p99 {summary['itl_ms_p99']} ms  "
                      f"{summary['requests_completed']}/{summary['requests_planned']} done", flush=True)
            if "concurrent" in level:
                level["speedup_vs_one_at_a_time"] = round(level["concurrent"]["aggregate_tok_s"] /
                                                          level["one_at_a_time"]["aggregate_tok_s"], 2)
            levels.append(level)
        rss["after_levels"] = rss_bytes(server.pid)
        # The largest level once more: its KV slots were freed and are reused, so RSS must not grow again.
        largest = max(args.clients)
        repeat = [(PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(largest * args.requests_per_client)]
        rerun = summarize(asyncio.run(run_phase(base, model_name, repeat, largest, args.max_tokens,
                                                args.max_seconds)), len(repeat))
        rss["after_repeating_the_largest_level"] = rss_bytes(server.pid)
        rss["repeat_requests_completed"] = f"{rerun['requests_completed']}/{rerun['requests_planned']}"
    finally:
        server.terminate()
        server.wait(timeout=60)

    single = next((lv["one_at_a_time"]["aggregate_tok_s"] for lv in levels if lv["clients"] == 1), None)
    report = {
        "tool": "benchmarks/serve_load.py",
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    # The machine is shared: other jobs running at the same time lower every number here.
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "server": {"model": Path(args.model).name, "threads": args.threads, "max_batch": args.max_batch,
                   "max_tokens": args.max_tokens, "temperature": 0.8, "client": "httpx streaming, same machine"},
        "engine_alone_decode": engine_steps,
        "levels": levels,
        "aggregate_vs_one_client": {str(lv["clients"]): round(lv.get("concurrent", lv["one_at_a_time"])
                                                              ["aggregate_tok_s"] / single, 2)
                                    for lv in levels} if single else None,
        "server_rss_bytes": rss,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["aggregate_vs_one_client"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
