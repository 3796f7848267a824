"""`stbllm-eval`: perplexity of a .stb model (or a .gguf file) under the project's quality protocol (DESIGN.md
"Quality protocol").

The text (default: the Wikipedia sample wiki.utf8) loses its `<doc ...>` / `</doc>` lines, is joined with "\\n" and
tokenized once without BOS; it is cut into non-overlapping windows of --seqlen tokens (the tail is dropped), the first
--max-windows of them are evaluated, and PPL = exp(mean NLL over the seqlen-1 predicted tokens of each window).
Backends: `torch` (the transformers oracle rebuilt from the file's dequantized weights) or `cpu` (the C++ runtime).
A .gguf file (e.g. a llama.cpp quantization, as a comparison row) runs on `torch` only: transformers dequantizes
its weights into the same model class and config the oracle of a .stb converted from it would have, and its
tokenizer is read the way the converter embeds it, so the windows are the same tokens.
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


def _model_and_tokenizer(model_path, backend: str, threads: int | None):
    """(logits function of a window, tokenizer, facts for the result) for a .stb or a .gguf file."""
    from stbllm_rt import Model
    from stbllm_rt.stbfile import StbReader
    from stbllm_rt.tokenizer import Tokenizer

    if backend not in ("torch", "cpu"):
        raise ValueError(f"unknown backend {backend!r} (torch or cpu)")
    if backend == "torch" and threads:
        import torch
        torch.set_num_threads(threads)
    if is_gguf(model_path):
        from .gguf_tools import gguf_bits
        from .oracle import build_hf_model_from_gguf

        if backend != "torch":
            raise ValueError(f"{model_path}: a .gguf file is evaluated with the torch backend (its dequantized "
                             "weights in transformers), not with the C++ runtime")
        bits = gguf_bits(model_path)
        hf, spec, blob = build_hf_model_from_gguf(model_path)
        facts = {"method": "gguf " + "+".join(bits["types"]), "nm": None,
                 "linear_bits_per_weight": bits["linear_bits_per_weight"], "paper_bits_per_weight": None}
        return _torch_logits(hf), Tokenizer(spec, blob), facts
    reader = StbReader(model_path)
    spec = reader.metadata.get("tokenizer") or {"kind": "none"}
    tokenizer = Tokenizer(spec, reader.blob(spec["blob"]) if spec.get("kind", "none") != "none" else None)
    provenance = reader.metadata.get("provenance", {})
    bits = provenance.get("bits") or {}
    facts = {"method": provenance.get("method"), "nm": provenance.get("nm"),
             "linear_bits_per_weight": bits.get("linear_bits_per_weight"),
             "paper_bits_per_weight": bits.get("paper_bits_per_weight")}
    if backend == "torch":
        from .oracle import build_hf_model
        return _torch_logits(build_hf_model(model_path)), tokenizer, facts
    # float32 keys and values: the protocol measures the weights, and its numbers stay comparable across releases
    return Model(model_path, threads=threads, kv_cache="f32").logits, tokenizer, facts


def _torch_logits(hf):
    import torch

    def logits(ids):
        with torch.no_grad():
            return hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    return logits


def is_gguf(model_path) -> bool:
    return Path(model_path).suffix.lower() == ".gguf"


def perplexity(model_path, text=None, seqlen: int = 2048, max_windows: int | None = None, backend: str = "torch",
               threads: int | None = None, progress: bool | None = None) -> dict:
    """Evaluates one .stb file (either backend) or .gguf file (torch: its weights dequantized by transformers);
    returns the JSON-able result (ppl, nll, windows, tokens, seconds, ...)."""
    from .convert import _progress

    start = time.monotonic()
    if text is None:
        from .assets import text_sample_paths
        text = text_sample_paths()["wiki"]
    logits, tokenizer, facts = _model_and_tokenizer(model_path, backend, threads)
    windows = token_windows(tokenizer, text, seqlen, max_windows)
    total = 0.0
    for ids in _progress(windows, progress, desc="windows", unit="window"):
        total += window_nll(logits(ids), ids)
    predicted = len(windows) * (seqlen - 1)
    nll = total / predicted
    return {"model": str(model_path), "method": facts["method"], "nm": facts["nm"],
            "text": Path(text).name, "backend": backend, "seqlen": seqlen, "windows": len(windows),
            "predicted_tokens": predicted, "nll": round(nll, 6), "ppl": round(math.exp(nll), 4),
            "linear_bits_per_weight": facts["linear_bits_per_weight"],
            "paper_bits_per_weight": facts["paper_bits_per_weight"],
            "seconds": round(time.monotonic() - start, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="example: stbllm-eval smollm2.fp16.stb (the protocol: 16 windows of 2048 tokens)")
    p.add_argument("model", metavar="MODEL", help="a .stb file, or a .gguf file (torch backend: evaluated with its "
                                                  "weights dequantized by transformers, for comparison rows)")
    p.add_argument("--text", metavar="FILE", default=None, help="text to evaluate (default: the Wikipedia sample)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=int, default=16,
                   help="evaluate only the first K windows (default 16: the DESIGN protocol; 0 = every window of "
                        "the text)")
    p.add_argument("--backend", choices=["torch", "cpu"], default="torch",
                   help="torch: the transformers oracle on the dequantized weights; cpu: the C++ runtime")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the result as JSON to OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from .errors import ConvertError
    if args.seqlen < 2 or args.max_windows < 0:
        p.error("--seqlen must be >= 2 and --max-windows >= 0")
    try:
        result = perplexity(args.model, args.text, args.seqlen, args.max_windows or None, args.backend, args.threads,
                            progress=False if args.quiet else None)
    except (OSError, ValueError, RuntimeError, ConvertError) as e:
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
