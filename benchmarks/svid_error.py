"""OneBit's SVID on a real model: relative error ||W - sign(W) (a b^T)||_F / ||W||_F of the rank-1 factors of |W| by
power iteration and by multiplicative-update NMF (OneBit's code uses sklearn's NMF), over every decoder linear,
with the time each takes; plain per-row sign binarization (a = mean |w| per row, b = 1) for reference.

usage: python benchmarks/svid_error.py [MODEL] [--json OUT]   (MODEL default: smollm2-135m)
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from stbllm_convert.arb import rank1_nonnegative
from stbllm_convert.arch import canonical_config, tensor_plan
from stbllm_convert.source import open_source

SOLVERS = [("power", 30), ("nmf", 30), ("nmf", 300)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sq = {f"{s}-{i}": 0.0 for s, i in SOLVERS} | {"sign": 0.0}
    seconds = {k: 0.0 for k in sq}
    total = 0.0
    with open_source(args.model, quiet=True) as src:
        arch, config = canonical_config(src.config)
        specs = [s for layer in tensor_plan(arch, config).layers for s in layer if s.kind == "linear"]
        for spec in specs:
            w = torch.from_numpy(np.ascontiguousarray(src.tensor(spec.hf_name))).float()
            total += float((w.double() ** 2).sum())
            for solver, iters in SOLVERS:
                start = time.perf_counter()
                a, b = rank1_nonnegative(w.abs(), solver, iters)
                seconds[f"{solver}-{iters}"] += time.perf_counter() - start
                sq[f"{solver}-{iters}"] += float(((w - w.sign() * torch.outer(a, b)).double() ** 2).sum())
            sq["sign"] += float(((w - w.sign() * w.abs().mean(1, keepdim=True)).double() ** 2).sum())
    result = {"model": args.model, "linears": len(specs),
              "relative_error": {k: round((v / total) ** 0.5, 6) for k, v in sq.items()},
              "seconds": {k: round(v, 2) for k, v in seconds.items() if k != "sign"}}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
