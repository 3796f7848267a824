"""stb.row-col-sign.v1 (docs/format.md): sign matrices with row and column scales, the form of ARB-RC and OneBit.

w[r, j] = (a_r[r, j / block] * s) * a_c[j] for a kept weight, plus (b_r[r, j / block] * t) * b_c[k] when j is the
k-th salient column; 0 for a pruned one. With groups 2 (ARB-RC's column-group bitmap) a group plane picks, per kept
weight, which of two sets of these four scales applies. The runtime never builds w: per group it scales the input
by a_c, runs the sign kernels with a_r as their per-(row, block) scales, and adds the small salient plane.
Pure numpy; the C++ reader (engine/format/stb_reader.cpp) checks the same rules.
"""
from __future__ import annotations

import numpy as np

from ._core import FormatError
from .binary_groups import sign_plane

CODEC = "stb.row-col-sign.v1"
GROUP1_PREFIX = "group1_"  # the second group's scale components: group1_row_scales, group1_col_scales, ...


def _pack(bits: np.ndarray) -> np.ndarray:
    from .stbfile import pack_bits
    return pack_bits(np.asarray(bits, dtype=bool))


def _unpack(words: np.ndarray, cols: int) -> np.ndarray:
    from .stbfile import unpack_bits
    return unpack_bits(words, cols)


def encode(signs, row_scales, col_scales, block: int, mask=None, nm=None, salient=None, residual=None,
           residual_row_scales=None, residual_col_scales=None, group=None, group1=None):
    """signs: bool [rows, cols] (True = +1); row_scales: [rows, ceil(cols / block)]; col_scales: [cols];
    mask: bool keep-mask or None, with nm (N, M); salient: bool [cols] or None; residual: bool [rows, S] (the
    order-2 signs of the S salient columns, in column order) with residual_row_scales [rows, blocks] and
    residual_col_scales [S]. group: bool [rows, cols] or None, the weights of the second scale group, whose scales
    group1 holds as a dict with the four scale keys above (same shapes). Scales are stored as fp16.
    Returns (params, components, paper_bits)."""
    signs, rows, cols = sign_plane(signs, block)
    blocks = -(-cols // block)
    keep = np.ones_like(signs) if mask is None else np.asarray(mask, dtype=bool)
    if keep.shape != signs.shape:
        raise ValueError(f"mask shape {keep.shape} != signs shape {signs.shape}")
    if (mask is None) != (nm is None):
        raise ValueError("a mask and its nm pattern go together")
    if nm is not None and not 1 <= int(nm[0]) <= int(nm[1]) <= 64:
        raise ValueError(f"bad N:M {nm[0]}:{nm[1]}")
    if (group is None) != (group1 is None):
        raise ValueError("a group plane and the second group's scales go together")

    def scales(name, a, shape):
        a = np.asarray(a, dtype="<f2")
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
        return a

    components = {"signs": _pack(signs & keep)}
    if mask is not None:
        components["mask"] = _pack(keep)
    sal = np.zeros(cols, dtype=bool) if salient is None else np.asarray(salient, dtype=bool)
    if sal.shape != (cols,):
        raise ValueError(f"salient must have shape {(cols,)}")
    count = int(sal.sum())
    shapes = {"row_scales": (rows, blocks), "col_scales": (cols,)}
    if count:
        shapes.update(residual_row_scales=(rows, blocks), residual_col_scales=(count,))
    main = {"row_scales": row_scales, "col_scales": col_scales, "residual_row_scales": residual_row_scales,
            "residual_col_scales": residual_col_scales}

    def add_scales(prefix, values, keys):
        for key in keys:
            components[prefix + key] = scales(prefix + key, values[key], shapes[key])
    add_scales("", main, ("row_scales", "col_scales"))
    paper_bits = int(keep.sum())
    if count:
        res = np.asarray(residual, dtype=bool)
        if res.shape != (rows, count):
            raise ValueError(f"residual must have shape {(rows, count)}, got {res.shape}")
        components["salient"] = _pack(sal[None])[0]
        components["residual"] = _pack(res & keep[:, sal])
        add_scales("", main, ("residual_row_scales", "residual_col_scales"))
        paper_bits += int(keep[:, sal].sum())
    if group is not None:
        g = np.asarray(group, dtype=bool)
        if g.shape != signs.shape:
            raise ValueError(f"group must have shape {signs.shape}, got {g.shape}")
        components["group"] = _pack(g & keep)
        add_scales(GROUP1_PREFIX, group1, shapes)
    params = {"block": int(block), "nm": None if nm is None else [int(nm[0]), int(nm[1])],
              "salient_columns": count}
    if group is not None:
        params["groups"] = 2
    return params, components, paper_bits


def decode(stream, shape, params) -> dict:
    """The tensor's parts from stream(key) -> uint8 array, checking what the C++ reader checks: sign, residual and
    group bits clear for pruned weights and past the last column, the salient bitmap's count and tail.
    Returns keep, s, salient (column indices), t, and groups: per scale group a dict of its kept weights (keep),
    a_r (per column), a_c, b_r (per salient column), b_c."""
    rows, cols = shape
    block, count = params["block"], params["salient_columns"]
    blocks = -(-cols // block)

    def plane(key, width):
        words = stream(key).view("<u8").reshape(rows, -1)
        if width % 64 and (words[:, -1] >> np.uint64(width % 64)).any():
            raise FormatError(f"{key} has bits set past the last column")
        return _unpack(words, width)

    keep = plane("mask", cols) if params.get("nm") is not None else np.ones((rows, cols), dtype=bool)
    s = plane("signs", cols)
    if (s & ~keep).any():
        raise FormatError("a pruned weight has its sign bit set")
    column_block = np.arange(cols) // block
    out = {"keep": keep, "s": s, "salient": np.zeros(0, dtype=np.int64)}
    if count:
        bitmap = _unpack(stream("salient").view("<u8")[None], cols)[0]
        words = stream("salient").view("<u8")
        if cols % 64 and words[-1] >> np.uint64(cols % 64):
            raise FormatError("salient bitmap has bits set past the last column")
        if int(bitmap.sum()) != count:
            raise FormatError(f"salient bitmap has {int(bitmap.sum())} columns set, params say {count}")
        out["salient"] = np.flatnonzero(bitmap)
        out["t"] = plane("residual", count)
        if (out["t"] & ~keep[:, out["salient"]]).any():
            raise FormatError("a pruned weight has its residual sign bit set")
    members = [keep]
    if params.get("groups") == 2:
        high = plane("group", cols)
        if (high & ~keep).any():
            raise FormatError("a pruned weight has its group bit set")
        members = [keep & ~high, high]
    out["groups"] = []
    for prefix, member in zip(("", GROUP1_PREFIX), members):
        group = {"keep": member, "a_c": stream(prefix + "col_scales").view("<f2").astype(np.float32),
                 "a_r": stream(prefix + "row_scales").view("<f2").reshape(rows, blocks)
                 .astype(np.float32)[:, column_block]}
        if count:
            group.update(b_c=stream(prefix + "residual_col_scales").view("<f2").astype(np.float32),
                         b_r=stream(prefix + "residual_row_scales").view("<f2").reshape(rows, blocks)
                         .astype(np.float32)[:, column_block[out["salient"]]])
        out["groups"].append(group)
    return out


def _plus_minus(bits):
    one = np.float32(1)
    return np.where(bits, one, -one)


def dequantize(stream, shape, params) -> np.ndarray:
    """float32 [rows, cols], with the format's order of operations."""
    p = decode(stream, shape, params)
    w = np.zeros(shape, dtype=np.float32)
    for g in p["groups"]:
        wg = (g["a_r"] * _plus_minus(p["s"])) * g["a_c"][None]
        if len(p["salient"]):
            j = p["salient"]
            wg[:, j] = wg[:, j] + (g["b_r"] * _plus_minus(p["t"])) * g["b_c"][None]
        w = np.where(g["keep"], wg, w)
    return w


def runtime_parts(stream, shape, params):
    """What the runtime multiplies: ([(main [rows, cols] = a_r * s on the group's kept weights, a_c [cols]) per
    scale group], the salient plane [rows, cols] dequantized). The runtime computes
    x -> sum over groups of q8(x * a_c) @ main^T, plus x @ salient^T."""
    p = decode(stream, shape, params)
    mains, salient = [], np.zeros(shape, dtype=np.float32)
    for g in p["groups"]:
        mains.append((np.where(g["keep"], g["a_r"] * _plus_minus(p["s"]), np.float32(0)), g["a_c"]))
        if len(p["salient"]):
            j = p["salient"]
            salient[:, j] += np.where(g["keep"][:, j], (g["b_r"] * _plus_minus(p["t"])) * g["b_c"][None], 0)
    return mains, salient
