"""The compact storage of stb.binary-groups.v2 (docs/format.md): encode the planes a calibrated binarizer produces
into the file's streams, and decode them back. Numpy, but for the rANS label coder, which is the runtime's own
(engine/format/rans.cpp: sequential decoding does not vectorize); the C++ reader (engine/format/binary_groups.cpp)
decodes the same streams for the runtime.

Every stream stores only what the data needs: the N:M mask as one colex rank of the kept subset per group of M,
signs of kept weights only, region labels of kept non-salient weights only (rANS-coded, about n·H bits; or fixed
width, 5 base-3 labels per byte when there are three regions), order-2 signs of kept salient weights only.
"""
from __future__ import annotations

import math

import numpy as np

from . import _core
from ._core import FormatError

CODEC = "stb.binary-groups.v2"
LABEL_CODER = "rans"  # the one entropy coder of the labels stream ("label_coder" param)

# BINOMIAL[n, k] = C(n, k) for n, k <= 64, as uint64 (C(64, 32) < 2**63).
BINOMIAL = np.zeros((65, 65), dtype=np.uint64)
for _n in range(65):
    for _k in range(_n + 1):
        BINOMIAL[_n, _k] = math.comb(_n, _k)


def rank_width(m: int, n: int) -> int:
    """Bits of one mask code: a colex rank in [0, C(m, n))."""
    return (math.comb(m, n) - 1).bit_length()


def mask_layout(cols: int, n: int, m: int) -> tuple[int, int, int]:
    """(full groups G, tail width g, kept in the tail) of one row under an exact N:M mask."""
    full, tail = divmod(cols, m)
    return full, tail, math.ceil(n * tail / m)


def mask_bits_per_row(cols: int, n: int, m: int) -> int:
    full, tail, tail_kept = mask_layout(cols, n, m)
    return full * rank_width(m, n) + (rank_width(tail, tail_kept) if tail else 0)


def kept_per_row(cols: int, n: int, m: int) -> int:
    full, _, tail_kept = mask_layout(cols, n, m)
    return full * n + tail_kept


def _bits_lsb_first(values: np.ndarray, width: int) -> np.ndarray:
    """uint64 [..., k] -> bool [..., k * width], each value's bits least significant first."""
    if width == 0:
        return np.zeros((*values.shape[:-1], 0), dtype=bool)
    shifts = np.arange(width, dtype=np.uint64)
    return ((values[..., None] >> shifts) & np.uint64(1)).astype(bool).reshape(*values.shape[:-1], -1)


def _values_lsb_first(bits: np.ndarray, width: int) -> np.ndarray:
    """Inverse of _bits_lsb_first: bool [..., k * width] -> uint64 [..., k] (width > 0)."""
    b = bits.reshape(*bits.shape[:-1], -1, width).astype(np.uint64)
    return (b << np.arange(width, dtype=np.uint64)).sum(axis=-1, dtype=np.uint64)


def _colex_rank(keep: np.ndarray) -> np.ndarray:
    """bool [..., m] with the same count k in every group -> uint64 colex rank sum_i C(c_i, i), c_1 < ... < c_k."""
    m = keep.shape[-1]
    position_in_subset = np.cumsum(keep, axis=-1)  # i for the i-th kept column (1-based)
    terms = BINOMIAL[np.arange(m), np.minimum(position_in_subset, 64)]
    return np.where(keep, terms, np.uint64(0)).sum(axis=-1, dtype=np.uint64)


def _colex_unrank(rank: np.ndarray, m: int, k: int) -> np.ndarray:
    """uint64 ranks -> bool [..., m] subsets of size k (inverse of _colex_rank)."""
    rank = rank.astype(np.uint64).copy()
    keep = np.zeros((*rank.shape, m), dtype=bool)
    for i in range(k, 0, -1):
        # c_i = the largest c with C(c, i) <= rank; C(c, i) = 0 for c < i, so counting all c <= rank works.
        c = (BINOMIAL[:m, i] <= rank[..., None]).sum(axis=-1) - 1
        np.put_along_axis(keep, c[..., None], True, axis=-1)
        rank -= BINOMIAL[c, i]
    return keep


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(bits, dtype=bool).reshape(-1), bitorder="little")


def _unpack(stream: np.ndarray, count: int, what: str) -> np.ndarray:
    """The first `count` bits of a stream, which must hold exactly those and zero padding (the C++ decoder's
    rules, so that the Python reader accepts exactly what the runtime accepts)."""
    bits = np.unpackbits(np.asarray(stream, dtype=np.uint8), bitorder="little")
    if bits.size < count:
        raise FormatError(f"{what} stream ends before the weights it describes")
    if bits[count:].any():
        raise FormatError(f"{what} stream has non-zero padding bits")
    return bits[:count].astype(bool)



def sign_plane(signs, block: int):
    """signs as a bool [rows, cols] array, with rows and cols; ValueError for a non-matrix or a bad block size."""
    signs = np.asarray(signs, dtype=bool)
    if signs.ndim != 2:
        raise ValueError("signs must be 2-D")
    if block % 64 or not 64 <= block <= 4096:
        raise ValueError(f"block must be a multiple of 64 in [64, 4096], got {block}")
    return signs, *signs.shape

def encode_mask(keep: np.ndarray, n: int, m: int) -> np.ndarray:
    """Exact N:M keep-mask [rows, cols] -> the `mask` stream. Every full group of m keeps exactly n and a ragged
    tail of g columns keeps exactly ceil(n*g/m) (what the converter's N:M selection produces)."""
    rows, cols = keep.shape
    full, tail, tail_kept = mask_layout(cols, n, m)
    groups = keep[:, :full * m].reshape(rows, full, m)
    if (groups.sum(axis=2) != n).any():
        raise ValueError(f"the mask must keep exactly {n} of every {m} weights")
    parts = [_bits_lsb_first(_colex_rank(groups), rank_width(m, n))]
    if tail:
        tail_mask = keep[:, full * m:]
        if (tail_mask.sum(axis=1) != tail_kept).any():
            raise ValueError(f"the ragged last group of {tail} weights must keep exactly {tail_kept}")
        parts.append(_bits_lsb_first(_colex_rank(tail_mask)[:, None], rank_width(tail, tail_kept)))
    return _pack(np.concatenate(parts, axis=1))


def decode_mask(stream: np.ndarray, rows: int, cols: int, n: int, m: int) -> np.ndarray:
    full, tail, tail_kept = mask_layout(cols, n, m)
    width, tail_width = rank_width(m, n), (rank_width(tail, tail_kept) if tail else 0)
    bits = _unpack(stream, rows * mask_bits_per_row(cols, n, m), "mask").reshape(rows, -1)
    keep = np.zeros((rows, cols), dtype=bool)
    def ranks(field, count, w, group, kept):  # a width-0 code is the only subset: rank 0
        r = _values_lsb_first(field, w) if w else np.zeros((rows, count), np.uint64)
        if (r >= np.uint64(math.comb(group, kept))).any():
            raise FormatError(f"an N:M mask code is out of range (>= C({group}, {kept}))")
        return r

    keep[:, :full * m] = _colex_unrank(ranks(bits[:, :full * width], full, width, m, n), m, n).reshape(rows, -1)
    if tail:
        keep[:, full * m:] = _colex_unrank(ranks(bits[:, full * width:], 1, tail_width, tail, tail_kept)[:, 0],
                                           tail, tail_kept)
    return keep


def encode_labels(labels: np.ndarray, regions: int, coder: str | None = None) -> np.ndarray:
    """Region labels 0..regions-1 (1-D) -> the `labels` stream: with coder "rans" an order-0 rANS stream
    (about n·H bits); else fixed width, 1 bit each for 2 regions, 5 per byte for 3."""
    if coder == LABEL_CODER:
        return _core.rans_encode(np.ascontiguousarray(labels, dtype=np.uint8), regions)
    if regions == 2:
        return _pack(labels == 1)
    trits = np.zeros(-(-labels.size // 5) * 5, dtype=np.uint8)
    trits[:labels.size] = labels
    return (trits.reshape(-1, 5).astype(np.uint16) * np.array([1, 3, 9, 27, 81], np.uint16)).sum(axis=1).astype(
        np.uint8)


def decode_labels(stream: np.ndarray, count: int, regions: int, coder: str | None = None) -> np.ndarray:
    if coder == LABEL_CODER:  # the runtime's decoder: a rANS stream is sequential, too slow for a numpy loop
        return _core.rans_decode(np.asarray(stream, dtype=np.uint8), count, regions)
    if regions == 2:
        return _unpack(stream, count, "labels").astype(np.uint8)
    stream = np.asarray(stream, dtype=np.uint8)
    if stream.size * 5 < count:
        raise FormatError("labels stream ends before the weights it describes")
    if (stream >= 243).any():
        raise FormatError("a label byte is >= 243 (not 5 base-3 digits)")
    digits = ((stream[:, None].astype(np.uint16) // np.array([1, 3, 9, 27, 81], np.uint16)) % 3).reshape(-1)
    if digits[count:].any():
        raise FormatError("labels stream has non-zero padding digits")
    return digits[:count].astype(np.uint8)


def expand_params(codes, scales) -> np.ndarray:
    """8-bit params (params_bits = 8) -> their fp16 values: codes int8 [rows, blocks, slots] in [-127, 127], scales
    fp16 [rows, slots], finite and >= 0; p = fp16(float32(scale) * code), rounded to nearest even (the product is
    exact in float32). Raises FormatError where the C++ reader would."""
    codes, scales = np.asarray(codes, dtype=np.int8), np.asarray(scales, dtype="<f2")
    if (codes == -128).any():
        raise FormatError("a param code is -128 (codes are -127..127)")
    if not np.isfinite(scales).all() or np.signbit(scales).any():
        raise FormatError("a param scale is negative or not finite")
    with np.errstate(over="ignore"):
        values = (scales.astype(np.float32)[:, None, :] * codes.astype(np.float32)).astype("<f2")
    if not np.isfinite(values).all():
        raise FormatError("a param overflows fp16")
    return values


def param_codes(params, scales) -> np.ndarray:
    """The int8 codes of fp16 params that expand_params(codes, scales) reproduces exactly; ValueError if some
    param is not of that form (the quantizer must round its params with these scales)."""
    scales = np.asarray(scales, dtype="<f2")
    s32 = scales.astype(np.float32)[:, None, :]
    ratio = np.divide(np.asarray(params, dtype=np.float32), s32, out=np.zeros(np.shape(params), np.float32),
                      where=s32 > 0)
    codes = np.clip(np.rint(ratio), -127, 127).astype(np.int8)
    if not np.array_equal(expand_params(codes, scales), np.asarray(params, dtype="<f2")):
        raise ValueError("params are not 8-bit codes times their per-(row, slot) scales")
    return codes


def param_slots(regions: int, salient_groups: int = 1) -> int:
    """Params per (row, block): alpha, mu of each region, then alpha1, mu1, alpha2, mu2 of each salient group."""
    return 2 * regions + 4 * salient_groups


def encode(signs, labels, salient, residual, params, regions: int, block: int, mask=None, nm=None,
           param_scales=None, label_coder: str | None = LABEL_CODER, salient_labels=None):
    """The planes of a calibrated binarizer -> (params JSON, components, paper bits). signs: bool [rows, cols]
    first-order signs (True = +1); labels: uint8 [rows, cols] region of each non-salient weight; salient: bool
    [cols]; residual: bool [rows, cols] order-2 signs (read in salient columns only); params: [rows, blocks,
    param_slots(regions, G)] (stored fp16); mask/nm: exact N:M keep-mask (False = exactly zero) and its (N, M), or
    None; param_scales: fp16 [rows, slots] to store params as 8-bit codes under them (params_bits = 8), or None;
    label_coder: "rans" (default) to entropy-code the labels, None for the fixed-width labels; salient_labels: bool
    [rows, cols], the salient group (True = the second) of each salient weight (ARB's column-group bitmap:
    salient_groups G = 2), or None for one salient group."""
    signs, rows, cols = sign_plane(signs, block)
    if not 1 <= regions <= 3:
        raise ValueError("regions must be 1, 2 or 3")
    if label_coder not in (None, LABEL_CODER):
        raise ValueError(f"label_coder must be {LABEL_CODER!r} or None, got {label_coder!r}")
    params = np.asarray(params, dtype="<f2")
    salient_groups = 1 if salient_labels is None else 2
    shape = (rows, -(-cols // block), param_slots(regions, salient_groups))
    if params.shape != shape:
        raise ValueError(f"params must have shape {shape}, got {params.shape}")
    salient = np.asarray(salient, dtype=bool)
    labels = np.asarray(labels, dtype=np.uint8)
    residual = np.asarray(residual, dtype=bool)
    salient_labels = None if salient_labels is None else np.asarray(salient_labels, dtype=bool)
    if salient.shape != (cols,) or labels.shape != (rows, cols) or residual.shape != (rows, cols) or (
            salient_labels is not None and salient_labels.shape != (rows, cols)):
        raise ValueError("salient must be [cols], labels, residual and salient_labels [rows, cols]")
    if (mask is None) != (nm is None):
        raise ValueError("a mask and its nm pattern go together")
    keep = np.ones((rows, cols), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if keep.shape != (rows, cols):
        raise ValueError(f"mask shape {keep.shape} != signs shape {(rows, cols)}")
    components = {}
    if mask is not None:
        n, m = (int(x) for x in nm)
        if not 1 <= n <= m <= 64:
            raise ValueError(f"bad N:M {n}:{m}")
        components["mask"] = encode_mask(keep, n, m)
        nm = [n, m]
    kept_salient = keep & salient[None, :]
    kept_plain = keep & ~salient[None, :]
    components["signs"] = _pack(signs[keep])
    if regions > 1 and kept_plain.any():
        plain_labels = labels[kept_plain]
        if (plain_labels >= regions).any():
            raise ValueError(f"a region label is >= regions ({regions})")
        components["labels"] = encode_labels(plain_labels, regions, label_coder)
    components["salient"] = _pack(salient)
    n_kept_salient = int(kept_salient.sum())
    if n_kept_salient:
        components["residual"] = _pack(residual[kept_salient])
        if salient_labels is not None:
            components["salient_labels"] = _pack(salient_labels[kept_salient])
    json_params = {"block": int(block), "nm": nm, "regions": int(regions), "salient_columns": int(salient.sum()),
                   "kept_salient": n_kept_salient}
    if salient_groups > 1:
        json_params["salient_groups"] = salient_groups
    if regions > 1 and label_coder:
        json_params["label_coder"] = label_coder
    if param_scales is None:
        components["params"] = params
    else:
        param_scales = np.asarray(param_scales, dtype="<f2")
        if param_scales.shape != (rows, shape[2]):
            raise ValueError(f"param_scales must have shape {(rows, shape[2])}, got {param_scales.shape}")
        components["params"] = param_codes(params, param_scales)
        components["param_scales"] = param_scales
        json_params["params_bits"] = 8
    components = {k: v for k, v in components.items() if v.size}  # an empty stream is absent
    return json_params, components, int(keep.sum()) + n_kept_salient


def dequantize(component, shape, p: dict) -> np.ndarray:
    """float32 [rows, cols] exactly as docs/format.md defines it; component(key) returns a stream's bytes."""
    rows, cols = shape
    block, regions = p["block"], p["regions"]
    if p["nm"] is None:
        keep = np.ones((rows, cols), dtype=bool)
    else:
        keep = decode_mask(component("mask"), rows, cols, *p["nm"])
    salient = _unpack(component("salient"), cols, "salient")
    kept_salient = keep & salient[None, :]
    kept_plain = keep & ~salient[None, :]
    s = np.zeros((rows, cols), dtype=bool)
    s[keep] = _unpack(component("signs"), int(keep.sum()), "signs")
    labels = np.zeros((rows, cols), dtype=np.int64)
    if regions > 1:
        labels[kept_plain] = decode_labels(component("labels"), int(kept_plain.sum()), regions,
                                           p.get("label_coder"))
    t = np.zeros((rows, cols), dtype=bool)
    if int(kept_salient.sum()) != p["kept_salient"]:
        raise FormatError(f"{int(kept_salient.sum())} kept salient weights, params say {p['kept_salient']}")
    t[kept_salient] = _unpack(component("residual"), p["kept_salient"], "residual")
    salient_groups = p.get("salient_groups", 1)
    group = np.zeros((rows, cols), dtype=np.int64)  # the salient group of each kept salient weight
    if salient_groups == 2:
        group[kept_salient] = _unpack(component("salient_labels"), p["kept_salient"], "salient_labels")

    def pm(bits):
        return np.where(bits, np.float32(1), np.float32(-1))

    slots = param_slots(regions, salient_groups)
    if p.get("params_bits") == 8:
        params = expand_params(component("params").view(np.int8).reshape(rows, -1, slots),
                               component("param_scales").view("<f2").reshape(rows, slots)).astype(np.float32)
    else:
        params = component("params").view("<f2").reshape(rows, -1, slots).astype(np.float32)
    per_col = np.repeat(params, block, axis=1)[:, :cols]  # [rows, cols, slots]

    def slot(index, columns=slice(None)):
        return np.take_along_axis(per_col[:, columns], index[..., None], axis=2)[..., 0]
    values = slot(2 * labels) * pm(s) + slot(2 * labels + 1)
    first = 2 * regions + 4 * group[:, salient]  # alpha1 of each salient weight's group
    s_sal, t_sal = pm(s[:, salient]), pm(t[:, salient])
    values[:, salient] = ((slot(first, salient) * s_sal + slot(first + 1, salient))
                          + (slot(first + 2, salient) * t_sal + slot(first + 3, salient)))
    return np.where(keep, values, np.float32(0))
