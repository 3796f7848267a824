"""Where a batched decode step goes: runs stb::BatchEngine (no HTTP) at several batch sizes with the profiling
backend and prints ms per step, per operation, and the aggregate decode tok/s.

    python benchmarks/batch_profile.py MODEL.stb [--batches 1 8 16 32] [--threads 2] [--steps 10] [--json OUT]

Greedy sampling, one prompt for every request; `--no-profile` times the same steps without the profiling backend
(its per-call timers cost a little at small batch)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPT = "The history of the printing press begins"


def profile_steps(model_path: str, batches: list[int], threads: int, steps: int, profile: bool,
                  kv_cache: str = "f16") -> list[dict]:
    if profile:
        os.environ["STBLLM_PROFILE"] = "1"  # read when the model is constructed
    import stbllm_rt
    from stbllm_rt import _core

    model = stbllm_rt.Model(model_path, threads=threads, kv_cache=kv_cache)
    prompt = model.tokenize(PROMPT)
    out = []
    for n in batches:
        engine = _core.BatchEngine(model._model, n)
        for i in range(n):
            engine.add(i, prompt, 4 + steps + 1, 0.0, 0, 1.0, 0.0, 1.0, i, [])
        for _ in range(4):  # prefill and warm-up steps
            engine.step()
        before = model._model.profile() if profile else {}
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        ms_per_step = (time.perf_counter() - start) * 1e3 / steps
        ops = {}
        if profile:
            after = model._model.profile()
            ops = {op: round((after[op][0] - before.get(op, (0, 0))[0]) * 1e3 / steps, 3) for op in after}
            ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
        out.append({"batch": n, "ms_per_step": round(ms_per_step, 2),
                    "decode_tok_s": round(n * 1e3 / ms_per_step, 1), "ms_per_op": ops})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-profile", action="store_true", help="time the steps without the profiling backend")
    p.add_argument("--kv-cache", choices=["f16", "f32"], default="f16")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import datetime

    from stbllm_rt.bench import _machine, git_commit

    results = profile_steps(args.model, args.batches, args.threads, args.steps, not args.no_profile, args.kv_cache)
    base = results[0]["decode_tok_s"]
    for r in results:
        print(f"batch {r['batch']:3d}: {r['ms_per_step']:7.2f} ms/step  {r['decode_tok_s']:7.1f} tok/s "
              f"({r['decode_tok_s'] / base:.2f}x batch {results[0]['batch']})")
        for op, ms in r["ms_per_op"].items():
            print(f"    {op:22s} {ms:7.2f} ms")
    if args.json:
        record = {"kind": "batch-profile", "commit": git_commit(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "model": args.model, "threads": args.threads, "steps": args.steps,
                  "profiled": not args.no_profile, "command": " ".join(["python"] + sys.argv),
                  "machine": _machine(args.threads), "results": results}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
