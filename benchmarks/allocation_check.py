"""Checks the allocator's loss estimate (tools/convert/stbllm_convert/allocate.py) against the real NLL increase.

For a few linears of SmolLM2-135M and a few candidates: quantize that one tensor alone (as the allocator does: GPTQ
with its Hessian, inputs from the full-precision model), put it into the full-precision model and measure the mean
NLL over the calibration windows; compare with 1/4 sum_i G_i (E H E^T)_ii. Prints one line per (tensor, candidate)
and the rank correlation. --files X.stb ...: also the whole file's NLL increase on the same windows (its weights
dequantized, transformers oracle) beside the estimate its allocation recorded. --json writes the rows.

    OMP_NUM_THREADS=1 python benchmarks/allocation_check.py --samples 8 --seqlen 256 --files alloc3.stb
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from stbllm_convert.allocate import output_fisher, output_loss, parse_candidates
from stbllm_convert.arch import canonical_config, tensor_plan
from stbllm_convert.binarize import inverse_hessian_factor
from stbllm_convert.calibrate import calibration_windows, linear_modules, source_model
from stbllm_convert.source import open_source
from stbllm_rt.tokenizer import Tokenizer
from stbllm_convert.tokenizer_meta import tokenizer_metadata

TENSORS = ("blk.0.attn_k.weight", "blk.0.ffn_down.weight", "blk.10.attn_v.weight", "blk.15.ffn_up.weight",
           "blk.29.attn_q.weight", "blk.29.ffn_down.weight")


def mean_nll(model, windows) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
            count += len(w) - 1
    return total / count


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--candidates", default="q2:g64,q3:g64,q4:g64")
    p.add_argument("--tensors", default=",".join(TENSORS), help="comma-separated linears to check one by one")
    p.add_argument("--files", nargs="*", default=[], help=".stb files converted from smollm2-135m")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with open_source("smollm2-135m", quiet=True) as src:  # the weights live while the source is open
        arch, config = canonical_config(src.config)
        plan = tensor_plan(arch, config)
        spec, blob = tokenizer_metadata(src.tokenizer_dir, None, src.config, src.generation_config)
        windows, _ = calibration_windows(Tokenizer(spec, blob), [], args.samples, args.seqlen, 0)
        model = source_model(src, arch, config, plan)
        modules = {}
        for i in range(len(plan.layers)):
            modules.update({n: m for n, m in linear_modules(model, plan, i).items() if n in args.tensors.split(",")})
        fisher = output_fisher(model, windows, modules, False, torch.device("cpu"), None)
        sums, tokens = {}, {}

        def hook(module, inputs, output, name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.t() @ x
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        handles = [m.register_forward_hook(lambda mod, a, o, name=name: hook(mod, a, o, name))
                   for name, m in modules.items()]
        base = mean_nll(model, windows)
        for handle in handles:
            handle.remove()
        rows = []
        for name, module in modules.items():
            h = sums[name] * (2.0 / tokens[name])
            w = module.weight.detach().float().clone()
            u = inverse_hessian_factor(h)
            for spec, method in parse_candidates(args.candidates, 128).items():
                q = method.quantize(w, u if method.calibrated else None, None, h).q
                predicted = output_loss(fisher.outputs[name], w - q, h)
                module.weight.data.copy_(q)
                actual = mean_nll(model, windows) - base
                module.weight.data.copy_(w)
                rows.append({"tensor": name, "candidate": spec, "predicted": predicted, "actual": actual})
                print(f"{name:<24} {spec:<8} predicted {predicted:9.5f}  actual {actual:9.5f} nats/token", flush=True)
        files = []
        for path in args.files:
            from stbllm_convert.oracle import build_hf_model
            from stbllm_rt import StbReader

            estimate = StbReader(path).metadata["provenance"].get("allocation", {}).get("estimated_loss")
            actual = mean_nll(build_hf_model(path).float().eval(), windows) - base
            files.append({"file": path, "estimated": estimate, "actual": actual})
            print(f"{path}: estimated {estimate} actual {actual:.5f} nats/token over the calibration windows")
    spearman = None
    if len(rows) > 1:
        rank = lambda xs: torch.tensor(xs).argsort().argsort().float()  # noqa: E731
        pr, ac = rank([r["predicted"] for r in rows]), rank([r["actual"] for r in rows])
        spearman = float(torch.corrcoef(torch.stack([pr, ac]))[0, 1])
        print(f"Spearman rank correlation predicted vs actual: {spearman:.3f} over {len(rows)} rows")
    print(f"base NLL {base:.4f} nats/token")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base_nll": base, "spearman": spearman, "rows": rows, "files": files,
                       "samples": args.samples, "seqlen": args.seqlen}, f, indent=1)

if __name__ == "__main__":
    main()
