"""Soak test of the runtime (a benchmark, not a unit test; bounded by --calls): thousands of generate calls with
random sampling parameters, batch sizes, streaming, and prompt lengths up to the model's context limit, recording
the process RSS. A leak shows as RSS that keeps growing after the warm-up; the JSON records the samples and the
trend (docs/security.md).

    python benchmarks/soak.py [MODEL.stb] [--context 256] [--calls 2000] [--threads 2] [--json OUT]

MODEL defaults to the synthetic SmolLM2-135M-shaped file with sign weights (stbllm-bench --synthetic). A
long context makes every call slow on a small machine, so --context rewrites a copy of the file's header with that
context length: prompts then reach the real limit of the model that runs (the longest ones are refused).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stbllm_rt import Model, StbReader
from stbllm_rt import bench
from stbllm_rt.stbfile import FIXED_HEADER_SIZE, _align, fixed_header

WARM_UP = 200  # calls before the RSS trend is measured (caches, allocator arenas and KV slots reach steady size)


def with_context(path: Path, context: int, out: Path) -> Path:
    """A copy of `path` whose config says max_position_embeddings = context (the weights are unchanged)."""
    reader = StbReader(path)
    header = {"metadata": reader.metadata, "tensors": {n: reader.tensor_info(n) for n in reader.tensor_names()}}
    header["metadata"]["config"]["max_position_embeddings"] = context
    header_json = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    old_data_offset = _align(FIXED_HEADER_SIZE + len(reader._file.json))
    data_offset = _align(FIXED_HEADER_SIZE + len(header_json))
    data_size = reader.file_size - old_data_offset
    with open(path, "rb") as src, open(out, "wb") as dst:
        dst.write(fixed_header(reader.required_features, header_json, data_offset + data_size))
        dst.write(header_json + b"\0" * (data_offset - FIXED_HEADER_SIZE - len(header_json)))
        src.seek(old_data_offset)
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    return out


def random_call(model: Model, rng: random.Random, context: int, vocab: int) -> int:
    """One generate call with random parameters; returns the tokens it produced. A prompt as long as the context is
    refused with ValueError (checked), anything else must succeed."""
    batch = rng.choice([1, 1, 1, 2, 3])
    too_long = rng.random() < 0.02
    prompts = [[rng.randrange(vocab) for _ in range(context if too_long else rng.randint(1, context - 1))]
               for _ in range(batch)]
    params = dict(max_new_tokens=rng.randint(0, 32), temperature=0.0 if rng.random() < 0.2 else rng.uniform(0.1, 1.5),
                  top_k=rng.choice([0, 1, 5, 40, 200]), top_p=rng.uniform(0.5, 1.0), min_p=rng.uniform(0.0, 0.2),
                  repetition_penalty=rng.choice([1.0, 1.1, 1.3]), seed=rng.randrange(2 ** 32),
                  stop_token_ids=[rng.randrange(vocab) for _ in range(rng.randint(0, 3))])
    stream = rng.random() < 0.3
    try:
        out = model.generate(prompts if batch > 1 else prompts[0], stream=stream, **params)
        out = list(out) if stream else out
    except ValueError as e:
        if not too_long or "context" not in str(e):
            raise
        return 0
    assert not too_long, "a prompt as long as the context was accepted"
    return model.last_generated_tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="a .stb file (default: synthetic smollm2-135m, sign)")
    p.add_argument("--context", type=int, default=256, help="context length of the soaked copy (default 256)")
    p.add_argument("--calls", type=int, default=2000, help="generate calls (default 2000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50, help="record RSS every N calls (default 50)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.calls <= WARM_UP:
        p.error(f"--calls must exceed the {WARM_UP} warm-up calls")
    source = Path(args.model) if args.model else bench.synthetic_path("smollm2-135m", "sign", None)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = with_context(source, args.context, Path(tmp) / "soak.stb")
        model = Model(path, threads=args.threads)
        vocab = model.config["vocab_size"]
        samples, tokens, start = [], 0, time.monotonic()
        for call in range(1, args.calls + 1):
            tokens += random_call(model, rng, args.context, vocab)
            if call % args.every == 0:
                samples.append({"call": call, "seconds": round(time.monotonic() - start, 1),
                                "rss_mib": round(bench.current_rss() / 2 ** 20, 1), "tokens": tokens})
                print(f"{call:6d} calls  {samples[-1]['seconds']:8.1f} s  RSS {samples[-1]['rss_mib']:8.1f} MiB",
                      file=sys.stderr)
        model.close()
    steady = [s for s in samples if s["call"] >= WARM_UP]
    slope = np.polyfit([s["call"] for s in steady], [s["rss_mib"] for s in steady], 1)[0] if len(steady) > 1 else 0.0
    result = {
        "model": str(source), "context": args.context, "calls": args.calls, "threads": args.threads,
        "seed": args.seed, "generated_tokens": tokens, "seconds": samples[-1]["seconds"] if samples else None,
        "rss_mib_after_warm_up": steady[0]["rss_mib"] if steady else None,
        "rss_mib_end": samples[-1]["rss_mib"] if samples else None,
        "rss_mib_max": max(s["rss_mib"] for s in samples) if samples else None,
        "rss_trend_mib_per_1000_calls": round(float(slope) * 1000, 3) + 0.0,  # no "-0.0"
        "samples": samples,
        "machine": {"cpu": bench.cpu_name(), "commit": bench.git_commit()},
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
