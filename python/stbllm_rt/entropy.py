"""How close the stb.binary-groups.v2 streams of a `.stb` file come to the order-0 entropy of what they store.

For every linear tensor of that codec, each stream's stored bits (its bytes × 8) are set against n · H(p̂), n
symbols under their own empirical distribution p̂ — the least an order-0 coder (one fixed distribution per stream
and tensor) could spend:
- mask: the colex code of each group's keep pattern (the full groups, and the ragged tail groups on their own);
  the fixed width log₂ C(M, N) per group is reported alongside as `mask_uniform_bits`;
- signs: the sign bits of kept weights; labels: the region labels of kept non-salient weights; salient: the column
  bitmap; residual: the order-2 signs;
- params: the fp16 words (or int8 codes with `params_bits` = 8) per slot kind (region α, region μ, salient α,
  salient μ); param_scales: their fp16 words.
A real coder also stores its distribution: `table_bits` prices one table per stream and tensor as the distinct
symbols used, each with its symbol and its count (symbol width + ⌈log₂(n + 1)⌉ bits). That matters for the
fp16 params' 65,536-symbol alphabet and little elsewhere, so the report gives the bound with and without it, and
`coder_bits`: per stream and tensor the cheaper of (bound + table) and the fixed width (n × symbol width), what an
order-0 coder that may fall back to storing the symbols as they are would pay.
"""
from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from . import binary_groups
from .stbfile import StbReader, tensor_group

# The params streams' slot kinds, in the file's order: per region (α, μ), then the salient α₁, μ₁, α₂, μ₂.
PARAM_KINDS = ("region_alpha", "region_mu", "salient_alpha", "salient_mu")
SUMMED_FIELDS = ("stored_bits", "symbols", "bound_bits", "table_bits", "coder_bits")


def order0_bits(symbols: np.ndarray) -> float:
    """n · H of the symbols' empirical distribution: n log₂ n − Σ c log₂ c over the symbol counts c."""
    counts = _counts(symbols)
    n = counts.sum()
    return float(n * math.log2(n) - (counts * np.log2(counts)).sum()) if n else 0.0


def table_bits(symbols: np.ndarray, symbol_width: int) -> int:
    """The cost of storing the distribution: each distinct symbol with its count."""
    n = symbols.size
    return len(_counts(symbols)) * (symbol_width + n.bit_length()) if n else 0


def _counts(symbols: np.ndarray) -> np.ndarray:
    symbols = np.asarray(symbols).reshape(-1)
    counts = np.unique(symbols, return_counts=True)[1] if symbols.size else np.zeros(0, np.int64)
    return counts.astype(np.float64)


def _stream(stored_bits: int, *parts: tuple[np.ndarray, int]) -> dict:
    """A stream's stored bits and its bound over independently coded parts (symbols, symbol width)."""
    bounds = [order0_bits(s) for s, _ in parts]
    tables = [table_bits(s, w) for s, w in parts]
    return {"stored_bits": int(stored_bits), "symbols": int(sum(s.size for s, _ in parts)),
            "bound_bits": sum(bounds), "table_bits": sum(tables),
            "coder_bits": sum(min(b + t, s.size * w) for b, t, (s, w) in zip(bounds, tables, parts))}


def binary_groups_streams(reader: StbReader, name: str) -> dict:
    """{stream: {stored_bits, symbols, bound_bits, table_bits}} of one stb.binary-groups.v2 tensor, and for the
    mask also `uniform_bits` (the fixed log₂ C(M, N) per group)."""
    info = reader.tensor_info(name)
    p, (rows, cols) = info["params"], info["shape"]
    present = info["components"]

    def stream(key):  # an empty stream is absent from the file
        return reader.component(name, key) if key in present else np.zeros(0, np.uint8)

    def stored(key):
        return present[key]["length"] * 8 if key in present else 0

    out = {}
    keep = np.ones((rows, cols), dtype=bool)
    if p["nm"] is not None:
        n, m = p["nm"]
        keep = binary_groups.decode_mask(stream("mask"), rows, cols, n, m)
        full, tail, tail_kept = binary_groups.mask_layout(cols, n, m)
        codes = binary_groups._colex_rank(keep[:, :full * m].reshape(rows, full, m))
        parts = [(codes, binary_groups.rank_width(m, n))]
        uniform = rows * full * math.log2(math.comb(m, n))
        if tail:
            parts.append((binary_groups._colex_rank(keep[:, full * m:]), binary_groups.rank_width(tail, tail_kept)))
            uniform += rows * math.log2(math.comb(tail, tail_kept))
        out["mask"] = {**_stream(stored("mask"), *parts), "uniform_bits": uniform}
    salient = binary_groups._unpack(stream("salient"), cols, "salient")
    kept = int(keep.sum())
    kept_plain = int((keep & ~salient[None, :]).sum())
    out["signs"] = _stream(stored("signs"), (binary_groups._unpack(stream("signs"), kept, "signs"), 1))
    regions = p["regions"]
    if regions > 1 and kept_plain:
        labels = binary_groups.decode_labels(stream("labels"), kept_plain, regions, p.get("label_coder"))
        out["labels"] = _stream(stored("labels"), (labels, (regions - 1).bit_length()))
    out["salient"] = _stream(stored("salient"), (salient, 1))
    if p["kept_salient"]:
        out["residual"] = _stream(stored("residual"),
                                  (binary_groups._unpack(stream("residual"), p["kept_salient"], "residual"), 1))
        if "salient_labels" in present:
            out["salient_labels"] = _stream(stored("salient_labels"), (binary_groups._unpack(
                stream("salient_labels"), p["kept_salient"], "salient_labels"), 1))
    slots = binary_groups.param_slots(regions, p.get("salient_groups", 1))
    eight_bit = p.get("params_bits") == 8
    words = stream("params").view(np.int8 if eight_bit else "<u2").reshape(rows, -1, slots)
    width = words.itemsize * 8
    r = 2 * regions
    for kind, slot_ids in zip(PARAM_KINDS, (range(0, r, 2), range(1, r, 2), range(r, slots, 2),
                                            range(r + 1, slots, 2))):
        values = words[..., list(slot_ids)]
        out[f"params.{kind}"] = _stream(values.size * width, (values, width))
    if eight_bit:
        out["param_scales"] = _stream(stored("param_scales"), (stream("param_scales").view("<u2"), 16))
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def entropy_report(path, progress: bool = False) -> dict:
    """Stored bits vs the order-0 entropy bound, per stream and per tensor, of the file's stb.binary-groups.v2
    linear tensors (other linear codecs are counted under `skipped`)."""
    reader = StbReader(path)
    linear = [n for n in reader.tensor_names() if tensor_group(n) == "linear"]
    tensors, skipped = {}, {}
    weights = 0
    simple_bound = 0.0  # the log₂ C(M, N)/M + N/M per weight (mask + signs)
    for name in tqdm(linear, desc="entropy", unit="tensor", disable=not progress):
        info = reader.tensor_info(name)
        if info["codec"] != binary_groups.CODEC:
            skipped[info["codec"]] = skipped.get(info["codec"], 0) + 1
            continue
        rows, cols = info["shape"]
        n, m = info["params"]["nm"] or (1, 1)
        weights += rows * cols
        simple_bound += rows * cols * (math.log2(math.comb(m, n)) + n) / m
        tensors[name] = {"shape": [rows, cols], "nm": info["params"]["nm"], "regions": info["params"]["regions"],
                         "streams": binary_groups_streams(reader, name)}
    streams: dict[str, dict] = {}
    for t in tensors.values():
        for key, s in t["streams"].items():
            total = streams.setdefault(key, dict.fromkeys(SUMMED_FIELDS, 0))
            for field in SUMMED_FIELDS:
                total[field] += s[field]
            if "uniform_bits" in s:
                total["uniform_bits"] = total.get("uniform_bits", 0.0) + s["uniform_bits"]
    stored = sum(s["stored_bits"] for s in streams.values())
    bound = sum(s["bound_bits"] for s in streams.values())
    tables = sum(s["table_bits"] for s in streams.values())
    coder = sum(s["coder_bits"] for s in streams.values())
    for s in streams.values():
        s.update(stored_per_weight=round(s["stored_bits"] / weights, 5),
                 bound_per_weight=round(s["bound_bits"] / weights, 5),
                 bound_with_table_per_weight=round((s["bound_bits"] + s["table_bits"]) / weights, 5),
                 ratio=_ratio(s["stored_bits"], s["bound_bits"]),
                 coder_per_weight=round(s["coder_bits"] / weights, 5),
                 ratio_with_table=_ratio(s["stored_bits"], s["bound_bits"] + s["table_bits"]),
                 ratio_to_coder=_ratio(s["stored_bits"], s["coder_bits"]),
                 share_of_stored=round(s["stored_bits"] / stored, 5) if stored else None)
    return {
        "file": str(path),
        "tensors": tensors,
        "skipped": skipped,
        "weights": weights,
        "streams": streams,
        "stored_bits": stored,
        "bound_bits": bound,
        "table_bits": tables,
        "stored_bits_per_weight": round(stored / weights, 5) if weights else None,
        "bound_bits_per_weight": round(bound / weights, 5) if weights else None,
        "bound_with_tables_bits_per_weight": round((bound + tables) / weights, 5) if weights else None,
        "ratio": _ratio(stored, bound),
        "ratio_with_tables": _ratio(stored, bound + tables),
        "coder_bits": coder,
        "coder_bits_per_weight": round(coder / weights, 5) if weights else None,
        "ratio_to_coder": _ratio(stored, coder),
        "simple_bound_bits_per_weight": round(simple_bound / weights, 5) if weights else None,
        "note": "bound: order-0 entropy n·H of each stream's symbols per tensor (params per slot kind); tables: "
                "the distinct symbols with their counts, one table per stream and tensor; simple bound: "
                "log2 C(M,N)/M + N/M per weight (mask + signs only); coder: per stream and tensor min(bound + table, "
                "fixed width)",
    }
