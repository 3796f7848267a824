"""Where a quantized SmolLM2 file loses the model: per-layer errors of several .stb files under one set of inputs.

    python benchmarks/layer_error.py A.stb B.stb ... [--windows 8] [--seqlen 512] [--json OUT]

For each file, two measurements on held-out text (the Wikipedia sample, `--windows` windows of `--seqlen` tokens):
- local: each linear's relative output error on the full-precision model's own inputs,
  tr(E H E^T) / tr(W H W^T) with E = W - Q (Q: the file's dequantized weight) and H = sum x x^T over those inputs;
- propagated: the relative error ||h_q - h|| / ||h|| of the hidden state after each decoder layer when every
  linear of the model takes the file's weights (embeddings, norms and head stay full precision, so only the
  linears' errors are seen).
Built for the block-size anomaly of docs/results.md (STBLLM 4:8 at block 64 / 256 far worse than at 128): it shows
whether one layer or tensor breaks, or the error grows evenly.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from stbllm_convert.arch import canonical_config, tensor_plan
from stbllm_convert.assets import text_sample_paths
from stbllm_convert.calibrate import LayerRunner, _collect_inputs, calibration_windows, source_model
from stbllm_convert.source import open_source
from stbllm_convert.tokenizer_meta import tokenizer_metadata
from stbllm_rt.stbfile import StbReader
from stbllm_rt.tokenizer import Tokenizer


def hidden_states(runner, windows) -> list[list[torch.Tensor]]:
    """The hidden state after every decoder layer, per window: [layer][window] tensors [1, T, hidden]."""
    states, hidden = [], [runner.embed(w[None]) for w in windows]
    for layer in runner.layers:
        hidden = [runner.forward(layer, h) for h in hidden]
        states.append(hidden)
    return states


def default_model():
    """The default model (SmolLM2-135M) in float32: (arch, config, plan, model, tokenizer)."""
    with open_source("smollm2-135m", quiet=True) as src:
        arch, config = canonical_config(src.config)
        plan = tensor_plan(arch, config)
        tok_spec, tok_blob = tokenizer_metadata(src.tokenizer_dir, None, src.config, src.generation_config)
        tok_spec.pop("vocab_size", None)
        model = source_model(src, arch, config, plan)
    return arch, config, plan, model, Tokenizer(tok_spec, tok_blob)


def input_grams(runner, plan, model, windows, wanted: set | None = None) -> tuple[dict, dict]:
    """(H = sum x x^T, the number of x) of each wanted linear's input (None: every linear) in the full-precision
    model, by tensor name; layers without a wanted linear are only run through."""
    grams, counts, hidden = {}, {}, [runner.embed(w[None]) for w in windows]
    for i, layer in enumerate(runner.layers):
        names = {s.name for s in plan.layers[i] if s.kind == "linear" and (wanted is None or s.name in wanted)}
        if not names:
            hidden = [runner.forward(layer, h) for h in hidden]
            continue
        modules = {s.name: model.get_submodule(s.hf_name.removesuffix(".weight"))
                   for s in plan.layers[i] if s.name in names}

        def statistic(name, x):
            grams[name] = grams.get(name, 0) + (x.t() @ x).double()
            counts[name] = counts.get(name, 0) + x.shape[0]
        hidden = _collect_inputs(runner, layer, modules, hidden, statistic)
    return grams, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    arch, config, plan, model, tokenizer = default_model()
    windows, _ = calibration_windows(tokenizer, [text_sample_paths()["wiki"]], args.windows, args.seqlen, seed=0)
    runner = LayerRunner(model, arch, config, args.seqlen, "cpu")
    reference = hidden_states(runner, windows)
    grams, _ = input_grams(runner, plan, model, windows)
    linears = [s for layer in plan.layers for s in layer if s.kind == "linear"]
    original = {s.name: model.get_submodule(s.hf_name.removesuffix(".weight")).weight.detach().clone()
                for s in linears}
    report = {"date": datetime.date.today().isoformat(), "text": "wiki.utf8", "windows": args.windows,
              "seqlen": args.seqlen, "command": "python benchmarks/layer_error.py " + " ".join(map(str, args.files)),
              "files": {}}
    for path in args.files:
        reader = StbReader(path)
        local = {}
        with torch.no_grad():
            for s in linears:
                w = original[s.name].double()
                q = torch.from_numpy(reader.dequantize(s.name)).double()
                h = grams[s.name]
                e = w - q
                local[s.name] = float(torch.einsum("ij,jk,ik->", e, h, e) / torch.einsum("ij,jk,ik->", w, h, w))
                model.get_submodule(s.hf_name.removesuffix(".weight")).weight.copy_(q.float())
        quantized = hidden_states(runner, windows)
        propagated = [float(sum((a - b).double().norm() ** 2 for a, b in zip(qs, rs)) ** 0.5 /
                            sum(b.double().norm() ** 2 for b in rs) ** 0.5) for qs, rs in zip(quantized, reference)]
        with torch.no_grad():
            for s in linears:
                model.get_submodule(s.hf_name.removesuffix(".weight")).weight.copy_(original[s.name])
        report["files"][path.name] = {"local": local, "propagated": propagated}
        worst = sorted(local.items(), key=lambda kv: -kv[1])[:5]
        print(f"{path.name}: propagated error after layers 0..{len(propagated) - 1}: "
              + " ".join(f"{x:.3f}" for x in propagated), flush=True)
        print("  worst local: " + ", ".join(f"{n} {v:.3f}" for n, v in worst), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
