"""ARB-LLM's alternating refined binarization (REFERENCE_ALGORITHMS.md §3) and OneBit's sign-value-independent
decomposition (§4).

- `arb_binarize`: ARB's first- and second-order binarizers (alternating updates of the mean mu, the scales alpha and
  the signs B, per row over a mask) and ARB-X's refinement of mu and alpha under the block's input Gram matrix S.
  They plug into the shared block quantizer (binarize.quantize_groups) in place of BiLLM's residual binarizer.
- `quantize_rowcol`: ARB-RC, W ~ diag(alpha_r) B diag(alpha_c) per block with no mean, order 2 on the searched
  salient columns, with block OBC; with cgb (ARB-LLM's column-group bitmap) each block's weights split by searched
  magnitude break points into two groups with their own row and column scales; stored as stb.row-col-sign.v1.
- `rank1_nonnegative`: the rank-1 non-negative factors of |W| for OneBit's W ~ sign(W) (a b^T).

Every update below is the exact minimizer of the squared error in its variable with the others fixed (weight space,
or S-weighted for ARB-X), so the error never increases from one iteration to the next.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .binarize import search_break_points, search_salient_columns, search_salient_split, to_f16

ARB_ITERS = 15  # ARB-LLM's T


def _masked_mean(x, m, count):
    return (x * m).sum(1, keepdim=True) / count


def _nearest_levels(d, alphas):
    """Signs (K x bool [rows, n]) of the level sum_k alpha_k b_k (b = +-1) nearest to d; alphas: K x [rows, 1]."""
    best, best_err = None, None
    for code in range(1 << len(alphas)):
        bits = [bool(code >> k & 1) for k in range(len(alphas))]
        level = sum(a if b else -a for a, b in zip(alphas, bits))
        err = (d - level).abs()
        if best is None:
            best, best_err = [torch.full_like(d, b, dtype=torch.bool) for b in bits], err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = [torch.where(better, torch.tensor(b, device=d.device), s) for s, b in zip(best, bits)]
    return best


def arb_binarize(x: torch.Tensor, mask: torch.Tensor, order: int, iters: int = ARB_ITERS,
                 gram: torch.Tensor | None = None, round_f16: bool = True, history: list | None = None):
    """ARB on x [rows, n] over mask: x ~ mu + sum_k alpha_k B_k per row (one shared mean; order 1 or 2).

    Initialized as BiLLM's residual binarization, then `iters` rounds of: mu <- mean(x - sum alpha B); each alpha_k
    <- <B_k, x - mu - sum_{l != k} alpha_l B_l> / n; the signs jointly <- the nearest of the 2^order levels.
    With gram (S [n, n], the block's input Gram matrix: ARB-X), `iters` more rounds refine mu and the alphas with B
    fixed, each minimizing sum_rows r^T S r of the row's masked residual r. Then alpha and mu are rounded to fp16
    (round_f16) and q is computed in the order of the stb.binary-groups.v2 formulas: alpha*s + mu (order 1);
    (alpha1*s + mu) + (alpha2*t + 0) (order 2).

    history, if given, receives the error after each round: the squared error, then (ARB-X) the S-weighted one.
    Returns (q, alphas [rows, order], mus [rows, order] (mu, then zeros), signs [order, rows, n] bool & mask)."""
    m = mask.to(x.dtype)
    count = m.sum(1, keepdim=True).clamp(min=1)
    xm = x * m
    mu = torch.zeros_like(count)
    alphas, signs, residual = [], [], xm
    for _ in range(order):  # BiLLM's residual initialization; the per-order means add up to the shared one
        mu_k = _masked_mean(residual, m, count)
        dev = residual - mu_k
        alphas.append(_masked_mean(dev.abs(), m, count))
        signs.append(dev >= 0)
        residual = (residual - (torch.where(signs[-1], alphas[-1], -alphas[-1]) + mu_k)) * m
        mu = mu + mu_k

    def approx():
        return (mu + sum(torch.where(s, a, -a) for s, a in zip(signs, alphas))) * m

    def sse():
        return float(((xm - approx()) ** 2).sum())

    for _ in range(iters):
        mu = _masked_mean(x - sum(torch.where(s, a, -a) for s, a in zip(signs, alphas)), m, count)
        for k in range(order):
            others = sum((torch.where(s, a, -a) for i, (s, a) in enumerate(zip(signs, alphas)) if i != k),
                         torch.zeros_like(x))
            alphas[k] = _masked_mean(torch.where(signs[k], 1.0, -1.0) * (x - mu - others), m, count)
        signs = _nearest_levels(x - mu, alphas)
        if history is not None:
            history.append(sse())

    if gram is not None:
        # Basis of the row's approximation: the mask (for mu) and each masked sign vector (for its alpha).
        basis = [m] + [torch.where(s, 1.0, -1.0).to(x.dtype) * m for s in signs]
        basis_s = [v @ gram for v in basis]  # S is symmetric: (S v_i)^T for every row at once
        norms = [(v * vs).sum(1, keepdim=True) for v, vs in zip(basis, basis_s)]
        coef = [mu, *alphas]

        def weighted_error():
            r = xm - sum(c * v for c, v in zip(coef, basis))
            return float(((r @ gram) * r).sum())

        for _ in range(iters):
            for k in range(len(basis)):
                rest = xm - sum(c * v for i, (c, v) in enumerate(zip(coef, basis)) if i != k)
                update = (basis_s[k] * rest).sum(1, keepdim=True) / norms[k].clamp(min=1e-30)
                coef[k] = torch.where(norms[k] > 0, update, coef[k])
            if history is not None:
                history.append(weighted_error())
        mu, alphas = coef[0], coef[1:]

    if round_f16:
        mu, alphas = to_f16(mu), [to_f16(a) for a in alphas]
    signs = [s & mask for s in signs]
    first = alphas[0] * torch.where(signs[0], 1.0, -1.0) + mu
    q = first if order == 1 else first + (alphas[1] * torch.where(signs[1], 1.0, -1.0) + 0.0)
    q = torch.where(mask, q, torch.zeros((), dtype=x.dtype))
    mus = torch.cat([mu, torch.zeros_like(mu).expand(-1, order - 1)], 1)
    return q, torch.cat(alphas, 1), mus, torch.stack(signs)


def _weighted_scale(target, signs, other, m, dim):
    """The scale per row (dim=1) or per column (dim=0) minimizing sum m (target - scale * other * sign)^2 along dim,
    with `other` the fixed scales broadcast along the other axis; 0 where nothing is kept."""
    num = (other * torch.where(signs, 1.0, -1.0) * target * m).sum(dim, keepdim=True)
    den = (other * other * m).sum(dim, keepdim=True)
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


def rowcol_binarize(x: torch.Tensor, mask: torch.Tensor, salient: torch.Tensor, iters: int = ARB_ITERS,
                    round_f16: bool = True, history: list | None = None):
    """ARB-RC on one block x [rows, n] over mask: x ~ a_r[i] B1[i, j] a_c[j] on every kept weight, plus a second
    plane b_r[i] B2[i, j] b_c[j] on the kept weights of the salient columns (bool [n]). No mean.

    Init (ARB-RC): a_r = row mean |x|, a_c = column mean |x / a_r|, B1 = sign(x); the second plane likewise on the
    residual. Then `iters` rounds of: a_r, a_c, b_r, b_c each by least squares with the rest fixed, and the signs
    as the nearest level (salient weights: jointly among +-a_r a_c +- b_r b_c). Scales rounded to fp16 (round_f16),
    q computed as the stb.row-col-sign.v1 formula: (a_r * s) * a_c, plus (b_r * t) * b_c in salient columns.
    Returns (q, s bool, t bool, a_r [rows, 1], a_c [1, n], b_r [rows, 1], b_c [1, n]); b_c is 0 off the salient
    columns."""
    m = mask.to(x.dtype)
    ms = m * salient[None].to(x.dtype)
    xm = x * m

    def mean_abs(v, weight, dim):
        return (v.abs() * weight).sum(dim, keepdim=True) / weight.sum(dim, keepdim=True).clamp(min=1)

    def inverse(v):
        return torch.where(v > 0, 1.0 / v.clamp(min=1e-30), torch.zeros_like(v))

    s = x >= 0
    a_r = mean_abs(xm, m, 1)
    a_c = mean_abs(xm * inverse(a_r), m, 0)
    plane1 = a_r * torch.where(s, 1.0, -1.0) * a_c * m
    rest = (x - plane1) * ms
    t = rest >= 0
    b_r = mean_abs(rest, ms, 1)
    b_c = mean_abs(rest * inverse(b_r), ms, 0)

    def planes():
        return (a_r * torch.where(s, 1.0, -1.0) * a_c * m, b_r * torch.where(t, 1.0, -1.0) * b_c * ms)

    for _ in range(iters):
        p2 = planes()[1]
        a_r = _weighted_scale(xm - p2, s, a_c, m, 1)
        a_c = _weighted_scale(xm - p2, s, a_r, m, 0)
        p1 = planes()[0]
        b_r = _weighted_scale(xm - p1, t, b_c, ms, 1)
        b_c = _weighted_scale(xm - p1, t, b_r, ms, 0)
        level1, level2 = a_r * a_c, b_r * b_c
        s_sal, t_sal = _nearest_levels(x, [level1.expand_as(x), level2.expand_as(x)])
        in_salient = salient[None].expand_as(x)
        s = torch.where(in_salient, s_sal, (x * level1) >= 0)
        t = torch.where(in_salient, t_sal, t)
        if history is not None:
            history.append(float(((xm - sum(planes())) ** 2).sum()))
    if round_f16:
        a_r, a_c, b_r, b_c = (to_f16(v) for v in (a_r, a_c, b_r, b_c))
    s, t = s & mask, t & mask & salient[None]
    q = (a_r * torch.where(s, 1.0, -1.0)) * a_c
    q = torch.where(salient[None], q + (b_r * torch.where(t, 1.0, -1.0)) * b_c, q)
    q = torch.where(mask, q, torch.zeros((), dtype=x.dtype))
    return q, s, t, a_r, a_c, b_r, b_c * salient[None]


ROWCOL_SCALES = ("row_scales", "col_scales", "residual_row_scales", "residual_col_scales")


@dataclass
class RowColResult:
    """A matrix in the terms of stb.row-col-sign.v1 (docs/format.md), plus its dequantized value q."""
    q: torch.Tensor                    # [rows, cols] float32
    signs: torch.Tensor                # [rows, cols] bool, B1 (+1) of kept weights
    keep: torch.Tensor | None          # [rows, cols] bool N:M keep-mask, None = dense
    row_scales: torch.Tensor           # [rows, blocks] float32 holding fp16 values (a_r)
    col_scales: torch.Tensor           # [cols] (a_c)
    salient: torch.Tensor              # [cols] bool
    residual: torch.Tensor             # [rows, cols] bool B2 (meaningful in salient columns only)
    residual_row_scales: torch.Tensor  # [rows, blocks] (b_r)
    residual_col_scales: torch.Tensor  # [cols], 0 off the salient columns (b_c)
    block: int
    stats: dict
    group: torch.Tensor | None = None  # [rows, cols] bool, the kept weights of the second (high) group (cgb only)
    group1: dict | None = None         # the second group's scales, keyed and shaped as ROWCOL_SCALES above


def _masked_sse(x, q, mask):
    return float((((x - q) * mask) ** 2).sum())


def rowcol_high_group(w: torch.Tensor, saliency: torch.Tensor, keep: torch.Tensor,
                      salient: torch.Tensor) -> torch.Tensor:
    """ARB-LLM's column-group bitmap for one block w [rows, n]: the kept weights of the high group. In the salient
    columns those of magnitude at or above the searched split of the salient weights (search_salient_split; none
    when one group is better); elsewhere those of saliency at or above BiLLM's searched break point
    (search_break_points), so the four parts are salient-high, salient-low, rest-high, rest-low."""
    split = search_salient_split(w[:, salient], keep[:, salient])
    rest = keep & ~salient[None]
    p, _ = search_break_points(saliency, rest, 2)
    return keep & torch.where(salient[None], w.abs() >= split, saliency >= p)


def quantize_rowcol(w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor | None, block: int = 128,
                    iters: int = ARB_ITERS, compensate: bool = True, cgb: bool = False) -> RowColResult:
    """Block-OBC ARB-RC of w [rows, cols]: per block of `block` columns, BiLLM's searched salient columns (on the
    saliency w^2 / u_jj^2) and rowcol_binarize, then the block's error pushed into the later columns through u, as
    binarize.quantize_groups does.

    cgb: each block's kept weights are also split into a low and a high group (rowcol_high_group), each fitted by
    rowcol_binarize with its own row and column scales (the groups' errors are independent); the block keeps the
    split only where its squared error is below the single group's."""
    w = w.clone().float()
    rows, cols = w.shape
    keep_all = torch.ones_like(w, dtype=torch.bool) if keep is None else keep
    nblocks = -(-cols // block)
    q = torch.zeros_like(w)
    signs, residual = torch.zeros_like(w, dtype=torch.bool), torch.zeros_like(w, dtype=torch.bool)
    salient = torch.zeros(cols, dtype=torch.bool, device=w.device)
    group = torch.zeros_like(w, dtype=torch.bool) if cgb else None
    scale_sets = [{"row_scales": torch.zeros((rows, nblocks), device=w.device),
                   "col_scales": torch.zeros(cols, device=w.device),
                   "residual_row_scales": torch.zeros((rows, nblocks), device=w.device),
                   "residual_col_scales": torch.zeros(cols, device=w.device)} for _ in range(2 if cgb else 1)]
    diag = torch.diag(u)
    split_blocks = 0
    for b in range(nblocks):
        s, e = b * block, min(cols, (b + 1) * block)
        w1, k1 = w[:, s:e], keep_all[:, s:e]
        saliency = w1 * w1 / (diag[s:e] ** 2)[None]
        sal = search_salient_columns(saliency, k1)
        parts = [rowcol_binarize(w1, k1, sal, iters)]
        if cgb:
            high = rowcol_high_group(w1, saliency, k1, sal)
            if high.any() and (k1 & ~high).any():
                split = [rowcol_binarize(w1, k1 & ~high, sal, iters), rowcol_binarize(w1, high, sal, iters)]
                if _masked_sse(w1, split[0][0] + split[1][0], k1) < _masked_sse(w1, parts[0][0], k1):
                    parts = split
                    group[:, s:e] = high
                    split_blocks += 1
        q[:, s:e] = sum(part[0] for part in parts)
        for part, scales in zip(parts, scale_sets):
            _, sg, rs, a_r, a_c, b_r, b_c = part
            signs[:, s:e] |= sg
            residual[:, s:e] |= rs
            scales["row_scales"][:, b], scales["residual_row_scales"][:, b] = a_r[:, 0], b_r[:, 0]
            scales["col_scales"][s:e], scales["residual_col_scales"][s:e] = a_c[0], b_c[0]
        salient[s:e] = sal
        if compensate and e < cols:  # the OBS update for fixing the whole block (binarize.quantize_groups)
            err = torch.linalg.solve_triangular(u[s:e, s:e], w1 - q[:, s:e], upper=True, left=False)
            w[:, e:] -= err @ u[s:e, e:]
    kept = float(keep_all.sum())
    in_salient = float((keep_all & salient[None]).sum())
    stats = {"salient_columns": int(salient.sum()),
             "region_fractions": [round((kept - in_salient) / kept, 4) if kept else 0.0,
                                  round(in_salient / kept, 4) if kept else 0.0]}
    if cgb:
        stats["group_split_blocks"] = round(split_blocks / nblocks, 4)
        stats["high_group_fraction"] = round(float(group.sum()) / kept, 4) if kept else 0.0
    return RowColResult(q=q, signs=signs, keep=keep, salient=salient, residual=residual, block=block, stats=stats,
                        **scale_sets[0], group=group, group1=scale_sets[1] if cgb else None)


def rank1_nonnegative(a: torch.Tensor, solver: str = "power", iters: int = 30):
    """Non-negative u [rows], v [cols] with a ~ u v^T for a >= 0 (OneBit's SVID of |W|).

    "power": power iteration for the top singular pair. By Perron-Frobenius the top singular vectors of a
    non-negative matrix are non-negative, so this is the best rank-1 approximation, which no non-negative
    factorization can beat. "nmf": Lee and Seung's multiplicative updates for rank-1 NMF (what OneBit's sklearn NMF
    computes), from a deterministic positive start. v is scaled to mean 1 (u carries the magnitude)."""
    a = a.double()
    v = a.mean(0).clamp(min=1e-12)
    if solver == "power":
        for _ in range(iters):
            u = a @ v
            v = a.t() @ u
            v = v / v.norm().clamp(min=1e-300)
        u = a @ v  # with |v| = 1, the least-squares u for this v
    elif solver == "nmf":
        u = a.mean(1).clamp(min=1e-12)
        for _ in range(iters):
            u = u * (a @ v) / (u * (v @ v)).clamp(min=1e-300)
            v = v * (a.t() @ u) / (v * (u @ u)).clamp(min=1e-300)
    else:
        raise ValueError(f"unknown rank-1 solver {solver!r}; known: power, nmf")
    scale = v.mean()
    if scale > 0:
        u, v = u * scale, v / scale
    return u.float().clamp(min=0), v.float().clamp(min=0)
