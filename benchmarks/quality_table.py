"""The quality table of docs/results.md: every row converted from SmolLM2-135M and evaluated under one protocol.

    python benchmarks/quality_table.py --files /work/results-files

Converts each row's .stb into --files (kept; a row whose .stb and measurements are already there is not redone, so
an interrupted run continues), evaluates it with stbllm-eval (the Wikipedia sample, --seqlen x --windows, the C++
runtime backend), checks the runtime against the torch oracle backend on one STBLLM file, then writes
benchmarks/results/smollm2-quality.json and prints the markdown table. Conversions and evaluations run one at a
time (the machine has 2 cores); each conversion's wall time and peak RSS are measured on its own process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
CALIBRATION = ["--calib-samples", "32", "--calib-seqlen", "512"]  # the C4 sample, seed 0
SEQLEN, WINDOWS = 512, 64
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
    ("onebit-svid", "OneBit SVID, no distillation", ["--method", "onebit-svid"]),
    ("q4-g64", "q4, group 64 (GPTQ)", ["--method", "q4", "--group", "64", *CALIBRATION]),
    ("q3-g64", "q3, group 64 (GPTQ)", ["--method", "q3", "--group", "64", *CALIBRATION]),
    ("q3-g128", "q3, group 128 (GPTQ)", ["--method", "q3", "--group", "128", *CALIBRATION]),
    ("q2-g64", "q2, group 64 (GPTQ)", ["--method", "q2", "--group", "64", *CALIBRATION]),
    ("onebit-svid-kd32", "OneBit SVID + 32 distillation steps",
     ["--method", "onebit-svid", "--kd-steps", "32", *CALIBRATION]),
]


def run_measured(cmd: list[str], log: Path) -> dict:
    """Runs cmd to completion (output to log); returns its wall seconds and peak RSS (MiB) from wait4."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({log}): {shlex.join(cmd)}")
    return {"seconds": round(time.monotonic() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def evaluate(stb: Path, out: Path, windows: int, backend: str) -> dict:
    if not out.is_file():
        run_measured(["stbllm-eval", str(stb), "--seqlen", str(SEQLEN), "--max-windows", str(windows),
                      "--backend", backend, "-q", "--json", str(out)], out.with_suffix(".log"))
    return json.loads(out.read_text())


def measure_row(files: Path, name: str, args: list[str]) -> dict:
    stb, timing = files / f"{name}.stb", files / f"{name}.convert.json"
    convert = ["stbllm-convert", MODEL, "-o", str(stb), "-q", *args]
    if not (stb.is_file() and timing.is_file()):
        timing.write_text(json.dumps(run_measured(convert, files / f"{name}.convert.log")) + "\n")
    from stbllm_rt import StbReader

    provenance = StbReader(stb).metadata["provenance"]
    bits = provenance["bits"]
    result = evaluate(stb, files / f"{name}.eval.json", WINDOWS, "cpu")
    return {"name": name, "convert_command": shlex.join(["stbllm-convert", MODEL, "-o", f"{name}.stb", *args]),
            "method": provenance["method"], "nm": provenance.get("nm"), "block": provenance.get("block"),
            "importance": provenance.get("importance"), "nm_per_layer": provenance.get("nm_per_layer"),
            "calibration": provenance.get("calibration"), "ppl": result["ppl"], "nll": result["nll"],
            "eval": {k: result[k] for k in ("text", "backend", "seqlen", "windows", "predicted_tokens")},
            "paper_bits_per_weight": bits["paper_bits_per_weight"],
            "linear_bits_per_weight": bits["linear_bits_per_weight"],
            "file_bits_per_weight": bits["file_bits_per_weight"],
            "groups_bits_per_weight": {g: v["bits_per_weight"] for g, v in bits["groups"].items()},
            "file_bytes": stb.stat().st_size,
            **{f"conversion_{k}": v for k, v in json.loads(timing.read_text()).items()},
            "layers": provenance.get("layers")}


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
    load_before = os.getloadavg()
    rows = []
    for name, _, convert_args in chosen:
        rows.append(measure_row(args.files, name, convert_args))
        print(f"{name}: PPL {rows[-1]['ppl']:,.2f}", file=sys.stderr, flush=True)
    check = None
    if any(r["name"] == CPU_CHECK[0] for r in rows):
        stb = args.files / f"{CPU_CHECK[0]}.stb"
        both = {b: evaluate(stb, args.files / f"{CPU_CHECK[0]}.eval-{b}-{CPU_CHECK[1]}.json", CPU_CHECK[1], b)["ppl"]
                for b in ("torch", "cpu")}
        check = {"row": CPU_CHECK[0], "windows": CPU_CHECK[1], "seqlen": SEQLEN, "ppl": both,
                 "relative_difference": round(abs(both["cpu"] - both["torch"]) / both["torch"], 6)}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "date": datetime.date.today().isoformat(),
              "commit": commit, "machine": f"{cpu}, {os.cpu_count()} cores (shared; load average "
                                           f"{load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)",
              "protocol": {"calibration": "C4 sample (c4.utf8), " + " ".join(CALIBRATION) + ", seed 0",
                           "evaluation": f"stbllm-eval MODEL.stb --seqlen {SEQLEN} --max-windows {WINDOWS} "
                                         "--backend cpu (the C++ runtime; Wikipedia sample wiki.utf8)"},
              "command": "python benchmarks/quality_table.py --files DIR", "cpu_backend_check": check, "rows": rows}
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(rows, {name: label for name, label, _ in ROWS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
