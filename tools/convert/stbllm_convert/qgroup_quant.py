"""k-bit group quantization for stb.qgroup.v1 (docs/format.md): w ≈ scale · code + offset, one fp16 scale and offset
per (row, group of input columns), codes in [0, 2^k).

Each group's scale and offset come from a search: the [min, max] range of the group's weights shrunk around its
centre by each factor of SHRINK, codes rounded to nearest, then one weighted least-squares refit of (scale, offset)
to those codes; the candidate with the smallest weighted squared error wins. The weights of that error are the
inputs' second moments diag(H) when calibrated (what the layer output feels), uniform otherwise.

`quantize_rtn` rounds every column to nearest (calibration-free). `quantize_gptq` is GPTQ: columns are quantized one
at a time, by default (QGroupMethod) in act-order (descending diag H), and each one's error is pushed into the not
yet quantized columns through the upper Cholesky factor of the damped inverse Hessian permuted alike (lazy batches of
128 columns); groups stay runs of `group` consecutive columns (the file's layout), and a group's scale and offset are
fitted when the first of its columns comes up, from its weights as compensated so far. Every scale and offset is rounded to fp16 before use, and
dequantized values are computed as the format does (product rounded, then the sum), so the file reproduces the
quantizer's output bit for bit.

8-bit params (params_bits = 8): given a per-row grid [rows, 2] of fp16 steps (d_scale, d_offset), every scale and
offset is rounded to fp16(d · code), code in [-127, 127] (binarize.round_to_codes), wherever fp16 rounding happens
otherwise; `row_grid` derives that grid from a round-to-nearest fit of the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

SHRINK = torch.linspace(1.0, 0.5, 11)
LAZY_BATCH = 128


@dataclass
class QGroupResult:
    q: torch.Tensor        # [rows, cols] float32, the dequantized weights (what the file reproduces)
    codes: torch.Tensor    # [rows, cols] uint8
    scales: torch.Tensor   # [rows, groups] float32 holding fp16 values
    offsets: torch.Tensor  # [rows, groups] float32 holding fp16 values
    bits: int
    group: int
    stats: dict
    param_scales: torch.Tensor | None = None  # [rows, 2] fp16 (d_scale, d_offset) when params are 8-bit codes


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def _codes(x, scale, offset, levels):
    """Nearest codes of x [rows, g] for per-row scale and offset [rows, 1]."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, torch.round((x - offset) / safe), torch.zeros_like(x)).clamp(0, levels)


def _rounders(grid: torch.Tensor | None):
    """How scales and offsets are stored: fp16 (grid None), or 8-bit codes under the row's (d_scale, d_offset)."""
    if grid is None:
        return _f16, _f16
    from .binarize import round_to_codes

    return (lambda t: round_to_codes(t, grid[:, 0:1])), (lambda t: round_to_codes(t, grid[:, 1:2]))


def row_grid(w: torch.Tensor, bits: int, group: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row steps [rows, 2] (d_scale, d_offset) of 8-bit params: the largest |scale| and |offset| of a
    round-to-nearest fit of w (fp16 params) map to code 127."""
    from .binarize import super_scales

    fit = quantize_rtn(w, bits, group, importance)
    return super_scales(torch.stack([fit.scales, fit.offsets], 2))


def dequantize(codes, scale, offset):
    """scale · code + offset with two roundings, as the format defines it (torch does not fuse separate ops)."""
    return scale * codes + offset


def fit_group(x: torch.Tensor, bits: int, importance: torch.Tensor | None = None, grid: torch.Tensor | None = None):
    """(scale, offset) [rows, 1] for the weights x [rows, g] of one group, rounded as stored (fp16, or 8-bit codes
    under grid [rows, 2]), minimizing Σ importance_j (scale · code_j + offset − x_j)² over the shrink candidates
    and their least-squares refits."""
    round_scale, round_offset = _rounders(grid)
    levels = (1 << bits) - 1
    h = torch.ones(x.shape[1], dtype=x.dtype, device=x.device) if importance is None else importance.to(x.dtype)
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_offset = torch.zeros_like(lo), round_offset(lo)
    for p in SHRINK.tolist():
        scale, offset = round_scale(2 * p * half / levels), round_offset(centre - p * half)
        for refit in (False, True):
            if refit:  # least squares for (scale, offset) given the codes: a 2 x 2 system per row
                c = _codes(x, scale, offset, levels)
                s_h, s_c, s_cc = h.sum(), (c * h).sum(1, keepdim=True), (c * c * h).sum(1, keepdim=True)
                s_x, s_cx = (x * h).sum(1, keepdim=True), (c * x * h).sum(1, keepdim=True)
                det = s_cc * s_h - s_c * s_c
                ok = det > 1e-12 * s_h * s_cc.clamp(min=1)
                safe = torch.where(ok, det, torch.ones_like(det))
                scale = torch.where(ok, round_scale((s_cx * s_h - s_c * s_x) / safe), scale)
                offset = torch.where(ok, round_offset((s_cc * s_x - s_c * s_cx) / safe), offset)
                scale, offset = torch.where(scale > 0, scale, 0), offset
            err = ((dequantize(_codes(x, scale, offset, levels), scale, offset) - x) ** 2 * h).sum(1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def _empty(w, bits, group, grid):
    rows, cols = w.shape
    groups = -(-cols // group)
    return QGroupResult(q=torch.zeros_like(w), codes=torch.zeros(w.shape, dtype=torch.uint8, device=w.device),
                        scales=torch.zeros((rows, groups), device=w.device),
                        offsets=torch.zeros((rows, groups), device=w.device), bits=bits, group=group, stats={},
                        param_scales=grid)


def quantize_rtn(w: torch.Tensor, bits: int, group: int, importance: torch.Tensor | None = None,
                 grid: torch.Tensor | None = None) -> QGroupResult:
    """Round to nearest, group by group (importance [cols]: optional per-input weights of the fit; grid [rows, 2]:
    the steps of 8-bit params, None for fp16 params)."""
    w = w.float()
    out = _empty(w, bits, group, grid)
    levels = (1 << bits) - 1
    for g, s in enumerate(range(0, w.shape[1], group)):
        e = min(s + group, w.shape[1])
        scale, offset = fit_group(w[:, s:e], bits, None if importance is None else importance[s:e], grid)
        codes = _codes(w[:, s:e], scale, offset, levels)
        out.codes[:, s:e], out.q[:, s:e] = codes.to(torch.uint8), dequantize(codes, scale, offset)
        out.scales[:, g], out.offsets[:, g] = scale[:, 0], offset[:, 0]
    return out


def act_order(h: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: the columns by descending diag(H) (ties in column order), the inputs with the most energy
    first, so their errors can still be pushed into the many columns after them."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


_last_factor: list = [None, None]  # (H, its act-order and factor): one entry, see act_order_factor


def act_order_factor(h: torch.Tensor):
    """(act_order(h), the upper Cholesky factor of the damped inverse of H permuted by it). The last H's answer is
    kept: q/k/v (and gate/up) share one H object, and the allocator tries every candidate on the same H."""
    from .binarize import inverse_hessian_factor

    if _last_factor[0] is not h:
        order = act_order(h)
        _last_factor[:] = h, (order, inverse_hessian_factor(h[order][:, order]))
    return _last_factor[1]


def quantize_gptq(w: torch.Tensor, u: torch.Tensor, bits: int, group: int, importance: torch.Tensor | None = None,
                  order: torch.Tensor | None = None, grid: torch.Tensor | None = None) -> QGroupResult:
    """GPTQ with static groups of `group` consecutive columns (the file's layout) quantized in `order` (a
    permutation of the columns, e.g. act_order(H); None: column order). u: upper Cholesky factor of the damped
    inverse Hessian permuted by `order` (H[order][:, order]); importance: diag(H) in column order for the group fits
    (None: uniform). A group is fitted when the first of its columns comes up, from its columns as compensated so
    far (those beyond the lazy batch get the batch's pending updates first). grid [rows, 2]: the steps of 8-bit
    params (None: fp16 params)."""
    w = w.float()
    rows, cols = w.shape
    order = torch.arange(cols, device=w.device) if order is None else order.to(w.device)
    position = torch.empty_like(order)
    position[order] = torch.arange(cols, device=w.device)  # column -> its place in the order
    w = w[:, order].clone()  # in quantization order from here on
    out = _empty(w, bits, group, grid)
    levels = (1 << bits) - 1
    fitted = [False] * out.scales.shape[1]
    for b0 in range(0, cols, LAZY_BATCH):
        b1 = min(b0 + LAZY_BATCH, cols)
        w1, u1 = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.zeros_like(w1)
        for i in range(b1 - b0):
            column = int(order[b0 + i])
            g = column // group
            if not fitted[g]:
                s, e = g * group, min(g * group + group, cols)
                at = position[s:e]  # all at or after b0 + i: this is the group's first column in the order
                x = torch.where((at < b1)[None], w1[:, (at - b0).clamp(max=b1 - b0 - 1)],
                                w[:, at] - err[:, :i] @ u[b0:b0 + i, at])
                scale, offset = fit_group(x, bits, None if importance is None else importance[s:e], grid)
                out.scales[:, g], out.offsets[:, g] = scale[:, 0], offset[:, 0]
                fitted[g] = True
            scale, offset = out.scales[:, g:g + 1], out.offsets[:, g:g + 1]
            x = w1[:, i:i + 1]
            codes = _codes(x, scale, offset, levels)
            q = dequantize(codes, scale, offset)
            out.codes[:, column], out.q[:, column] = codes[:, 0].to(torch.uint8), q[:, 0]
            err[:, i] = (x - q)[:, 0] / u1[i, i]
            w1[:, i:] -= err[:, i:i + 1] * u1[i:i + 1, i:]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return out
