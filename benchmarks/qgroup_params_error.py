"""8-bit vs fp16 scales and offsets of k-bit groups (stb.qgroup.v1 params_bits 8) on real SmolLM2 layers.

    python benchmarks/qgroup_params_error.py [--specs q3:g64,q4:g32,q4:g128] [--layers 0,15,29]
        [--kinds attn_q,attn_v,ffn_down] [--calib-windows 16] [--eval-windows 8] [--seqlen 512] [--json OUT]

GPTQ (act-order, as the converter runs it) with the Hessian of the full-precision model's inputs on C4 windows; the
error of each result is measured on held-out Wikipedia inputs as tr(E H E^T) / tr(W H W^T), E = W - Q. Variants:
- fp16: fp16 scales and offsets (the default);
- p8-rtn-grid: 8-bit codes under per-row steps from a round-to-nearest fit of W (what the converter does);
- p8-two-pass: steps from a first full GPTQ pass with fp16 params, then a second pass on those steps (the way the
  binary-groups 8-bit params are made).
Also prints the honest bits of each spec at this shape, with fp16 and with 8-bit params.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from layer_error import default_model, input_grams  # this folder's script, beside this one
from stbllm_convert.assets import text_sample_paths
from stbllm_convert.binarize import super_scales
from stbllm_convert.calibrate import LayerRunner, calibration_windows
from stbllm_convert.qgroup_quant import act_order_factor, quantize_gptq, row_grid
from stbllm_convert.recipe import parse_method


def grams(runner, plan, model, windows, wanted: set) -> dict:
    """H = (2/N) sum x x^T of the wanted linears' inputs in the full-precision model."""
    sums, counts = input_grams(runner, plan, model, windows, wanted)
    return {n: (2 * h / counts[n]).float() for n, h in sums.items()}


def relative_error(w, q, h) -> float:
    e, h = (w - q).double(), h.double()
    return float(torch.einsum("ij,jk,ik->", e, h, e) / torch.einsum("ij,jk,ik->", w.double(), h, w.double()))


def variants(w, method, h):
    order, factor = act_order_factor(h)
    run = lambda grid: quantize_gptq(w, factor, method.bits, method.group, h.diagonal(), order, grid).q  # noqa: E731
    first = quantize_gptq(w, factor, method.bits, method.group, h.diagonal(), order)
    return {"fp16": first.q,
            "p8-rtn-grid": run(row_grid(w, method.bits, method.group, h.diagonal())),
            "p8-two-pass": run(super_scales(torch.stack([first.scales, first.offsets], 2)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", default="q3:g64,q4:g32,q4:g128")
    p.add_argument("--layers", default="0,15,29")
    p.add_argument("--kinds", default="attn_q,attn_v,ffn_down")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    arch, config, plan, model, tokenizer = default_model()
    texts = text_sample_paths()
    wanted = {f"blk.{i}.{k}.weight" for i in args.layers.split(",") for k in args.kinds.split(",")}
    runner = LayerRunner(model, arch, config, args.seqlen, "cpu")
    with torch.no_grad():
        calib = grams(runner, plan, model, calibration_windows(tokenizer, [texts["c4"]], args.calib_windows,
                                                               args.seqlen, seed=0)[0], wanted)
        held_out = grams(runner, plan, model, calibration_windows(tokenizer, [texts["wiki"]], args.eval_windows,
                                                                  args.seqlen, seed=0)[0], wanted)
    names = sorted(wanted, key=lambda n: (int(n.split(".")[1]), n))
    rows, totals = [], {}
    start = time.monotonic()
    for spec in args.specs.split(","):
        method = parse_method(spec)
        for name in names:
            hf = next(s.hf_name for layer in plan.layers for s in layer if s.name == name)
            w = model.get_submodule(hf.removesuffix(".weight")).weight.detach().float()
            errors = {k: relative_error(w, q, held_out[name]) for k, q in variants(w, method, calib[name]).items()}
            rows.append({"spec": spec, "tensor": name, **{k: round(v, 6) for k, v in errors.items()}})
            for k, v in errors.items():
                totals.setdefault(spec, {}).setdefault(k, []).append(v)
            print(f"{spec:9} {name:24} " + "  ".join(f"{k} {v:.5f}" for k, v in errors.items()), flush=True)
    summary = {}
    for spec, by in totals.items():
        mean = {k: sum(v) / len(v) for k, v in by.items()}
        # q4:g32 with fp16 params reproduces the Q4_1 source exactly (error 0): no ratio then
        ratios = {f"{k}/fp16": round(mean[k] / mean["fp16"], 4) if mean["fp16"] else None for k in mean if k != "fp16"}
        summary[spec] = {**{k: round(v, 6) for k, v in mean.items()}, **ratios}
        print(f"{spec:9} mean " + "  ".join(f"{k} {v:.5f}" for k, v in mean.items()) + "   ratio to fp16: " +
              "  ".join(f"{k} {v}" for k, v in ratios.items()), flush=True)
    report = {"date": datetime.date.today().isoformat(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "command": "python benchmarks/qgroup_params_error.py " + " ".join(argv or sys.argv[1:]),
              "calibration": f"c4 {args.calib_windows} x {args.seqlen}", "evaluation": f"wiki {args.eval_windows} x "
              f"{args.seqlen}", "measure": "tr(E H E^T) / tr(W H W^T) on the evaluation inputs",
              "seconds": round(time.monotonic() - start, 1), "rows": rows, "mean": summary}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
