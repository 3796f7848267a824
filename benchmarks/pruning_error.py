"""How much output error each N:M importance metric causes by pruning alone, on SmolLM2-135M's first layers.

    python benchmarks/pruning_error.py [--layers 3] [--json benchmarks/results/smollm2-pruning-error.json]

For every linear of the first --layers decoder layers (calibrated as `--method stbllm --nm 4:8 --no-layerwise`
would, 8 x 256 tokens of the C4 sample, so each layer sees the quantized layers before it), the pruned part
D = W * (1 - keep) of each metric's N:M keep-mask costs tr(D H D^T) of layer output error (H = 2/N sum x x^T, the
calibration Hessian, damped as the driver damps it). Printed and stored relative to Wanda (|W| * ||X_j||), per matrix and summed per layer.
This is the investigation behind docs/results.md: SI as we read the paper (a zero-mean standardized score times
||X_j||) ranks a below-average weight LOWER the more its input carries.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from stbllm_convert.arch import canonical_config, tensor_plan
from stbllm_convert.binarize import IMPORTANCE, importance, nm_keep
from stbllm_convert.calibrate import CalibrationOptions, Calibrator
from stbllm_convert.methods import make_method
from stbllm_convert.recipe import Recipe
from stbllm_convert.source import open_source
from stbllm_convert.tokenizer_meta import tokenizer_metadata
from stbllm_rt.stbfile import StbWriter
from stbllm_rt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = [(4, 8), (6, 8)]


def pruning_errors(w: torch.Tensor, h: torch.Tensor) -> dict:
    """{'4:8': {metric: tr(D H D^T)}, ...} for one weight matrix and its Hessian."""
    norms = torch.diag(h).clamp(min=0).sqrt()
    out = {}
    for n, m in PATTERNS:
        out[f"{n}:{m}"] = {}
        for metric in IMPORTANCE:
            keep = torch.from_numpy(nm_keep(importance(w, norms, metric).numpy(), n, m))
            d = w * ~keep
            out[f"{n}:{m}"][metric] = float(torch.einsum("ij,jk,ik->", d, h, d))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "smollm2-pruning-error.json")
    args = p.parse_args(argv)
    captured = []
    with open_source("smollm2-135m", quiet=True) as src:
        arch, config = canonical_config(src.config)
        plan = tensor_plan(arch, config)
        tok_spec, tok_blob = tokenizer_metadata(src.tokenizer_dir, None, src.config, src.generation_config)
        tok_spec.pop("vocab_size", None)
        method = make_method("stbllm", nm=(4, 8), layerwise=False)
        quantize = method.quantize

        def capturing_quantize(w, u, keep, *rest):
            # u is the upper Cholesky factor of the damped inverse Hessian: H = (u^T u)^-1
            captured.append((w.clone(), torch.cholesky_inverse(u, upper=True)))
            return quantize(w, u, keep, *rest)

        method.quantize = capturing_quantize
        calibrator = Calibrator(Recipe(method, "stbllm:4:8"), src, arch, config, plan,
                                Tokenizer(tok_spec, tok_blob), CalibrationOptions(samples=8, seqlen=256))
        writer = StbWriter({"architecture": arch, "config": config, "tokenizer": tok_spec, "provenance": {}})
        linear_names = []
        for i in range(args.layers):
            linear_names += list(calibrator._linear_modules(i))
            calibrator.add_layer(writer, i)
    rows = []
    for (w, h), name in zip(captured, linear_names):
        errors = pruning_errors(w, h)
        rows.append({"tensor": name, "errors": errors,
                     "relative_to_wanda": {nm: {k: round(v / e["wanda"], 3) for k, v in e.items()}
                                           for nm, e in errors.items()}})
        print(name, {nm: r for nm, r in rows[-1]["relative_to_wanda"].items()}, flush=True)
    totals = {f"{n}:{m}": {metric: round(sum(r["errors"][f"{n}:{m}"][metric] for r in rows) /
                                         sum(r["errors"][f"{n}:{m}"]["wanda"] for r in rows), 3)
                           for metric in IMPORTANCE} for n, m in PATTERNS}
    print("all matrices, relative to wanda:", totals)
    args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "command":
                                     f"python benchmarks/pruning_error.py --layers {args.layers}",
                                     "calibration": "C4 sample, 8 x 256 tokens, seed 0",
                                     "total_relative_to_wanda": totals, "tensors": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
