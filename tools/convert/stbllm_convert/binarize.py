"""Binarization math of the calibrated methods (BiLLM, STBLLM): the residual binarizer, importance metrics, N:M
masks, layer-wise N:M allocation, the searches (salient columns, break points) and the block OBC quantizer that
ties them together (REFERENCE_ALGORITHMS.md §0-§2).

Everything is mask-preserving: a pruned weight (keep-mask False) is exactly zero in the output, takes no part in
any statistic or search, and its (compensated) value only enters the error that later blocks absorb.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SALIENT_SEARCH_LIMIT = 50      # top columns tried as the salient set (k = 1 .. limit-1), as in the reference code
PERCDAMP = 0.01                # Hessian damping: 1 % of its mean diagonal


def to_f16(t: torch.Tensor) -> torch.Tensor:
    """Rounds to the nearest float16 value (kept as float32): what the file stores."""
    return t.to(torch.float16).to(torch.float32)


def super_scales(params: torch.Tensor) -> torch.Tensor:
    """The per-(row, slot) scales of 8-bit params (params_bits = 8, docs/format.md) for params [rows, blocks,
    slots]: the largest magnitude over the row's blocks maps to code 127 (rounded to fp16)."""
    return to_f16(params.abs().amax(1) / 127)


def round_to_codes(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """values rounded to 8-bit codes under scales (broadcast; fp16 values >= 0), as the file decodes them:
    fp16(scale * code) with code = round(value / scale) in [-127, 127] (0 under a zero scale)."""
    positive = scales > 0
    codes = torch.where(positive, torch.round(values / torch.where(positive, scales, 1.0)).clamp(-127, 127), 0.0)
    return to_f16(scales * codes)


def binarize(x: torch.Tensor, mask: torch.Tensor, order: int, round_f16: bool = True, round_param=None):
    """Row-wise residual binarization of x over mask (both [rows, n]).

    For k = 1..order on the residual R (R starts as x): mu_k = mean R, alpha_k = mean |R - mu_k| (over the row's
    masked entries), B_k = +1 where R >= mu_k else -1, R -= alpha_k*B_k + mu_k. With round_f16, alpha_k and mu_k are
    rounded to float16 before use, so the returned q is exactly what a file storing them reproduces; round_param(v,
    i) replaces that rounding (v [rows, 1]; i = 2(k-1) for alpha_k, 2(k-1) + 1 for mu_k).
    Returns (q, alphas [rows, order], mus [rows, order], signs [order, rows, n] bool). q is 0 off the mask; a row
    with an empty mask gets alpha = mu = 0."""
    m = mask.to(x.dtype)
    count = m.sum(1, keepdim=True).clamp(min=1)
    residual = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    q = torch.zeros_like(x)
    alphas, mus, signs = [], [], []
    for _ in range(order):
        mu = (residual * m).sum(1, keepdim=True) / count
        dev = residual - mu
        alpha = (dev.abs() * m).sum(1, keepdim=True) / count
        if round_param is not None:
            alpha, mu = round_param(alpha, 2 * len(alphas)), round_param(mu, 2 * len(alphas) + 1)
        elif round_f16:
            mu, alpha = to_f16(mu), to_f16(alpha)
        positive = dev >= 0
        part = torch.where(mask, alpha * torch.where(positive, 1.0, -1.0).to(x.dtype) + mu,
                           torch.zeros((), dtype=x.dtype))
        q = q + part
        residual = residual - part
        alphas.append(alpha[:, 0])
        mus.append(mu[:, 0])
        signs.append(positive & mask)
    return q, torch.stack(alphas, 1), torch.stack(mus, 1), torch.stack(signs)


def _order2_sse_from_counts(n, s1, s2, at_least):
    """Order-2 binarization error of sets given only their size n, sum s1, sum of squares s2 and at_least(t) ->
    (count, sum) of their elements >= t (all tensors of one shape). With mu1 = mean, alpha1 = mean |x - mu1|, the
    residual's mean is mu2 = -alpha1 (2c - n) / n (c = #x >= mu1) and residual - mu2 = x - hi above mu1, x - lo
    below, so alpha2 needs counts and sums at three thresholds; SSE = s2 - n (mu1^2 + alpha1^2 + mu2^2 + alpha2^2)."""
    safe = n.clamp(min=1)
    mu1 = s1 / safe
    c, sm = at_least(mu1)
    a1 = ((sm - mu1 * c) + (mu1 * (n - c) - (s1 - sm))) / safe
    mu2 = -a1 * (2 * c - n) / safe
    hi, lo = mu1 + a1 + mu2, mu1 - a1 + mu2  # hi >= mu1 >= lo
    ch, sh = at_least(hi)
    cl, sl = at_least(lo)
    upper = (sh - hi * ch) + (hi * (c - ch) - (sm - sh))
    lower = ((sl - sm) - lo * (cl - c)) + (lo * (n - cl) - (s1 - sl))
    a2 = (upper + lower) / safe
    return (s2 - n * (mu1 * mu1 + a1 * a1 + mu2 * mu2 + a2 * a2)).clamp(min=0)


def search_salient_columns(t: torch.Tensor, keep: torch.Tensor, limit: int = SALIENT_SEARCH_LIMIT) -> torch.Tensor:
    """BiLLM's structured salient search on the saliency t (>= 0, [rows, n]): rank columns by their summed saliency,
    try the top k (1 <= k < min(limit, n)) as the order-2 group and the rest as a second order-2 group, keep the k
    with the smallest error. Returns a bool [n] column selection (at least one column).

    The errors come in closed form (_order2_sse_from_counts) from running counts and sums over each row's sorted
    values, so every threshold query is a binary search, instead of binarizing 49 candidate splits of the whole
    block element by element. Tensors are [rows, candidates]."""
    rows, n = t.shape
    t = t.double()
    top = torch.argsort((t * keep).sum(0), descending=True, stable=True)[:min(limit, n)]
    ks = torch.arange(1, max(2, len(top)), device=t.device)
    kept = _SortedSets(torch.where(keep, t, math.inf))
    # Candidate k's salient set in a row: the kept values of the row's first k top columns.
    top_sorted, by_rank = torch.sort(torch.where(keep[:, top], t[:, top], math.inf), dim=1)
    by_rank[~torch.isfinite(top_sorted)] = len(top)  # pruned weights are in no candidate set
    salient = _SortedSets(top_sorted, by_rank[:, None] < ks[:, None])
    sal_s2 = torch.where(keep[:, top], t[:, top] ** 2, 0.0).cumsum(1)[:, ks - 1]
    kept_s2 = (torch.where(keep, t, 0.0) ** 2).sum(1, keepdim=True)

    def rest_at_least(th):
        count, total = kept.at_least(th)
        c_sal, s_sal = salient.at_least(th)
        return count - c_sal, total - s_sal

    errors = (_order2_sse_from_counts(salient.n, salient.s1, sal_s2, salient.at_least)
              + _order2_sse_from_counts(kept.n - salient.n, kept.s1 - salient.s1, kept_s2 - sal_s2,
                                        rest_at_least)).sum(0)
    chosen = torch.zeros(n, dtype=torch.bool, device=t.device)
    chosen[top[:int(ks[int(torch.argmin(errors))])]] = True
    return chosen


SALIENT_SPLIT_QUANTILES = 81  # break point candidates of ARB's column-group bitmap: quantiles 0.1, 0.11, ..., 0.9


def search_salient_split(x: torch.Tensor, mask: torch.Tensor) -> float:
    """ARB-LLM's column-group bitmap: the break point p that splits the masked (salient) weights x [rows, n] by
    magnitude into a low (|x| < p) and a high (|x| >= p) group, each binarized at order 2 with its own params per
    row. Candidates are the quantiles linspace(0.1, 0.9) of the non-zero |x| on mask, scored by the two groups'
    order-2 residual binarization error (in closed form, as search_salient_columns); the best one is returned if it
    beats a single group, else inf (one group; also when nothing is kept)."""
    values = torch.where(mask, x.double(), math.inf)
    magnitudes = values[mask & (x != 0)].abs()
    if magnitudes.numel() == 0:
        return math.inf
    cand = torch.quantile(magnitudes, torch.linspace(0.1, 0.9, SALIENT_SPLIT_QUANTILES, dtype=torch.float64))
    kept = _SortedSets(values)
    finite = torch.isfinite(kept.sorted)
    square = torch.where(finite, kept.sorted, 0.0) ** 2
    high = finite[:, None] & (kept.sorted.abs()[:, None] >= cand[None, :, None])  # [rows, candidates, n]
    errors = []
    for members in (high, finite[:, None] & ~high):
        group = _SortedSets(kept.sorted, members)
        errors.append(_order2_sse_from_counts(group.n, group.s1, (members * square[:, None]).sum(2),
                                              group.at_least).sum(0))
    split = errors[0] + errors[1]
    whole = _order2_sse_from_counts(kept.n, kept.s1, square.sum(1, keepdim=True), kept.at_least).sum()
    best = int(torch.argmin(split))
    return float(cand[best]) if split[best] < whole else math.inf


class _SortedSets:
    """Subsets of each row's values: their sizes n and sums s1, and at_least(th) -> (count, sum) of the members
    >= th for thresholds th [rows, K], by one binary search in the row's sorted values and a look-up in the
    members' running counts and sums.

    values: float64 [rows, size], +inf for entries that are never members; unsorted unless `members` is given.
    members: None (every finite value: one set per row, n and s1 [rows, 1]) or bool [rows, K, size] in the order
    of the (then already sorted) values (K sets per row, n and s1 [rows, K])."""

    def __init__(self, values: torch.Tensor, members: torch.Tensor | None = None):
        self.sorted = values if members is not None else torch.sort(values, dim=1).values
        finite = torch.isfinite(self.sorted)
        members = finite[:, None] if members is None else members
        # inclusive running count and sum along the row (bool * float and an int32 count: the fast kernels)
        self.counts = members.cumsum(2, dtype=torch.int32)
        self.sums = (members * torch.where(finite, self.sorted, 0.0)[:, None]).cumsum(2)
        self.n, self.s1 = self.counts[..., -1].double(), self.sums[..., -1]

    def at_least(self, th):
        below = torch.searchsorted(self.sorted, th.contiguous())  # values < th (+inf never is)
        last = (below - 1).clamp(min=0)[..., None]
        shape = (*last.shape[:2], self.counts.shape[2])
        count = self.counts.expand(shape).gather(2, last)[..., 0].double()
        total = self.sums.expand(shape).gather(2, last)[..., 0]
        some = below > 0
        return self.n - torch.where(some, count, 0.0), self.s1 - torch.where(some, total, 0.0)


def _range_sse(sorted_vals, p1, start, end):
    """Order-1 binarization error of each row's sorted slice [start, end), given as (index [rows, C], prefix sum of
    values, prefix sum of squares) at each end; p1 is the prefix-sum table of values [rows, size + 1].
    SSE = sum x^2 - n mu^2 - n alpha^2 with alpha = mean |x - mu|."""
    (i, v1, v2), (j, w1, w2) = start, end
    n = (j - i).to(p1.dtype)
    safe = n.clamp(min=1)
    mu = (w1 - v1) / safe
    split = torch.searchsorted(sorted_vals, mu).clamp(min=i, max=j)  # first index with x >= mu
    at_split = p1.gather(1, split)
    alpha = ((w1 - at_split - mu * (j - split)) + (mu * (split - i) - (at_split - v1))) / safe
    return ((w2 - v2) - n * mu * mu - n * alpha * alpha).clamp(min=0)


def search_break_points(t: torch.Tensor, region_mask: torch.Tensor, regions: int) -> tuple[float, float]:
    """The searched split of the non-salient weights by saliency t (>= 0) into `regions` (2: BiLLM's bell-shaped
    split at p; 3: STBLLM's trisection at p1 and p2 = 2*p1). Candidates are quantiles linspace(0.1, 0.9) of t over
    region_mask (81 for two regions; 160 for three, skipping p2 above the 0.9 quantile); each region is binarized
    at order 1 and the candidate with the smallest total error wins. Returns (p1, p2): region 0 is t < p1,
    region 1 is p1 <= t < p2, region 2 is t >= p2 (p2 = inf for two regions). With no usable candidate (an
    empty mask, or every quantile degenerate) one region holds everything: (inf, inf).

    The errors of all candidates come at once from each row's sorted values and their prefix sums."""
    inf = float("inf")
    values = t[region_mask].double()
    if values.numel() == 0:
        return inf, inf
    quantiles = torch.linspace(0.1, 0.9, 81 if regions == 2 else 160, dtype=torch.float64, device=t.device)
    if regions == 3:  # the 0.9 quantile bounds p2, from the same sort
        cand, limit = torch.quantile(values, torch.cat([quantiles, quantiles.new_tensor([0.9])])).split([160, 1])
        cand = cand[2 * cand <= limit]
        if cand.numel() == 0:
            return inf, inf
    else:
        cand = torch.quantile(values, quantiles)
    rows = t.shape[0]
    sorted_vals = torch.sort(torch.where(region_mask, t.double(), inf), dim=1).values
    finite = torch.where(torch.isfinite(sorted_vals), sorted_vals, 0.0)
    zero = torch.zeros((rows, 1), dtype=torch.float64, device=t.device)
    p1 = torch.cat([zero, finite.cumsum(1)], 1)
    p2 = torch.cat([zero, (finite * finite).cumsum(1)], 1)
    count = region_mask.sum(1, keepdim=True)

    def boundary(index):  # (index, prefix sums there) of a region boundary [rows, C]
        return index, p1.gather(1, index), p2.gather(1, index)

    def below(threshold):  # per row, how many values are < threshold
        return boundary(torch.searchsorted(sorted_vals, threshold.expand(rows, len(cand)).contiguous())
                        .clamp(max=count))

    edges = [boundary(torch.zeros((rows, len(cand)), dtype=torch.long, device=t.device)), below(cand[None])]
    if regions == 3:
        edges.append(below(2 * cand[None]))
    edges.append(boundary(count.expand(rows, len(cand))))
    sse = sum(_range_sse(sorted_vals, p1, lo, hi) for lo, hi in zip(edges, edges[1:]))
    best = float(cand[int(torch.argmin(sse.sum(0)))])
    return (best, 2 * best) if regions == 3 else (best, inf)


# ---- importance, N:M masks, allocation ----------------------------------------------------------------------------

IMPORTANCE = ("si", "wanda", "magnitude", "ria")


def importance(w: torch.Tensor, input_norm: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-weight importance for N:M pruning (higher = keep). input_norm[j] is proportional to ||X_j||_2.
    magnitude |W|; wanda |W|*||X_j||; ria (|W|/colsum + |W|/rowsum)*||X_j||^0.5 (the reference code's metric);
    si (STBLLM's Standardized Importance) the RIA relative term standardized (minus its global mean, over each
    row's std) times ||X_j||."""
    a = w.abs()
    if metric == "magnitude":
        return a
    if metric == "wanda":
        return a * input_norm[None]
    relative = a / a.sum(0, keepdim=True).clamp(min=1e-30) + a / a.sum(1, keepdim=True).clamp(min=1e-30)
    if metric == "ria":
        return relative * input_norm.sqrt()[None]
    if metric == "si":
        centered = relative - relative.mean()
        return centered / (centered.std(1, keepdim=True) + 1e-5) * input_norm[None]
    raise ValueError(f"unknown importance metric {metric!r}; known: {', '.join(IMPORTANCE)}")


def nm_keep(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask (bool, same shape as score [rows, cols]): in each aligned group of m columns of a row keep the n
    highest scores (ties: the lower column); a ragged last group of g columns keeps ceil(n*g/m)."""
    rows, cols = score.shape
    groups = -(-cols // m)
    a = np.full((rows, groups * m), -np.inf, dtype=np.float64)  # padding sorts after every real score
    a[:, :cols] = score
    order = np.argsort(-a.reshape(rows, groups, m), axis=2, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(m), order.shape), axis=2)
    keep_count = np.full(groups, n)
    tail = cols - (groups - 1) * m
    if tail < m:
        keep_count[-1] = math.ceil(n * tail / m)
    return (ranks < keep_count[None, :, None]).reshape(rows, groups * m)[:, :cols]


def outlier_ratio(scores: list[torch.Tensor], hyper_m: float) -> float:
    """Fraction of a layer's importance scores above hyper_m times their mean (OWL's outlier ratio)."""
    flat = torch.cat([s.reshape(-1) for s in scores]).double()
    return float((flat > hyper_m * flat.mean()).double().mean())


def allocate_nm(ratios, n: int, m: int, lamda: float) -> list[int]:
    """Per-layer kept counts N_l (1 <= N_l <= m) whose mean is exactly n: layers with more outliers keep more.
    The ratios are scaled to [0, lamda] and centred (the reference's offsets), then rounded by largest remainder so
    that the sum is exactly len(ratios)*n (the reference rounds each independently and misses its target)."""
    r = np.asarray(ratios, dtype=np.float64)
    span = r.max() - r.min() if len(r) else 0.0
    offsets = (r - r.min()) / span * lamda if span > 0 else np.zeros_like(r)
    target = np.clip(n + offsets - offsets.mean(), 1, m)
    kept = np.floor(target).astype(int)
    remainder = target - kept
    deficit = len(r) * n - int(kept.sum())
    while deficit != 0:
        step = 1 if deficit > 0 else -1
        movable = kept < m if step > 0 else kept > 1
        i = int(np.argmax(np.where(movable, remainder * step, -np.inf)))
        kept[i] += step
        remainder[i] -= step
        deficit -= step
    return [int(k) for k in kept]


# ---- the block OBC quantizer --------------------------------------------------------------------------------------

@dataclass
class GroupsResult:
    """A binarized matrix in the terms of the stb.binary-groups.v2 codec (docs/format.md), plus its dequantized
    value q (float32, exactly what the file reproduces)."""
    q: torch.Tensor            # [rows, cols] float32
    signs: torch.Tensor        # [rows, cols] bool, first-order sign (+1) of kept weights
    keep: torch.Tensor | None  # [rows, cols] bool N:M keep-mask, None = dense
    labels: torch.Tensor       # [rows, cols] uint8 region of kept non-salient weights (0 elsewhere)
    salient: torch.Tensor      # [cols] bool salient columns
    residual: torch.Tensor     # [rows, cols] bool order-2 signs (meaningful in salient columns only)
    params: torch.Tensor       # [rows, blocks, 2*regions + 4*salient groups] float32 holding fp16 values
    regions: int
    block: int
    stats: dict
    param_scales: torch.Tensor | None = None  # [rows, slots] when params are 8-bit codes under them
    salient_labels: torch.Tensor | None = None  # [rows, cols] bool, the second salient group (two groups only)


def inverse_hessian_factor(h: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1 with damp = 1 % of mean diag H. Dead inputs (H_jj = 0) get
    H_jj = 1 and, when w is given, their weight column zeroed (in place), as in GPTQ."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    if w is not None:
        w[:, dead] = 0
    h += torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (PERCDAMP * torch.mean(torch.diag(h)))
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def quantize_groups(w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor | None, regions: int,
                    block: int = 128, compensate: bool = True, binarizer=None,
                    h: torch.Tensor | None = None, param_scales: torch.Tensor | None = None,
                    salient_groups: int = 1) -> GroupsResult:
    """Block-OBC binarization of w [rows, cols] (float32) with u, the upper Cholesky factor of the damped inverse
    Hessian. Per block of `block` columns, from the current (compensated) weights: saliency T = w^2 / u_jj^2;
    searched salient columns get order-2 residual binarization; the other kept weights are split by searched
    break points of T into `regions` groups, each binarized at order 1 with its own alpha/mu per row. Then the
    block's error is pushed into the later columns through u (no compensation inside a block, as in the
    reference). keep=None is dense.

    binarizer(x, mask, order, gram) -> (q, alphas, mus, signs) replaces `binarize` (ARB: arb.arb_binarize); gram is
    the block's slice of h (the layer's input Gram matrix, up to scale), or None when h is not given.

    param_scales [rows, 2*regions + 4*salient_groups] (fp16 values): every alpha and mu is rounded to an 8-bit code
    under its slot's scale (round_to_codes) when it is computed, so the compensation sees what the file will hold.

    salient_groups 2 (ARB-LLM's column-group bitmap): each block's salient weights may be split at a searched
    magnitude break point (search_salient_split) into a low and a high group, each binarized at order 2 with its
    own params (the high group's in the last four slots); the block keeps the split only where its error (weighted
    by the block's Gram matrix when h is given, as ARB-X measures it) is below the single group's."""
    if binarizer is not None and param_scales is not None:
        raise ValueError("8-bit params need the default binarizer")

    def binarize_part(x, mask, order, gram, first_slot):
        if binarizer is not None:
            return binarizer(x, mask, order, gram)
        if param_scales is None:
            return binarize(x, mask, order)
        scales = param_scales[:, first_slot:first_slot + 2 * order]
        return binarize(x, mask, order, round_param=lambda v, i: round_to_codes(v, scales[:, i, None]))
    w = w.clone().float()
    rows, cols = w.shape
    keep_all = torch.ones_like(w, dtype=torch.bool) if keep is None else keep
    nblocks = -(-cols // block)
    q = torch.zeros_like(w)
    signs = torch.zeros_like(w, dtype=torch.bool)
    residual = torch.zeros_like(w, dtype=torch.bool)
    labels = torch.zeros((rows, cols), dtype=torch.uint8, device=w.device)
    salient = torch.zeros(cols, dtype=torch.bool, device=w.device)
    params = torch.zeros((rows, nblocks, 2 * regions + 4 * salient_groups), dtype=torch.float32, device=w.device)
    salient_labels = torch.zeros((rows, cols), dtype=torch.bool, device=w.device) if salient_groups == 2 else None
    diag = torch.diag(u)
    region_counts = torch.zeros(regions + 1, dtype=torch.float64)
    split_blocks = 0
    for b in range(nblocks):
        s, e = b * block, min(cols, (b + 1) * block)
        w1, k1 = w[:, s:e], keep_all[:, s:e]
        t = w1 * w1 / (diag[s:e] ** 2)[None]
        cols_sel = search_salient_columns(t, k1)
        sal_mask = cols_sel[None] & k1
        gram = None if h is None else h[s:e, s:e]
        q1, a, mu, sg = binarize_part(w1, sal_mask, 2, gram, 2 * regions)
        params[:, b, 2 * regions:2 * regions + 4] = torch.stack([a[:, 0], mu[:, 0], a[:, 1], mu[:, 1]], 1)
        if salient_groups == 2:
            sal_gram = None if gram is None else gram[cols_sel][:, cols_sel]
            split = _split_salient(w1[:, cols_sel], sal_mask[:, cols_sel], sal_gram, q1[:, cols_sel],
                                   lambda x, mask, group: binarize_part(x, mask, 2, sal_gram,
                                                                        2 * regions + 4 * group))
            if split is not None:
                q_sal, group_params, sg_sal, high = split
                q1, sg = torch.zeros_like(q1), torch.zeros_like(sg)
                q1[:, cols_sel], sg[:, :, cols_sel] = q_sal, sg_sal
                params[:, b, 2 * regions:] = group_params
                salient_labels[:, s:e][:, cols_sel] = high
                split_blocks += 1
        signs[:, s:e] |= sg[0]
        residual[:, s:e] = sg[1]
        rest = ~cols_sel[None] & k1
        p1, p2 = search_break_points(t, rest, regions) if regions > 1 else (float("inf"), float("inf"))
        bounds = [0.0, p1, p2][:regions] + [float("inf")]
        for g in range(regions):
            region = rest & (t >= bounds[g]) & (t < bounds[g + 1])
            qg, a, mu, sg = binarize_part(w1, region, 1, gram, 2 * g)
            q1 = q1 + qg
            params[:, b, 2 * g] = a[:, 0]
            params[:, b, 2 * g + 1] = mu[:, 0]
            signs[:, s:e] |= sg[0]
            labels[:, s:e] += region.to(torch.uint8) * g
            region_counts[g] += float(region.sum())
        region_counts[regions] += float(sal_mask.sum())
        salient[s:e] = cols_sel
        q[:, s:e] = q1
        if compensate and e < cols:
            # The OBS update for fixing the whole block at q1: err = (w1 - q1) U_bb^-1. The reference code divides by
            # diag(U_bb) only, which ignores the coupling inside the block and can raise the output error.
            err = torch.linalg.solve_triangular(u[s:e, s:e], w1 - q1, upper=True, left=False)
            w[:, e:] -= err @ u[s:e, e:]
    kept = float(region_counts.sum())
    stats = {"salient_columns": int(salient.sum()),
             "region_fractions": [round(float(c) / kept, 4) if kept else 0.0 for c in region_counts]}
    if salient_groups == 2:
        stats["salient_split_blocks"] = round(split_blocks / nblocks, 4)
    return GroupsResult(q=q, signs=signs, keep=keep, labels=labels, salient=salient, residual=residual,
                        params=params, regions=regions, block=block, stats=stats, param_scales=param_scales,
                        salient_labels=salient_labels)


def _split_salient(x, mask, gram, q_whole, binarize_group):
    """ARB's column-group bitmap on a block's salient columns x [rows, n] (kept: mask): the low and high groups at
    the searched break point, each binarized at order 2 by binarize_group(x, mask, group) -> (q, alphas, mus,
    signs). Returns (q, params [rows, 8] (alpha1, mu1, alpha2, mu2 of each group), signs [2, rows, n], high) when
    the split has less error than q_whole, the single group's result (S-weighted with gram), else None."""
    p = search_salient_split(x, mask)
    high = mask & (x.abs() >= p)
    if not high.any() or not (mask & ~high).any():
        return None

    def error(q):
        r = (x - q) * mask
        return float(((r @ gram) * r).sum()) if gram is not None else float((r * r).sum())
    parts = [binarize_group(x, group_mask, group) for group, group_mask in enumerate((mask & ~high, high))]
    q = parts[0][0] + parts[1][0]
    if error(q) >= error(q_whole):
        return None
    params = torch.cat([torch.stack([a[:, 0], mu[:, 0], a[:, 1], mu[:, 1]], 1) for _, a, mu, _ in parts], 1)
    return q, params, parts[0][3] | parts[1][3], high
