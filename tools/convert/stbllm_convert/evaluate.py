"""`stbllm-eval`: perplexity of a .stb model under the project's quality protocol (DESIGN.md "Quality protocol").

The text (default: the Wikipedia sample wiki.utf8) loses its `<doc ...>` / `</doc>` lines, is joined with "\\n" and
tokenized once without BOS; it is cut into non-overlapping windows of --seqlen tokens (the tail is dropped), the first
--max-windows of them are evaluated, and PPL = exp(mean NLL over the seqlen-1 predicted tokens of each window).
Backends: `torch` (the transformers oracle rebuilt from the file's dequantized weights) or `cpu` (the C++ runtime).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

PROG = "stbllm-eval"


def token_windows(tokenizer, text_path, seqlen: int, max_windows: int | None):
    """Non-overlapping windows [k, seqlen] (int64) of the text tokenized once without special tokens."""
    from .calibrate import read_text

    ids = np.asarray(tokenizer.encode(read_text(text_path), add_special_tokens=False), dtype=np.int64)
    count = len(ids) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"{text_path} has {len(ids)} tokens, fewer than one window of {seqlen}")
    return ids[:count * seqlen].reshape(count, seqlen)


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (float64 log-softmax)."""
    x = logits[:-1].astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    return float((log_z - x[np.arange(len(x)), ids[1:]]).sum())


def perplexity(model_path, text=None, seqlen: int = 2048, max_windows: int | None = None, backend: str = "torch",
               threads: int | None = None, progress: bool | None = None) -> dict:
    """Evaluates one .stb file; returns the JSON-able result (ppl, nll, windows, tokens, seconds, ...)."""
    from stbllm_rt import Model
    from stbllm_rt.stbfile import StbReader
    from stbllm_rt.tokenizer import Tokenizer

    from .convert import _progress

    start = time.monotonic()
    if text is None:
        from .assets import text_sample_paths
        text = text_sample_paths()["wiki"]
    reader = StbReader(model_path)
    spec = reader.metadata.get("tokenizer") or {"kind": "none"}
    tokenizer = Tokenizer(spec, reader.blob(spec["blob"]) if spec.get("kind", "none") != "none" else None)
    windows = token_windows(tokenizer, text, seqlen, max_windows)
    if backend == "torch":
        import torch

        from .oracle import build_hf_model
        if threads:
            torch.set_num_threads(threads)
        hf = build_hf_model(model_path)

        def logits(ids):
            with torch.no_grad():
                return hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    elif backend == "cpu":
        runtime = Model(model_path, threads=threads)
        logits = runtime.logits
    else:
        raise ValueError(f"unknown backend {backend!r} (torch or cpu)")
    total = 0.0
    for ids in _progress(windows, progress, desc="windows", unit="window"):
        total += window_nll(logits(ids), ids)
    predicted = len(windows) * (seqlen - 1)
    nll = total / predicted
    provenance = reader.metadata.get("provenance", {})
    return {"model": str(model_path), "method": provenance.get("method"), "nm": provenance.get("nm"),
            "text": Path(text).name, "backend": backend, "seqlen": seqlen, "windows": len(windows),
            "predicted_tokens": predicted, "nll": round(nll, 6), "ppl": round(math.exp(nll), 4),
            "linear_bits_per_weight": (provenance.get("bits") or {}).get("linear_bits_per_weight"),
            "paper_bits_per_weight": (provenance.get("bits") or {}).get("paper_bits_per_weight"),
            "seconds": round(time.monotonic() - start, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="example: stbllm-eval smollm2.fp16.stb --seqlen 2048 --max-windows 16")
    p.add_argument("model", metavar="MODEL.stb")
    p.add_argument("--text", metavar="FILE", default=None, help="text to evaluate (default: the Wikipedia sample)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--backend", choices=["torch", "cpu"], default="torch",
                   help="torch: the transformers oracle on the dequantized weights; cpu: the C++ runtime")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the result as JSON to OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.seqlen < 2 or (args.max_windows is not None and args.max_windows < 1):
        p.error("--seqlen must be >= 2 and --max-windows >= 1")
    try:
        result = perplexity(args.model, args.text, args.seqlen, args.max_windows, args.backend, args.threads,
                            progress=False if args.quiet else None)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{result['model']}: PPL {result['ppl']:.4f} over {result['windows']} windows x {result['seqlen']} tokens "
          f"({result['predicted_tokens']} predicted) of {result['text']}, {result['backend']} backend, "
          f"{result['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
