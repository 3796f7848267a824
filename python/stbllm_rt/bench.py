"""`stbllm-bench`: prefill / decode speed, time to first token and memory of a .stb model, llama-bench style.

    stbllm-bench MODEL.stb [-p 128] [-n 128] [-r 5] [--threads T] [--batch B] [--vs OTHER.stb] [--json OUT]
    stbllm-bench --synthetic llama-7b --nm 4:8 ...      random weights of that shape (no download)
    stbllm-bench kernels --shape 4096x4096 --nm 4:8     one GEMV/GEMM against the dense fp32 and fp16 kernels
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SHAPES = {  # name: hidden, intermediate, layers, heads, kv heads, vocab, tied
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000, False),
    "llama-13b": (5120, 13824, 40, 40, 40, 32000, False),
}


# ---- machine facts ------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), 0 when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=0)


def read_bandwidth(threads: int, nbytes: int | None = None) -> float:
    """Bytes/s of summing an array 4x the last-level cache (at least 1 GiB, at most 4 GiB) with `threads` threads
    (numpy releases the GIL): DRAM read bandwidth, the floor to divide by."""
    nbytes = nbytes or min(4 << 30, max(1 << 30, 4 * last_level_cache_bytes()))
    a = np.ones(nbytes // 8, dtype=np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - start))
    return best


def _status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (e.g. VmRSS, VmHWM), in bytes; 0 when unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Restarts the peak-RSS count of this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_rss() -> int:
    return _status_bytes("VmRSS")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- synthetic models ---------------------------------------------------------------------------------------------

def nm_mask_words(rng, rows: int, cols: int, n: int, m: int) -> np.ndarray:
    """Random N:M keep-masks, packed (pack_bits layout): every aligned group of M bits holds exactly N ones."""
    if 64 % m:
        raise ValueError(f"synthetic masks need M dividing 64, got {m}")
    patterns = np.array([p for p in range(1 << m) if bin(p).count("1") == n], dtype=np.uint64)
    words = -(-cols // 64)
    picks = patterns[rng.integers(0, len(patterns), size=(rows, words, 64 // m))]
    shifts = (np.arange(64 // m, dtype=np.uint64) * np.uint64(m))
    return np.bitwise_or.reduce(picks << shifts, axis=2)


def synthetic_model(shape: str, codec: str, nm: tuple[int, int] | None, out: Path, seed: int = 0) -> Path:
    """Writes a random-weight .stb of a known model shape: `codec` sign (optionally N:M) or f16 for the decoder
    linears, f16 embeddings and head. The values are random; the bytes and the work per token are the real ones."""
    from .stbfile import StbWriter

    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    head_dim = hidden // heads
    config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=4096,
                  norm_type="rms", norm_eps=1e-5, hidden_act="silu", mlp_gated=True, position_type="rope",
                  rope_theta=10000.0, sliding_window=None, tie_word_embeddings=tied, attention_bias=False,
                  mlp_bias=False)
    w = StbWriter({"architecture": "llama", "config": config, "tokenizer": {"kind": "none"},
                   "provenance": {"method": f"synthetic {codec}", "source": shape, "nm": list(nm) if nm else None}})
    rng = np.random.default_rng(seed)

    def dense(rows, cols, scale):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float16)

    w.add_f16("token_embd.weight", dense(vocab, hidden, 0.02))
    shapes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv * head_dim, hidden),
              "attn_v": (kv * head_dim, hidden), "attn_o": (hidden, heads * head_dim),
              "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
    for i in range(layers):
        w.add_f32(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_f32(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, (rows, cols) in shapes.items():
            full = f"blk.{i}.{name}.weight"
            if codec == "f16":
                w.add_f16(full, dense(rows, cols, cols ** -0.5))
                continue
            words = -(-cols // 64)
            signs = rng.integers(0, np.iinfo(np.uint64).max, size=(rows, words), dtype=np.uint64, endpoint=True)
            scales = np.full((rows, -(-cols // 128)), cols ** -0.5, np.float16)
            mask = nm_mask_words(rng, rows, cols, *nm) if nm else None
            w.add_sign_block_words(full, cols, signs, scales, mask, 128, nm)
    w.add_f32("output_norm.weight", np.ones(hidden, np.float32))
    if not tied:
        w.add_f16("output.weight", dense(vocab, hidden, 0.02))
    w.write(out)
    return out


def synthetic_path(shape: str, codec: str, nm) -> Path:
    """Cached synthetic files live in the user cache ($STBLLM_CACHE or ~/.cache/stbllm/synthetic)."""
    root = Path(os.environ.get("STBLLM_CACHE") or Path.home() / ".cache" / "stbllm") / "synthetic"
    root.mkdir(parents=True, exist_ok=True)
    tag = f"{shape}-{codec}" + (f"-{nm[0]}of{nm[1]}" if nm else "")
    path = root / f"{tag}.stb"
    if not path.exists():
        print(f"building synthetic model {tag} (cached at {path}) ...", file=sys.stderr)
        synthetic_model(shape, codec, nm, path)
    return path


# ---- model benchmark ----------------------------------------------------------------------------------------------

def bench_model(path, prompt_tokens: int, new_tokens: int, repetitions: int, threads: int | None,
                batch: int, kv_cache: str = "f16") -> dict:
    from . import _core
    from .model import Model

    reset_peak_rss()
    rss_before = current_rss()
    start = time.perf_counter()
    model = Model(path, threads=threads, kv_cache=kv_cache)
    load_seconds = time.perf_counter() - start
    info = model.info()
    vocab = model.config["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, vocab, size=prompt_tokens)] for _ in range(batch)]

    def run(n_new):
        gen = _core.Generator(model._model, prompts, n_new, 0.0, 0, 1.0, 0.0, 1.0, 0, [])
        t0 = time.perf_counter()
        gen.step(1)
        first = time.perf_counter() - t0
        steps = []
        while not gen.done:
            t0 = time.perf_counter()
            gen.step(1)
            steps.append(time.perf_counter() - t0)
        return first, steps

    run(min(new_tokens, 4))  # warm-up: page in the weights, size the caches
    firsts, step_means, all_steps = [], [], []
    for _ in range(repetitions):
        first, steps = run(new_tokens)
        firsts.append(first)
        all_steps += steps
        if steps:
            step_means.append(statistics.mean(steps))
    decode_step = statistics.median(step_means) if step_means else float("nan")
    weight_bytes = info["weight_bytes"]
    kv_bytes = info["kv_cache_bytes_per_token"] * batch * (prompt_tokens + new_tokens)
    peak = peak_rss()
    bits = info.get("bits") or {}
    steps = repetitions * (new_tokens - 1) + (min(new_tokens, 4) - 1) + (repetitions + 1)  # decode + prefill steps
    profile = {op: round(1e3 * seconds / steps, 4) for op, (seconds, _) in model._model.profile().items()}
    return {
        "model": str(path),
        "config": {k: info["config"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "vocab_size")},
        "kernels": info["kernels"],
        "threads": info["threads"],
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repetitions": repetitions,
        "load_seconds": round(load_seconds, 3),
        "ttft_ms": round(1e3 * statistics.median(firsts), 2),
        "prefill_tok_s": round(batch * prompt_tokens / statistics.median(firsts), 1),
        "decode_ms_per_step_mean": round(1e3 * statistics.mean(all_steps), 3) if all_steps else None,
        "decode_ms_per_step_sd": round(1e3 * statistics.stdev(all_steps), 3) if len(all_steps) > 1 else None,
        "decode_tok_s": round(batch / decode_step, 1),
        "file_bytes": info["file_bytes"],
        "weight_bytes": weight_bytes,
        "bits_per_linear_weight": bits.get("linear_bits_per_weight"),
        "file_bits_per_weight": bits.get("file_bits_per_weight"),
        "memory": {"peak_rss": peak, "weights": weight_bytes, "kv_cache": kv_bytes,
                   "scratch_and_runtime": max(0, peak - rss_before - weight_bytes - kv_bytes)},
        "weight_gb_s": round(weight_bytes / decode_step / 1e9, 2),
        "profile_ms_per_step": dict(sorted(profile.items(), key=lambda kv: -kv[1])) or None,
    }


def bench_transformers(path, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """HF transformers fp32 `generate` on the oracle model rebuilt from the same file (the user's baseline)."""
    import torch
    from stbllm_convert.oracle import build_hf_model

    torch.set_num_threads(threads)
    model = build_hf_model(path)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - t0
    return {"engine": f"transformers {__import__('transformers').__version__} fp32 generate",
            "ttft_ms": round(1e3 * prefill, 2), "decode_tok_s": round((new_tokens - 1) / (total - prefill), 1)}


# ---- kernel benchmark ---------------------------------------------------------------------------------------------

def binary_groups_linear(rng, rows: int, cols: int, nm, threads: int, block: int = 128, regions: int = 3):
    """A random stb.binary-groups.v2 matrix shaped like STBLLM's output: 3 regions, 1 column in 16 salient (the
    converted SmolLM2 has 4-10 %), N:M mask. Returns the Linear and the bytes of its planes in the file."""
    from . import _core

    words, blocks = -(-cols // 64), -(-cols // block)
    salient = np.zeros(words * 64, bool)
    salient[rng.choice(cols, max(1, cols // 16), replace=False)] = True
    salient_words = np.packbits(salient, bitorder="little").view(np.uint64)
    mask = nm_mask_words(rng, rows, cols, *nm) if nm else None
    keep = mask if mask is not None else np.uint64(np.iinfo(np.uint64).max)
    signs = rng.integers(0, np.iinfo(np.uint64).max, size=(rows, words), dtype=np.uint64, endpoint=True) & keep
    low, high = (rng.integers(0, np.iinfo(np.uint64).max, size=(rows, words), dtype=np.uint64, endpoint=True)
                 & keep & ~salient_words for _ in range(2))
    labels = np.stack([low, high & ~low])  # labels 0, 1, 2
    residual = rng.integers(0, np.iinfo(np.uint64).max, size=-(-rows * int(salient.sum()) // 64), dtype=np.uint64,
                            endpoint=True)
    params = (rng.random((rows, blocks, 2 * regions + 4)) * 0.02).astype(np.float16).view(np.uint16)
    planes = [signs, labels, salient_words, residual, params] + ([mask] if mask is not None else [])
    lin = _core.Linear("binary-groups", rows, cols, signs=signs, mask=mask, labels=labels, salient=salient_words,
                       residual=residual, params=params, block=block, regions=regions, threads=threads)
    return lin, sum(a.nbytes for a in planes)


def qgroup_linear(rng, rows: int, cols: int, bits: int, threads: int, group: int = 64):
    """A random stb.qgroup.v1 matrix; returns the Linear and the bytes of its components (what it reads)."""
    from . import _core, qgroup

    groups = -(-cols // group)
    codes = qgroup.pack_codes(rng.integers(0, 1 << bits, (rows, cols)).astype(np.uint8), bits)
    scales = (rng.random((rows, groups)) * 0.01).astype(np.float16).view(np.uint16)
    offsets = (rng.standard_normal((rows, groups)) * 0.01).astype(np.float16).view(np.uint16)
    lin = _core.Linear("qgroup", rows, cols, values=codes, scales=scales, offsets=offsets, bits=bits, group=group,
                       threads=threads)
    return lin, codes.nbytes + scales.nbytes + offsets.nbytes


def bench_kernels(rows: int, cols: int, nm, batch: int, threads: int) -> dict:
    from . import _core

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cols), dtype=np.float32)
    words = -(-cols // 64)
    signs = rng.integers(0, np.iinfo(np.uint64).max, size=(rows, words), dtype=np.uint64, endpoint=True)
    scales = np.full((rows, -(-cols // 128)), 0.01, np.float16).view(np.uint16)
    mask = nm_mask_words(rng, rows, cols, *nm) if nm else None
    packed = signs.nbytes + scales.nbytes + (mask.nbytes if mask is not None else 0)
    groups, groups_planes = binary_groups_linear(rng, rows, cols, nm, threads)
    pattern = f" {nm[0]}:{nm[1]}" if nm else ""
    candidates = {
        "binary-groups" + pattern: (groups, groups.weight_bytes or groups_planes),  # the repacked bytes it reads
        "sign-block" + pattern:
            (_core.Linear("sign-block", rows, cols, signs=signs & mask if mask is not None else signs, mask=mask,
                          scales=scales, threads=threads), packed),
        "int8-group": (_core.Linear("int8-group", rows, cols, values=rng.integers(
            -127, 128, size=(rows, words * 64), dtype=np.int8), scales=np.full((rows, words), 0.01, np.float16)
            .view(np.uint16), threads=threads), rows * words * (64 + 2)),
        **{f"qgroup q{bits} g64": qgroup_linear(rng, rows, cols, bits, threads) for bits in (4, 3, 2)},
        "f16": (_core.Linear("f16", rows, cols, values=rng.standard_normal((rows, cols), dtype=np.float32)
                             .astype(np.float16).view(np.uint16), threads=threads), rows * cols * 2),
        "f32": (_core.Linear("f32", rows, cols, values=rng.standard_normal((rows, cols), dtype=np.float32),
                             threads=threads), rows * cols * 4),
    }
    # Rounds interleave the candidates (the machine may be shared: a slow spell then hits all of them), and each
    # candidate keeps its best round.
    best = {name: float("inf") for name in candidates}
    for _ in range(5):
        for name, (lin, _) in candidates.items():
            best[name] = min(best[name], lin.time(x, iters=max(3, int(2e7 // (rows * cols))), repeats=1))
    out = {}
    for name, (lin, nbytes) in candidates.items():
        seconds = best[name]
        out[name] = {"us": round(seconds * 1e6, 2), "weight_bytes": nbytes, "gb_s": round(nbytes / seconds / 1e9, 2),
                     "gops": round(2 * rows * cols * batch / seconds / 1e9, 2), "kernels": lin.kernels}
    return out


# ---- command line -------------------------------------------------------------------------------------------------

def _nm(text):
    if text is None:
        return None
    n, m = (int(v) for v in text.split(":"))
    if not 1 <= n <= m or 64 % m:
        raise argparse.ArgumentTypeError(f"bad N:M {text!r} (need 1 <= N <= M, M dividing 64)")
    return n, m


def _machine(threads: int) -> dict:
    from . import _core

    probe = _core.Linear("f32", 1, 1, values=np.ones((1, 1), np.float32))
    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "threads": threads,
            "last_level_cache_mib": last_level_cache_bytes() >> 20,
            "kernels": probe.kernels, "read_gb_s": round(read_bandwidth(threads) / 1e9, 1),
            "python": platform.python_version(),
            "load_average_1min": round(os.getloadavg()[0], 2)}  # other work on the machine skews the numbers


def _header(args, threads: int) -> dict:
    from . import __version__

    return {"tool": "stbllm-bench", "version": __version__, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["stbllm-bench"] + sys.argv[1:]), "machine": _machine(threads)}


def _print_model(r: dict, machine: dict) -> None:
    mem = r["memory"]
    print(f"{r['model']}  [{r['kernels']}, {r['threads']} threads, batch {r['batch']}]")
    print(f"  prefill  {r['prefill_tok_s']:>9.1f} tok/s   (pp{r['prompt_tokens']}, time to first token "
          f"{r['ttft_ms']:.1f} ms)")
    print(f"  decode   {r['decode_tok_s']:>9.1f} tok/s   (tg{r['new_tokens']}, {r['decode_ms_per_step_mean']} ± "
          f"{r['decode_ms_per_step_sd']} ms/step over {r['repetitions']} runs)")
    share = 100 * r["weight_gb_s"] / machine["read_gb_s"]
    print(f"  weights  {r['weight_bytes'] / 2**20:9.1f} MiB read per step = {r['weight_gb_s']:.1f} GB/s "
          f"({share:.0f} % of the measured {machine['read_gb_s']} GB/s read bandwidth)")
    print(f"  bits     {r['bits_per_linear_weight']} per linear weight, {r['file_bits_per_weight']} per weight in "
          f"the file ({r['file_bytes'] / 2**20:.1f} MiB)")
    print(f"  memory   peak RSS {mem['peak_rss'] / 2**20:.1f} MiB = weights {mem['weights'] / 2**20:.1f} + KV "
          f"{mem['kv_cache'] / 2**20:.1f} + scratch/runtime {mem['scratch_and_runtime'] / 2**20:.1f}")
    if r["profile_ms_per_step"]:
        print("  profile  ms per step (prefill included): " +
              ", ".join(f"{op} {ms:.3f}" for op, ms in r["profile_ms_per_step"].items()))


def kernels_main(argv) -> int:
    p = argparse.ArgumentParser(prog="stbllm-bench kernels",
                                description="Time one matmul: the binary-groups (STBLLM / BiLLM), sign-block and "
                                            "qgroup (q4/q3/q2, group 64) kernels vs the dense fp16 and fp32 kernels "
                                            "of the same engine, on random data.")
    p.add_argument("--shape", default="4096x4096", help="ROWSxCOLS (outputs x inputs), default 4096x4096")
    p.add_argument("--nm", type=_nm, default=None, help="N:M keep-mask of the binary weights, e.g. 4:8")
    p.add_argument("--batch", type=int, default=1, help="activation rows (1 = GEMV)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    threads = args.threads or len(os.sched_getaffinity(0))
    result = dict(_header(args, threads), kind="kernels", shape=[rows, cols], batch=args.batch,
                  nm=list(args.nm) if args.nm else None, results=bench_kernels(rows, cols, args.nm, args.batch,
                                                                                threads))
    base = result["results"]["f32"]["us"]
    for name, r in result["results"].items():
        print(f"{name:18s} {r['us']:>10.1f} us  {r['gb_s']:>7.2f} GB/s of weights  {r['gops']:>8.1f} GOP/s  "
              f"{base / r['us']:>5.1f}x vs f32   [{r['kernels']}]")
    print(f"machine read bandwidth: {result['machine']['read_gb_s']} GB/s ({threads} threads)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "kernels":
        return kernels_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="stbllm-bench", description="Measure prefill and decode speed, time to first token and memory of a "
                                         ".stb model (greedy decoding, random prompt tokens, warm-up run first). "
                                         "`stbllm-bench kernels --help` times single matmuls.")
    p.add_argument("model", nargs="?", help="a .stb file")
    p.add_argument("--synthetic", choices=sorted(SHAPES), help="random weights of this shape instead of a file")
    p.add_argument("--codec", choices=["sign", "f16"], default="sign", help="with --synthetic (default sign)")
    p.add_argument("--nm", type=_nm, default=None, help="with --synthetic --codec sign: N:M keep-mask, e.g. 4:8")
    p.add_argument("-p", "--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("-n", "--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed runs after the warm-up (default 5)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--kv-cache", choices=["f16", "f32"], default="f16",
                   help="KV cache element type: f16 (default, half the memory) or f32 (exact)")
    p.add_argument("--vs", help="a second .stb to run in turn; prints the speed ratios")
    p.add_argument("--vs-transformers", action="store_true",
                   help="also time HF transformers fp32 generate on the model rebuilt from the file")
    p.add_argument("--profile", action="store_true",
                   help="time every runtime operation (matmuls by weight, attention, norms...) and print the split")
    p.add_argument("--json", type=Path, help="write all results as JSON here (e.g. benchmarks/results/x.json)")
    args = p.parse_args(argv)
    if args.profile:
        os.environ["STBLLM_PROFILE"] = "1"  # read when a model loads
    if bool(args.model) == bool(args.synthetic):
        p.error("give a .stb file or --synthetic SHAPE (one of them)")
    if min(args.prompt_tokens, args.new_tokens, args.repetitions, args.batch) < 1:
        p.error("-p, -n, -r and --batch must be >= 1")
    threads = args.threads or len(os.sched_getaffinity(0))
    try:
        path = args.model or synthetic_path(args.synthetic, args.codec, args.nm if args.codec == "sign" else None)
        result = dict(_header(args, threads), kind="model")
        machine = result["machine"]
        runs = [bench_model(path, args.prompt_tokens, args.new_tokens, args.repetitions, threads, args.batch,
                            args.kv_cache)]
        if args.vs:
            runs.append(bench_model(args.vs, args.prompt_tokens, args.new_tokens, args.repetitions, threads,
                                    args.batch, args.kv_cache))
        for r in runs:
            _print_model(r, machine)
        result["runs"] = runs
        if args.vs:
            a, b = runs
            result["ratios"] = {k: round(a[k] / b[k], 2) for k in ("prefill_tok_s", "decode_tok_s")}
            result["ratios"]["weight_bytes"] = round(a["weight_bytes"] / b["weight_bytes"], 3)
            print(f"ratio first/second: prefill {result['ratios']['prefill_tok_s']}x, decode "
                  f"{result['ratios']['decode_tok_s']}x, weight bytes {result['ratios']['weight_bytes']}x")
        if args.vs_transformers:
            hf = bench_transformers(path, args.prompt_tokens, args.new_tokens, threads)
            result["transformers"] = hf
            print(f"{hf['engine']}: decode {hf['decode_tok_s']} tok/s, time to first token {hf['ttft_ms']} ms "
                  f"-> stbllm is {runs[0]['decode_tok_s'] / hf['decode_tok_s']:.1f}x faster at decode")
    except (OSError, ValueError, RuntimeError) as e:
        print(f"stbllm-bench: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
