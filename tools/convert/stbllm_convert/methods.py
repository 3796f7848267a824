"""Quantization methods. A method turns one decoder linear weight (name, float32 [rows, cols] matrix, `cols` along
the input dimension) into writer calls (embeddings and the LM head: convert.add_table). Without calibration, `add_layer`
runs once per decoder layer with all of that layer's linear weights.
Inside the layer-by-layer calibration driver (calibrate.py; needed when any linear's method is `calibrated`:
billm, stbllm, arb-x, arb-rc, q2/q3/q4) every method gets each of its linears' weight, inverse-Hessian factor,
keep-mask and input Hessian in `quantize` (plain methods ignore all but the weight) and the result in `write`; the
result's `q` (the dequantized weight) feeds the next layer. `finish` runs once at the end (OneBit's distillation).

Register a method with `register("name")`; `make_method(name, nm=..., block=..., **options)` builds one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConvertError

if TYPE_CHECKING:
    import torch

ALLOWED_M = (2, 4, 8, 16, 32, 64)
LABEL_CODERS = ("rans", "fixed")  # stb.binary-groups.v2 region labels: entropy-coded (default) or fixed width
_METHODS: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def method_names() -> list[str]:
    return list(_METHODS)


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """'4:8' -> (4, 8); None -> None. ConvertError for anything else."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m:
        raise ConvertError(f"--nm {text!r}: expected N:M with integers, e.g. 4:8")
    n, mm = int(m.group(1)), int(m.group(2))
    if mm not in ALLOWED_M:
        raise ConvertError(f"--nm {text}: M must be one of {', '.join(map(str, ALLOWED_M))}")
    if not 1 <= n <= mm:
        raise ConvertError(f"--nm {text}: N must be between 1 and M ({mm})")
    return n, mm


def check_block(block: int) -> int:
    block = int(block)
    if block % 64 or not 64 <= block <= 4096:
        raise ConvertError(f"--block {block}: must be a multiple of 64 between 64 and 4096")
    return block


def to_f16(name: str, w: np.ndarray) -> np.ndarray:
    """float32 -> float16, refusing values that would overflow to inf."""
    out = np.asarray(w, dtype=np.float32).astype(np.float16)
    if not np.isfinite(out).all():
        bad = "NaN" if np.isnan(w).any() else "values beyond the fp16 range (65504)"
        raise ConvertError(f"tensor {name} has {bad}; it cannot be stored as fp16")
    return out


def nm_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Magnitude N:M keep-mask (bool, same shape as w): in each aligned group of m weights along a row keep the n
    largest |w| (ties: the lower column); a ragged last group of g weights keeps ceil(n*g/m)."""
    from .binarize import nm_keep

    return nm_keep(np.abs(w), n, m)


def sign_quantize(w: np.ndarray, block: int = 128, nm: tuple[int, int] | None = None):
    """Plain sign binarization with one scale per (row, block of `block` input columns).

    Returns (signs, scales, mask): signs is True (+1) where w >= 0 and False (-1) where w < 0; scales[r, b] is the
    mean |w| over the block's weights (over its kept weights when masked; 0 when none is kept), float32 (the
    writer stores it as fp16); mask is the N:M keep-mask or None."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    mask = nm_mask(w, *nm) if nm is not None else None
    nblocks = -(-cols // block)
    padded = np.zeros((rows, nblocks * block), dtype=np.float32)
    padded[:, :cols] = np.abs(w) if mask is None else np.abs(w) * mask
    sums = padded.reshape(rows, nblocks, block).sum(axis=2, dtype=np.float64)
    if mask is None:
        counts = np.full(nblocks, block, dtype=np.float64)
        counts[-1] = cols - (nblocks - 1) * block
        counts = np.broadcast_to(counts, sums.shape)
    else:
        kept = np.zeros((rows, nblocks * block), dtype=np.float64)
        kept[:, :cols] = mask
        counts = kept.reshape(rows, nblocks, block).sum(axis=2)
    scales = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    signs = w >= 0
    return signs, scales, mask


@dataclass
class PlainResult:
    """A calibration-free method's result inside the calibration driver: the dequantized weight and the original."""
    q: "torch.Tensor"
    weight: np.ndarray
    stats: dict


class Method:
    """Base class: fp16 everywhere. Subclasses override `add_linear` and `dequantized` (or `quantize` and `write`
    when calibrated)."""

    name = "base"
    calibrated = False

    def __init__(self, nm: tuple[int, int] | None = None, block: int = 128, **options):
        if options:
            option = next(iter(options))
            needs = {"group": "a q2, q3 or q4 method", "svid": "onebit-svid", "kd_steps": "onebit-svid",
                     "kd_lr": "onebit-svid", "arb_iters": "arb-x or arb-rc",
                     "params_bits": "billm, stbllm, q2, q3 or q4", "regions": "billm or stbllm",
                     "label_coder": "billm, stbllm or arb-x", "cgb": "arb-x or arb-rc"}.get(
                option, "a calibrated method (billm, stbllm, arb-x, arb-rc)")
            raise ConvertError(f"--{option.replace('_', '-')} needs {needs}, not {self.name}")
        self.nm = nm
        self.block = check_block(block)

    def params(self) -> dict:
        """Method parameters recorded in provenance."""
        return {"nm": list(self.nm) if self.nm else None, "block": self.block}

    def add_linear(self, writer, name: str, w: np.ndarray) -> None:
        writer.add_f16(name, to_f16(name, w))

    def dequantized(self, name: str, w: np.ndarray) -> np.ndarray:
        """The float32 weight add_linear stores for w."""
        return to_f16(name, w).astype(np.float32)

    def quantize(self, w, u, keep, h=None):
        """In the calibration driver: w is a float32 torch weight; the rest is for calibrated methods."""
        import torch

        weight = w.cpu().numpy()
        return PlainResult(q=torch.from_numpy(self.dequantized("weight", weight)).to(w.device), weight=weight,
                           stats={})

    def write(self, writer, name: str, result, nm) -> None:
        self.add_linear(writer, name, result.weight)


    def finish(self, writer, context) -> dict:
        """Called once after every layer was added; context has src, arch, config, plan, tokenizer() (builds the
        source's tokenizer), calibration (CalibrationOptions) and progress. Returns entries for the provenance."""
        return {}


@register("fp16")
class FP16(Method):
    """Passthrough: every linear weight fp16 (the quality ceiling)."""

    def __init__(self, nm=None, block=128, **options):
        if nm is not None:
            raise ConvertError("--nm needs a binarizing method (e.g. --method sign); fp16 keeps every weight")
        super().__init__(None, block, **options)

    def params(self):
        return {"nm": None, "block": None}


@register("sign")
class Sign(Method):
    """Per-(row, block) sign binarization, optionally N:M-pruned (the floor every real method must beat)."""

    def add_linear(self, writer, name, w):
        signs, scales, mask = sign_quantize(w, self.block, self.nm)
        scales16 = to_f16(name + " (scales)", scales)
        writer.add_sign_block(name, signs, scales16, mask=mask, block=self.block, nm=self.nm)

    def dequantized(self, name, w):
        signs, scales, mask = sign_quantize(w, self.block, self.nm)
        per_col = np.repeat(to_f16(name + " (scales)", scales).astype(np.float32), self.block, axis=1)
        q = np.where(signs, per_col[:, :w.shape[1]], -per_col[:, :w.shape[1]])
        return q if mask is None else q * mask


class CalibratedMethod(Method):
    """Binarization with salient columns, searched regions and block OBC (binarize.quantize_groups), stored as
    stb.binary-groups.v2. Options: importance (N:M pruning metric), layerwise (per-layer N:M allocation that keeps
    the requested average), lamda / hyper_m (the allocation's spread and outlier threshold), params_bits (8, the
    default: 8-bit codes under one fp16 scale per (row, slot), found by a first quantization pass; 16: fp16 alphas
    and mus),
    label_coder ("rans": entropy-coded region labels, the default; "fixed": the fixed-width labels older readers
    know; lossless either way)."""

    calibrated = True
    regions = 0
    # 8-bit params: 0.44 bits per weight fewer than fp16 on SmolLM2 STBLLM 6:8, PPL no worse (docs/results.md)
    default_params_bits = 8
    default_importance = "si"
    default_layerwise = True

    def __init__(self, nm=None, block=128, importance=None, layerwise=None, lamda=2.0, hyper_m=6.0, params_bits=None,
                 regions=None, label_coder=None, **options):
        from .binarize import IMPORTANCE

        super().__init__(nm, block, **options)
        if regions is not None:
            if not isinstance(self, (BiLLM, STBLLM)):
                raise ConvertError(f"--regions needs billm or stbllm, not {self.name}")
            if int(regions) not in (1, 2, 3):
                raise ConvertError(f"--regions {regions}: choose 1, 2 or 3")
            self.regions = int(regions)
        self.label_coder = label_coder or LABEL_CODERS[0]
        if self.label_coder not in LABEL_CODERS:
            raise ConvertError(f"--label-coder {self.label_coder}: choose {' or '.join(LABEL_CODERS)}")
        self.params_bits = int(self.default_params_bits if params_bits is None else params_bits)
        if self.params_bits not in (8, 16):
            raise ConvertError(f"--params-bits {self.params_bits}: choose 16 or 8")
        self.importance = importance or self.default_importance
        if self.importance not in IMPORTANCE:
            raise ConvertError(f"--importance {self.importance}: choose one of {', '.join(IMPORTANCE)}")
        self.layerwise = (self.default_layerwise if layerwise is None else bool(layerwise)) and nm is not None
        self.lamda, self.hyper_m = float(lamda), float(hyper_m)

    def params(self):
        p = {**super().params(), "regions": self.regions, "salient": "order-2 residual, searched columns"}
        if self.nm:
            p.update(importance=self.importance, layerwise_nm=self.layerwise)
            if self.layerwise:
                p.update(layerwise_lamda=self.lamda, layerwise_hyper_m=self.hyper_m)
        if self.params_bits != 16:
            p["params_bits"] = self.params_bits
        if self.label_coder != LABEL_CODERS[0]:
            p["label_coder"] = self.label_coder
        return p

    def quantize(self, w, u, keep, h=None):
        """w: float32 torch [rows, cols]; u: upper Cholesky factor of the damped inverse Hessian; keep: bool keep-mask
        or None; h: the layer input's Hessian (2/N) sum x x^T, undamped. Returns a binarize.GroupsResult."""
        from .binarize import quantize_groups, super_scales

        result = quantize_groups(w, u, keep, self.regions, self.block)
        if self.params_bits == 16:
            return result
        # The scales need every block's params, which exist only after the pass: quantize again under the first
        # pass's scales (a param beyond its scale's range takes code ±127).
        return quantize_groups(w, u, keep, self.regions, self.block, param_scales=super_scales(result.params))

    def write(self, writer, name: str, result, nm) -> None:
        params = result.params.numpy()
        scales = None if result.param_scales is None else result.param_scales.numpy()
        if not np.isfinite(params).all() or (scales is not None and not np.isfinite(scales).all()):
            raise ConvertError(f"tensor {name}: a scale or mean overflows float16")
        writer.add_binary_groups(name, signs=result.signs.numpy(), labels=result.labels.numpy(),
                                 salient=result.salient.numpy(), residual=result.residual.numpy(),
                                 params=params.astype(np.float16), regions=result.regions, block=result.block,
                                 mask=None if result.keep is None else result.keep.numpy(), nm=nm,
                                 param_scales=None if scales is None else scales.astype(np.float16),
                                 label_coder=None if self.label_coder == "fixed" else self.label_coder,
                                 salient_labels=None if result.salient_labels is None
                                 else result.salient_labels.numpy())


@register("billm")
class BiLLM(CalibratedMethod):
    """BiLLM: salient columns at order 2, the rest split in two by a searched break point (bell-shaped split).
    With --nm the mask is chosen by --importance (default magnitude), the same N:M in every layer."""

    regions = 2
    default_importance = "magnitude"
    default_layerwise = False


@register("stbllm")
class STBLLM(CalibratedMethod):
    """STBLLM: N:M by Standardized Importance with layer-wise allocation, salient columns at order 2, the rest
    split in three (dense / intermediate / sparse) by searched break points p1 and 2*p1."""

    regions = 3

    def __init__(self, nm=None, block=128, **options):
        if nm is None:
            raise ConvertError("--method stbllm needs --nm N:M (N kept of M, e.g. 6:8); for dense binarization "
                               "use --method billm")
        super().__init__(nm, block, **options)


class ARBMethod(CalibratedMethod):
    """ARB-LLM's methods: BiLLM's structure (searched salient columns at order 2, the rest split in two by a searched
    break point), each part binarized by alternating refinement (arb.py); --arb-iters rounds (default 15)."""

    default_importance = "magnitude"
    default_layerwise = False
    default_params_bits = 16  # its alternating refinement has no 8-bit second pass

    def __init__(self, nm=None, block=128, arb_iters=None, **options):
        from .arb import ARB_ITERS

        super().__init__(nm, block, **options)
        if self.params_bits != 16:
            raise ConvertError(f"--params-bits {self.params_bits} needs billm, stbllm, q2, q3 or q4, not {self.name}")
        self.arb_iters = ARB_ITERS if arb_iters is None else int(arb_iters)
        if self.arb_iters < 0:
            raise ConvertError(f"--arb-iters {self.arb_iters}: must be >= 0")

    def params(self):
        return {**super().params(), "arb_iters": self.arb_iters}


@register("arb-x")
class ARBX(ARBMethod):
    """ARB-X: after the weight-space rounds, as many rounds refine each part's mean and scales under the block's
    input Gram matrix S (the diagonal block of the Hessian the driver accumulates while it streams the calibration
    inputs). Second order shares one mean: stored in stb.binary-groups.v2 as mu1 = mu, mu2 = 0. With cgb (ARB-LLM's
    column-group bitmap) each block's salient weights are split by a searched magnitude break point into two
    groups with their own order-2 params (stb.binary-groups.v2 with salient_groups 2)."""

    regions = 2

    def __init__(self, nm=None, block=128, cgb=False, **options):
        super().__init__(nm, block, **options)
        self.cgb = bool(cgb)

    def quantize(self, w, u, keep, h=None):
        from .arb import arb_binarize
        from .binarize import quantize_groups

        def binarizer(x, mask, order, gram):
            return arb_binarize(x, mask, order, self.arb_iters, gram)
        return quantize_groups(w, u, keep, self.regions, self.block, binarizer=binarizer, h=h,
                               salient_groups=2 if self.cgb else 1)

    def params(self):
        p = {**super().params(), "salient": "order-2 alternating refinement (shared mean), searched columns",
             "refinement": "ARB-X (input Gram matrix per block)"}
        if self.cgb:
            p["salient_groups"] = "CGB: high/low magnitude split of each block's salient weights, searched"
        return p


@register("arb-rc")
class ARBRC(ARBMethod):
    """ARB-RC: per block W ~ diag(a_r) B diag(a_c) on all kept weights plus a second row-column plane on the
    searched salient columns (order 2), no mean, alternating refinement; stored as stb.row-col-sign.v1, which the
    runtime multiplies by scaling the input by a_c and running the sign kernels. With cgb (ARB-LLM's column-group
    bitmap) each block's weights are split by searched magnitude break points into a low and a high group with
    their own row and column scales (stb.row-col-sign.v1 with groups 2: one more bit per weight)."""

    def __init__(self, nm=None, block=128, label_coder=None, cgb=False, **options):
        if label_coder is not None:
            raise ConvertError("--label-coder needs billm, stbllm or arb-x, not arb-rc (its codec has no labels)")
        super().__init__(nm, block, **options)
        self.cgb = bool(cgb)

    def quantize(self, w, u, keep, h=None):
        from .arb import quantize_rowcol

        return quantize_rowcol(w, u, keep, self.block, self.arb_iters, cgb=self.cgb)

    def params(self):
        p = {**super().params(), "salient": "order-2 row-column plane, searched columns", "regions": 1}
        if self.cgb:
            p["scale_groups"] = "CGB: high/low magnitude split of each block's weights, searched, own row/col scales"
        return p

    def write(self, writer, name, result, nm):
        from .arb import ROWCOL_SCALES

        salient = result.salient.numpy()

        def stored(scales):  # fp16 arrays as the codec takes them (b_c of the salient columns only)
            arrays = {k: scales[k].numpy() for k in ROWCOL_SCALES}
            if not all(np.isfinite(a).all() for a in arrays.values()):
                raise ConvertError(f"tensor {name}: a scale overflows float16")
            arrays["residual_col_scales"] = arrays["residual_col_scales"][salient]
            return {k: a.astype(np.float16) for k, a in arrays.items()}
        writer.add_row_col_sign(name, result.signs.numpy(), block=result.block,
                                mask=None if result.keep is None else result.keep.numpy(), nm=nm,
                                salient=salient, residual=result.residual.numpy()[:, salient],
                                **stored({k: getattr(result, k) for k in ROWCOL_SCALES}),
                                group=None if result.group is None else result.group.numpy(),
                                group1=None if result.group1 is None else stored(result.group1))


@register("onebit-svid")
class OneBitSVID(Method):
    """OneBit's sign-value-independent decomposition: W ~ sign(W) * (a b^T) with a, b the rank-1 non-negative
    factors of |W| (power iteration, or --svid nmf), stored as stb.row-col-sign.v1 (one sign bit per weight, a and
    b in fp16). --kd-steps K > 0 then distils the original model into it on the calibration text."""

    def __init__(self, nm=None, block=128, svid=None, kd_steps=None, kd_lr=None):
        if nm is not None:
            raise ConvertError("--method onebit-svid keeps every weight; --nm is not supported")
        super().__init__(None, block)
        self.svid = svid or "power"
        if self.svid not in ("power", "nmf"):
            raise ConvertError(f"--svid {self.svid}: choose power or nmf")
        self.kd_steps = int(kd_steps or 0)
        self.kd_lr = float(kd_lr) if kd_lr is not None else 1e-4
        self.pending: dict = {}  # factors awaiting distillation
        if self.kd_steps < 0:
            raise ConvertError(f"--kd-steps {self.kd_steps}: must be >= 0")

    def params(self):
        p = {"nm": None, "block": None, "svid": self.svid, "kd_steps": self.kd_steps}
        if self.kd_steps:
            p["kd_lr"] = self.kd_lr
        return p

    def factors(self, w: np.ndarray):
        """(signs bool, a [rows], b [cols]) float32, a and b rounded to fp16 as the file stores them."""
        import torch

        from .arb import rank1_nonnegative

        t = torch.from_numpy(np.asarray(w, dtype=np.float32))
        a, b = rank1_nonnegative(t.abs(), self.svid)
        return w >= 0, to_f16("a", a.numpy()).astype(np.float32), to_f16("b", b.numpy()).astype(np.float32)

    def add_factors(self, writer, name, signs, a, b):
        cols = signs.shape[1]
        block = rowcol_single_block(cols)
        row_scales = np.repeat(a[:, None], -(-cols // block), axis=1)
        writer.add_row_col_sign(name, signs, to_f16(name + " (a)", row_scales), to_f16(name + " (b)", b),
                                block=block)

    def add_linear(self, writer, name, w):
        if self.kd_steps:  # written after the distillation (finish)
            self.pending[name] = self.factors(w)
        else:
            self.add_factors(writer, name, *self.factors(w))

    def finish(self, writer, context):
        if not self.kd_steps:
            return {}
        import torch

        from .calibrate import calibration_windows, source_model
        from .kd import distill

        options = context.calibration
        options.check()
        torch.manual_seed(options.seed)
        windows, paths = calibration_windows(context.tokenizer(), options.texts, options.samples, options.seqlen,
                                             options.seed)
        teacher = source_model(context.src, context.arch, context.config, context.plan)
        trained, log = distill(teacher, context.plan, self.pending, windows, self.kd_steps, self.kd_lr,
                               context.progress)
        for name, (signs, a, b) in trained.items():
            self.add_factors(writer, name, signs, to_f16(name + " (a)", a).astype(np.float32),
                             to_f16(name + " (b)", b).astype(np.float32))
        self.pending.clear()
        return {"kd": log, "calibration": {"text": [p.name for p in paths], "samples": options.samples,
                                           "seqlen": options.seqlen, "seed": options.seed}}


def rowcol_single_block(cols: int) -> int:
    """The block that gives one row scale per row (up to 4096 columns; wider rows repeat it per block)."""
    return min(4096, -(-cols // 64) * 64)


GROUPS = (32, 64, 128)


def check_group(group: int) -> int:
    group = int(group)
    if group % 32 or not 32 <= group <= 4096:
        raise ConvertError(f"--group {group}: must be a multiple of 32 between 32 and 4096 (e.g. 32, 64, 128)")
    return group


class QGroupMethod(Method):
    """k-bit group quantization (stb.qgroup.v1): per (row, group of --group input columns) an fp16 scale and offset,
    w = scale · code + offset; k + 32/group honest bits per weight. GPTQ error compensation with act-order on the
    calibration driver (qgroup_quant.py); the -rtn variants round to nearest without calibration. With params_bits
    8 the scales and offsets are 8-bit codes under one fp16 step per row each (k + 16/group bits, plus 32 per row),
    the steps taken from a round-to-nearest fit of the weights (qgroup_quant.row_grid)."""

    bits = 0
    calibrated = True

    def __init__(self, nm=None, block=128, group=64, params_bits=None, **options):
        if nm is not None:
            raise ConvertError(f"--nm needs a binarizing method; {self.name} keeps every weight")
        super().__init__(None, block, **options)
        self.group = check_group(group)
        self.params_bits = 16 if params_bits is None else int(params_bits)
        if self.params_bits not in (8, 16):
            raise ConvertError(f"--params-bits {self.params_bits}: choose 16 or 8")

    def params(self):
        p = {"nm": None, "block": None, "bits": self.bits, "group": self.group,
             "quantizer": "gptq" if self.calibrated else "round-to-nearest"}
        if self.params_bits != 16:
            p["params_bits"] = self.params_bits
        return p

    def grid(self, w, importance=None):
        """The per-row steps of 8-bit params for w (None with fp16 params)."""
        from .qgroup_quant import row_grid

        return None if self.params_bits == 16 else row_grid(w.float(), self.bits, self.group, importance)

    def quantize(self, w, u, keep, h=None):
        from .qgroup_quant import act_order_factor, quantize_gptq, quantize_rtn

        if not self.calibrated:
            return quantize_rtn(w, self.bits, self.group, grid=self.grid(w))
        if h is None:  # no Hessian: column order with the given factor
            return quantize_gptq(w, u, self.bits, self.group, grid=self.grid(w))
        order, factor = act_order_factor(h)
        return quantize_gptq(w, factor, self.bits, self.group, h.diagonal(), order, self.grid(w, h.diagonal()))

    def write(self, writer, name, result, nm) -> None:
        grid = result.param_scales
        writer.add_qgroup(name, result.codes.numpy(), result.scales.numpy().astype(np.float16),
                          result.offsets.numpy().astype(np.float16), self.bits, self.group,
                          None if grid is None else grid.numpy().astype(np.float16))

    def add_linear(self, writer, name, w):
        import torch

        from .qgroup_quant import quantize_rtn

        w = torch.from_numpy(np.asarray(w, np.float32))
        self.write(writer, name, quantize_rtn(w, self.bits, self.group, grid=self.grid(w)), None)


for _bits in (2, 3, 4):
    register(f"q{_bits}")(type(f"Q{_bits}", (QGroupMethod,), {"bits": _bits, "__doc__": QGroupMethod.__doc__}))
    register(f"q{_bits}-rtn")(type(f"Q{_bits}Rtn", (QGroupMethod,), {"bits": _bits, "calibrated": False,
                                                                      "__doc__": QGroupMethod.__doc__}))


def method_class(name: str) -> type:
    if name not in _METHODS:
        raise ConvertError(f"unknown method {name!r}; available: {', '.join(_METHODS)}")
    return _METHODS[name]


def make_method(name: str, nm=None, block: int = 128, **options) -> Method:
    """options: importance, layerwise, lamda, hyper_m regions (binary calibrated methods), arb_iters (arb-x, arb-rc), group
    (q2/q3/q4), svid, kd_steps, kd_lr (onebit-svid); None values are ignored."""
    return method_class(name)(nm=nm, block=block, **{k: v for k, v in options.items() if v is not None})
