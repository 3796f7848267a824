"""`stbllm-generate`: prompt in, text out, streamed to the terminal."""
from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stbllm-generate",
        description="Generate text with a packed .stb model. The text streams to stdout; timing goes to stderr.",
        epilog="example: stbllm-generate smollm2-fp16.stb \"The capital of France is\" -n 32 --temperature 0")
    p.add_argument("model", help="path to a .stb file (made by stbllm-convert)")
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens below min-p x the top probability, 0 = off (default 0.05)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed; the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--kv-cache", choices=["f16", "f32"], default="f16",
                   help="KV cache element type: f16 (default, half the memory) or f32 (exact)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--no-stream", action="store_true", help="print the text only when it is complete")
    return p


def generate_main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import FormatError, Model

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        model = Model(args.model, threads=args.threads, kv_cache=args.kv_cache)
        if args.chat:
            prompt = model.apply_chat_template([{"role": "user", "content": prompt}])
        start = time.perf_counter()
        n_tokens = 0
        kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                      seed=args.seed, stop=args.stop)
        if args.no_stream:
            text = model.generate(prompt, **kwargs)
            sys.stdout.write(text)
        else:
            for piece in model.generate(prompt, stream=True, **kwargs):
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        elapsed = time.perf_counter() - start
        n_tokens = model.last_generated_tokens
        print(f"[{n_tokens} tokens in {elapsed:.2f} s, {n_tokens / max(elapsed, 1e-9):.1f} tok/s incl. prompt]",
              file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (FormatError, OSError, RuntimeError, ValueError) as e:
        print(f"stbllm-generate: error: {e}", file=sys.stderr)
        return 2
    return 0
