"""The quality table of docs/results.md: every row converted from SmolLM2-135M and evaluated under one protocol.

    python benchmarks/quality_table.py --files /work/results-files

Converts each row's .stb into --files (kept; a row whose .stb and measurements are already there is not redone, so
an interrupted run continues), evaluates it with stbllm-eval (the Wikipedia sample, 64 windows x 512 tokens, the C++
runtime backend), checks the runtime against the torch oracle backend on one STBLLM file, then writes
benchmarks/results/smollm2-quality.json and prints the markdown table. Conversions and evaluations run one at a
time (the machine has 2 cores); each conversion's wall time and peak RSS are measured on its own process. The
converting, evaluating and resuming are stbllm-pareto's (stbllm_convert/pareto.py); this file holds the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stbllm_convert.errors import ConvertError
from stbllm_convert.pareto import Protocol, RowSpec, evaluate_file, report, stb_row
from stbllm_rt import StbReader

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
CALIBRATION = ["--calib-samples", "32", "--calib-seqlen", "512"]  # the C4 sample, seed 0
PROTOCOL = Protocol(seqlen=512, windows=64, backend="cpu")
CPU_CHECK = ("stbllm-6of8", 4)  # row and windows evaluated by both backends

# (row name, what it is, converter arguments)
ROWS = [
    ("fp16", "fp16", ["--method", "fp16"]),
    ("sign", "sign, 1 bit", ["--method", "sign"]),
    ("sign-6of8", "sign 6:8 (magnitude)", ["--method", "sign", "--nm", "6:8"]),
    ("stbllm-6of8", "STBLLM 6:8", ["--method", "stbllm", "--nm", "6:8", *CALIBRATION]),
    ("stbllm-5of8", "STBLLM 5:8", ["--method", "stbllm", "--nm", "5:8", *CALIBRATION]),
    ("stbllm-4of8", "STBLLM 4:8 (si, block 128)", ["--method", "stbllm", "--nm", "4:8", *CALIBRATION]),
    ("billm", "BiLLM dense", ["--method", "billm", *CALIBRATION]),
    ("billm-6of8", "BiLLM 6:8 (magnitude)", ["--method", "billm", "--nm", "6:8", *CALIBRATION]),
    ("billm-5of8", "BiLLM 5:8 (magnitude)", ["--method", "billm", "--nm", "5:8", *CALIBRATION]),
    ("billm-4of8", "BiLLM 4:8 (magnitude)", ["--method", "billm", "--nm", "4:8", *CALIBRATION]),
    ("stbllm-4of8-wanda", "STBLLM 4:8, importance wanda",
     ["--method", "stbllm", "--nm", "4:8", "--importance", "wanda", *CALIBRATION]),
    ("stbllm-4of8-magnitude", "STBLLM 4:8, importance magnitude",
     ["--method", "stbllm", "--nm", "4:8", "--importance", "magnitude", *CALIBRATION]),
    ("stbllm-4of8-nolayerwise", "STBLLM 4:8, same N in every layer",
     ["--method", "stbllm", "--nm", "4:8", "--no-layerwise", *CALIBRATION]),
    ("stbllm-4of8-block64", "STBLLM 4:8, block 64", ["--method", "stbllm", "--nm", "4:8", "--block", "64",
                                                      *CALIBRATION]),
    ("stbllm-4of8-block256", "STBLLM 4:8, block 256", ["--method", "stbllm", "--nm", "4:8", "--block", "256",
                                                        *CALIBRATION]),
    ("stbllm-4of8-regions2", "STBLLM 4:8, two regions (BiLLM's split)",
     ["--method", "stbllm", "--nm", "4:8", "--regions", "2", *CALIBRATION]),
    ("stbllm-6of8-regions2", "STBLLM 6:8, two regions (BiLLM's split)",
     ["--method", "stbllm", "--nm", "6:8", "--regions", "2", *CALIBRATION]),
    ("arb-x", "ARB-X dense", ["--method", "arb-x", *CALIBRATION]),
    ("arb-x-6of8", "ARB-X 6:8 (magnitude)", ["--method", "arb-x", "--nm", "6:8", *CALIBRATION]),
    ("arb-rc", "ARB-RC dense", ["--method", "arb-rc", *CALIBRATION]),
    ("arb-rc-6of8", "ARB-RC 6:8 (magnitude)", ["--method", "arb-rc", "--nm", "6:8", *CALIBRATION]),
    ("arb-rc-cgb", "ARB-RC + CGB dense", ["--method", "arb-rc", "--cgb", *CALIBRATION]),
    ("arb-rc-cgb-6of8", "ARB-RC + CGB 6:8 (magnitude)", ["--method", "arb-rc", "--cgb", "--nm", "6:8", *CALIBRATION]),
    ("arb-x-cgb-6of8", "ARB-X + CGB 6:8 (magnitude)", ["--method", "arb-x", "--cgb", "--nm", "6:8", *CALIBRATION]),
    ("onebit-svid", "OneBit SVID, no distillation", ["--method", "onebit-svid"]),
    ("q4-g64", "q4, group 64 (GPTQ)", ["--method", "q4", "--group", "64", *CALIBRATION]),
    ("q3-g64", "q3, group 64 (GPTQ)", ["--method", "q3", "--group", "64", *CALIBRATION]),
    ("q3-g128", "q3, group 128 (GPTQ)", ["--method", "q3", "--group", "128", *CALIBRATION]),
    ("q2-g64", "q2, group 64 (GPTQ)", ["--method", "q2", "--group", "64", *CALIBRATION]),
    ("onebit-svid-kd32", "OneBit SVID + 32 distillation steps",
     ["--method", "onebit-svid", "--kd-steps", "32", *CALIBRATION]),
]


def measure_row(files: Path, name: str, args: list[str]) -> dict:
    """One row converted and evaluated by stbllm-pareto's code (resumable), with the per-layer provenance."""
    row = stb_row(MODEL, RowSpec(name, tuple(args)), files, PROTOCOL)
    provenance = StbReader(files / f"{name}.stb").metadata["provenance"]
    return {**row, "nm_per_layer": provenance.get("nm_per_layer"), "layers": provenance.get("layers")}


def markdown(rows: list[dict], labels: dict) -> str:
    lines = ["| row | paper bits | measured bits / linear weight | whole-file bits / weight | PPL | conversion | "
             "peak RSS |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {labels[r['name']]} | {r['paper_bits_per_weight']:.2f} | {r['linear_bits_per_weight']:.2f} | "
                     f"{r['file_bits_per_weight']:.2f} | {r['ppl']:,.2f} | {r['conversion_seconds']:.0f} s | "
                     + (f"{r['conversion_peak_rss_mib'] / 1024:.2f} GiB |" if r["conversion_peak_rss_mib"] else "— |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=Path, required=True, help="where the .stb files and measurements are kept")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (default: all)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "smollm2-quality.json")
    args = p.parse_args(argv)
    args.files.mkdir(parents=True, exist_ok=True)
    chosen = [r for r in ROWS if args.rows is None or r[0] in args.rows]
    load_before = os.getloadavg()[0]
    rows = []
    try:
        for name, _, convert_args in chosen:
            rows.append(measure_row(args.files, name, convert_args))
            print(f"{name}: PPL {rows[-1]['ppl']:,.2f}", file=sys.stderr, flush=True)
    except ConvertError as e:
        sys.exit(f"quality_table: {e}")
    check = None
    if any(r["name"] == CPU_CHECK[0] for r in rows):
        stb = args.files / f"{CPU_CHECK[0]}.stb"
        protocols = {b: Protocol(PROTOCOL.seqlen, CPU_CHECK[1], b) for b in ("torch", "cpu")}
        both = {b: evaluate_file(stb, args.files / f"{CPU_CHECK[0]}.eval-{pr.tag()}.json", pr)["ppl"]
                for b, pr in protocols.items()}
        check = {"row": CPU_CHECK[0], "windows": CPU_CHECK[1], "seqlen": PROTOCOL.seqlen, "ppl": both,
                 "relative_difference": round(abs(both["cpu"] - both["torch"]) / both["torch"], 6)}
    doc = report("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", rows, PROTOCOL,
                 "python benchmarks/quality_table.py --files DIR", load_before,
                 calibration="C4 sample (c4.utf8), " + " ".join(CALIBRATION) + ", seed 0",
                 cpu_backend_check=check)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(rows, {name: label for name, label, _ in ROWS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
