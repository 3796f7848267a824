"""Stored bits vs the order-0 entropy bound of each stb.binary-groups.v2 stream of a `.stb` file (issue 8).

    python benchmarks/entropy_report.py FILE [--json OUT]

Prints, per stream summed over the file's binary-groups linear tensors, in bits per linear weight: stored, the
order-0 bound (n · H of the stream's symbols, per tensor), the bound plus the cost of storing each distribution,
an order-0 coder's cost (per tensor the cheaper of that and the fixed width), the ratios stored / bound and stored
/ coder, and the stream's share of the stored bits; then the totals and the issue's simple bound
log2 C(M, N)/M + N/M (mask + signs). See stbllm_rt/entropy.py for what each stream's symbols are.
"""
from __future__ import annotations

import argparse
import json
import sys

from stbllm_rt.entropy import entropy_report


def print_table(report: dict) -> None:
    weights = report["weights"]
    print(f"{report['file']}: {len(report['tensors'])} binary-groups linear tensors, {weights:,} weights"
          + (f" (skipped: {report['skipped']})" if report["skipped"] else ""))
    print(f"{'stream':<22}{'stored':>9}{'bound':>9}{'+table':>9}{'coder':>9}{'ratio':>8}{'/coder':>8}{'share':>8}"
          "   (bits per linear weight; ratio = stored / bound)")

    def row(key, stored, bound, with_table, coder, ratio, to_coder, share):
        ratios = "".join(f"{'-' if r is None else f'{r:.3f}':>8}" for r in (ratio, to_coder))
        print(f"{key:<22}{stored:>9.4f}{bound:>9.4f}{with_table:>9.4f}{coder:>9.4f}{ratios}{share:>8.1%}")

    for key, s in report["streams"].items():
        row(key, s["stored_per_weight"], s["bound_per_weight"], s["bound_with_table_per_weight"],
            s["coder_per_weight"], s["ratio"], s["ratio_to_coder"], s["share_of_stored"])
    row("total", report["stored_bits_per_weight"], report["bound_bits_per_weight"],
        report["bound_with_tables_bits_per_weight"], report["coder_bits_per_weight"], report["ratio"],
        report["ratio_to_coder"], 1)
    if "mask" in report["streams"]:
        print(f"mask at the fixed log2 C(M,N) per group: {report['streams']['mask']['uniform_bits'] / weights:.4f} "
              "bits per weight")
    print(f"simple bound log2 C(M,N)/M + N/M (mask + signs): {report['simple_bound_bits_per_weight']:.4f} bits per "
          "weight; +table: the bound plus one table of the distinct symbols and their counts per stream and "
          "tensor; coder: per stream and tensor the cheaper of that and the fixed width")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a .stb file with stb.binary-groups.v2 linear tensors")
    parser.add_argument("--json", metavar="OUT", help="also write the full report (per tensor) as JSON")
    args = parser.parse_args(argv)
    try:
        report = entropy_report(args.file, progress=True)
    except (OSError, RuntimeError, ValueError) as e:  # the C++ reader: RuntimeError (open), FormatError
        sys.exit(f"entropy_report: {e}")
    if not report["weights"]:
        sys.exit(f"entropy_report: {args.file} has no stb.binary-groups.v2 linear tensor")
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
