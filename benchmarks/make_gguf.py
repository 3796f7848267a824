"""A GGUF reference row for stbllm-pareto: a GGUF file quantized again with the `gguf` package.

    python benchmarks/make_gguf.py smollm2-135m smollm2-q4_0.gguf --type q4_0 --table-type q8_0

The decoder's projection weights are dequantized and quantized to --type (round to nearest, no importance matrix),
the token embedding / LM head to --table-type, everything else (norms, metadata, tokenizer) is copied. llama.cpp
stores a tied SmolLM2 table as Q8_0 in its Q4_0 file (576 columns rule out its k-quants), hence the default.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from stbllm_convert.assets import resolve_named_model
    from stbllm_convert.errors import ConvertError
    from stbllm_convert.gguf_tools import quant_type, requantize_gguf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a .gguf file or smollm2-135m")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--type", default="q4_0", help="type of the decoder projection weights (default q4_0)")
    p.add_argument("--table-type", default="q8_0", help="type of the token embedding and LM head (default q8_0)")
    args = p.parse_args(argv)
    try:
        bits = requantize_gguf(resolve_named_model(args.source) or Path(args.source), args.out,
                               quant_type(args.type), quant_type(args.table_type))
    except ConvertError as e:
        print(f"make_gguf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {bits['linear_bits_per_weight']} bits per linear weight, "
          f"{bits['file_bits_per_weight']} per weight of the whole file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
