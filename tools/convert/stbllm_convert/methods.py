"""Quantization methods. A method turns one decoder linear weight (name, float32 [rows, cols] matrix, `cols` along
the input dimension) into writer calls (embeddings and the LM head: convert.add_table). Without calibration, `add_layer` runs once per decoder layer with all of that layer's linear weights.
Inside the layer-by-layer calibration driver (calibrate.py; needed when any linear's method is `calibrated`:
billm, stbllm, q2/q3/q4) every method gets each of its linears' weight, inverse-Hessian factor, keep-mask and
input second moments in `quantize` (plain methods ignore all but the weight) and the result in `write`; the
result's `q` (the dequantized weight) feeds the next layer.

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

    def cpu(self) -> "PlainResult":
        return self


class Method:
    """Base class: fp16 everywhere. Subclasses override `add_linear` and `dequantized` (or `quantize` and `write`
    when calibrated)."""

    name = "base"
    calibrated = False

    def __init__(self, nm: tuple[int, int] | None = None, block: int = 128, **options):
        if options:
            option = next(iter(options))
            needs = "a q2, q3 or q4 method" if option == "group" else "a calibrated method (stbllm or billm)"
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

    def quantize(self, w, u, keep, input_moments):
        """In the calibration driver: w is a float32 torch weight; the rest is for calibrated methods."""
        import torch

        weight = w.cpu().numpy()
        return PlainResult(q=torch.from_numpy(self.dequantized("weight", weight)).to(w.device), weight=weight,
                           stats={})

    def write(self, writer, name: str, result, nm) -> None:
        self.add_linear(writer, name, result.weight)



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
    the requested average), lamda / hyper_m (the allocation's spread and outlier threshold)."""

    calibrated = True
    regions = 0
    default_importance = "si"
    default_layerwise = True

    def __init__(self, nm=None, block=128, importance=None, layerwise=None, lamda=2.0, hyper_m=6.0, **options):
        from .binarize import IMPORTANCE

        super().__init__(nm, block, **options)
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
        return p

    def quantize(self, w, u, keep, input_moments=None):
        """w: float32 torch [rows, cols]; u: upper Cholesky factor of the damped inverse Hessian; keep: bool keep-mask
        or None. Returns a binarize.GroupsResult."""
        from .binarize import quantize_groups

        return quantize_groups(w, u, keep, self.regions, self.block)

    def write(self, writer, name: str, result, nm) -> None:
        params = result.params.numpy()
        if not np.isfinite(params).all():
            raise ConvertError(f"tensor {name}: a scale or mean overflows float16")
        writer.add_binary_groups(name, signs=result.signs.numpy(), labels=result.labels.numpy(),
                                 salient=result.salient.numpy(), residual=result.residual.numpy(),
                                 params=params.astype(np.float16), regions=result.regions, block=result.block,
                                 mask=None if result.keep is None else result.keep.numpy(), nm=nm)


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


GROUPS = (32, 64, 128)


def check_group(group: int) -> int:
    group = int(group)
    if group % 32 or not 32 <= group <= 4096:
        raise ConvertError(f"--group {group}: must be a multiple of 32 between 32 and 4096 (e.g. 32, 64, 128)")
    return group


class QGroupMethod(Method):
    """k-bit group quantization (stb.qgroup.v1): per (row, group of --group input columns) an fp16 scale and offset,
    w = scale · code + offset; k + 32/group honest bits per weight. GPTQ error compensation on the calibration
    driver (qgroup_quant.py); the -rtn variants round to nearest without calibration."""

    bits = 0
    calibrated = True

    def __init__(self, nm=None, block=128, group=64, **options):
        if nm is not None:
            raise ConvertError(f"--nm needs a binarizing method; {self.name} keeps every weight")
        super().__init__(None, block, **options)
        self.group = check_group(group)

    def params(self):
        return {"nm": None, "block": None, "bits": self.bits, "group": self.group,
                "quantizer": "gptq" if self.calibrated else "round-to-nearest"}

    def quantize(self, w, u, keep, input_moments=None):
        from .qgroup_quant import quantize_gptq, quantize_rtn

        if not self.calibrated:
            return quantize_rtn(w, self.bits, self.group)
        return quantize_gptq(w, u, self.bits, self.group, input_moments)

    def write(self, writer, name, result, nm) -> None:
        writer.add_qgroup(name, result.codes.numpy(), result.scales.numpy().astype(np.float16),
                          result.offsets.numpy().astype(np.float16), self.bits, self.group)

    def add_linear(self, writer, name, w):
        import torch

        from .qgroup_quant import quantize_rtn

        self.write(writer, name, quantize_rtn(torch.from_numpy(np.asarray(w, np.float32)), self.bits, self.group),
                   None)


for _bits in (2, 3, 4):
    register(f"q{_bits}")(type(f"Q{_bits}", (QGroupMethod,), {"bits": _bits, "__doc__": QGroupMethod.__doc__}))
    register(f"q{_bits}-rtn")(type(f"Q{_bits}Rtn", (QGroupMethod,), {"bits": _bits, "calibrated": False,
                                                                      "__doc__": QGroupMethod.__doc__}))


def method_class(name: str) -> type:
    if name not in _METHODS:
        raise ConvertError(f"unknown method {name!r}; available: {', '.join(_METHODS)}")
    return _METHODS[name]


def make_method(name: str, nm=None, block: int = 128, **options) -> Method:
    """options: importance, layerwise, lamda, hyper_m (billm, stbllm), group (q2/q3/q4); None values are ignored."""
    return method_class(name)(nm=nm, block=block, **{k: v for k, v in options.items() if v is not None})
