"""Output error of each N:M importance metric's keep-mask, pruned alone and with the kept weights binarized (SmolLM2).

    python benchmarks/pruning_error.py [--layers 3] [--json benchmarks/results/smollm2-pruning-error.json]

For every linear of the first --layers decoder layers (calibrated as `--method stbllm --nm 4:8 --no-layerwise`
would, 8 x 256 tokens of the C4 sample, so each layer sees the quantized layers before it), each metric's N:M
keep-mask is scored twice by layer output error tr(E H E^T) (H = 2/N sum x x^T, the calibration Hessian, damped as
the driver damps it): E = the pruned weights alone ("pruned"), and E = W - (the kept weights binarized as
alpha * sign, alpha per (row, 128-block)) ("pruned_and_binarized"). Printed and stored relative to Wanda
(|W| * ||X_j||), per matrix and summed. This is the investigation behind docs/results.md: SI as we read the paper (a
zero-mean standardized score times ||X_j||) ranks a below-average weight LOWER the more its input carries — wrong
for pruning alone, right once the kept weights are binarized (a kept weight below about alpha / 2 costs more as
+-alpha than as 0, and the more so the larger its input).
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


def binarized(w: torch.Tensor, keep: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The kept weights as alpha * sign(w), alpha = mean |w| of the kept weights of each (row, block); 0 elsewhere.
    The simplest binarizer: enough to show how the keep choice interacts with binarization."""
    q = torch.zeros_like(w)
    for start in range(0, w.shape[1], block):
        part, kept = w[:, start:start + block], keep[:, start:start + block]
        alpha = (part.abs() * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp(min=1)
        q[:, start:start + block] = torch.where(kept, alpha * torch.sign(part), torch.zeros_like(part))
    return q


def pruning_errors(w: torch.Tensor, h: torch.Tensor) -> dict:
    """{'4:8': {'pruned': {metric: tr(D H D^T)}, 'pruned_and_binarized': {metric: tr(E H E^T)}}, ...} for one
    weight matrix and its Hessian: D = the pruned weights, E = W - binarized(kept weights)."""
    norms = torch.diag(h).clamp(min=0).sqrt()
    out = {}
    for n, m in PATTERNS:
        entry = out[f"{n}:{m}"] = {"pruned": {}, "pruned_and_binarized": {}}
        for metric in IMPORTANCE:
            keep = torch.from_numpy(nm_keep(importance(w, norms, metric).numpy(), n, m))
            for kind, e in (("pruned", w * ~keep), ("pruned_and_binarized", w - binarized(w, keep))):
                entry[kind][metric] = float(torch.einsum("ij,jk,ik->", e, h, e))
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
        relative = {nm: {kind: {k: round(v / e[kind]["wanda"], 3) for k, v in e[kind].items()} for kind in e}
                    for nm, e in errors.items()}
        rows.append({"tensor": name, "errors": errors, "relative_to_wanda": relative})
        print(name, relative, flush=True)
    totals = {nm: {kind: {metric: round(sum(r["errors"][nm][kind][metric] for r in rows) /
                                        sum(r["errors"][nm][kind]["wanda"] for r in rows), 3)
                          for metric in IMPORTANCE} for kind in ("pruned", "pruned_and_binarized")}
              for nm in rows[0]["errors"]}
    print("all matrices, relative to wanda:", json.dumps(totals))
    args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "command":
                                     f"python benchmarks/pruning_error.py --layers {args.layers}",
                                     "calibration": "C4 sample, 8 x 256 tokens, seed 0",
                                     "total_relative_to_wanda": totals, "tensors": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
