"""Quantization methods. A method turns one decoder linear weight (name, float32 [rows, cols] matrix, `cols` along
the input dimension) into writer calls; embeddings stay fp16 and the LM head too, unless a method overrides
`add_head`. Calibrated methods (later) override `add_layer`, which the layer-by-layer driver calls once per decoder
layer with all of that layer's linear weights.

Register a method with `register("name")`; `make_method(name, nm=..., block=...)` builds one.
"""
from __future__ import annotations

import math
import re

import numpy as np

from .errors import ConvertError

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
    """Keep-mask (bool, same shape as w): in each aligned group of m weights along a row keep the n largest |w|
    (ties: the lower column); a ragged last group of g weights keeps ceil(n*g/m)."""
    rows, cols = w.shape
    groups = -(-cols // m)
    a = np.full((rows, groups * m), -1.0, dtype=np.float32)  # padding sorts after every real |w| >= 0
    a[:, :cols] = np.abs(w)
    a = a.reshape(rows, groups, m)
    order = np.argsort(-a, axis=2, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(m), order.shape), axis=2)
    keep_count = np.full(groups, n)
    tail = cols - (groups - 1) * m
    if tail < m:
        keep_count[-1] = math.ceil(n * tail / m)
    keep = ranks < keep_count[None, :, None]
    return keep.reshape(rows, groups * m)[:, :cols]


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


class Method:
    """Base class: fp16 everywhere. Subclasses override `add_linear` (and `add_layer` / `add_head` if needed)."""

    name = "base"

    def __init__(self, nm: tuple[int, int] | None = None, block: int = 128):
        self.nm = nm
        self.block = check_block(block)

    def params(self) -> dict:
        """Method parameters recorded in provenance."""
        return {"nm": list(self.nm) if self.nm else None, "block": self.block}

    def add_linear(self, writer, name: str, w: np.ndarray) -> None:
        writer.add_f16(name, to_f16(name, w))

    def add_layer(self, writer, index: int, linears: dict[str, np.ndarray]) -> None:
        """All linear weights of decoder layer `index` ({canonical name: float32 matrix}), in the plan's order."""
        for name, w in linears.items():
            self.add_linear(writer, name, w)

    def add_head(self, writer, name: str, w: np.ndarray) -> None:
        writer.add_f16(name, to_f16(name, w))


@register("fp16")
class FP16(Method):
    """Passthrough: every linear weight fp16 (the quality ceiling)."""

    def __init__(self, nm=None, block=128):
        if nm is not None:
            raise ConvertError("--nm needs a binarizing method (e.g. --method sign); fp16 keeps every weight")
        super().__init__(None, block)

    def params(self):
        return {"nm": None, "block": None}


@register("sign")
class Sign(Method):
    """Per-(row, block) sign binarization, optionally N:M-pruned (the floor every real method must beat)."""

    def add_linear(self, writer, name, w):
        signs, scales, mask = sign_quantize(w, self.block, self.nm)
        scales16 = to_f16(name + " (scales)", scales)
        writer.add_sign_block(name, signs, scales16, mask=mask, block=self.block, nm=self.nm)


def make_method(name: str, nm=None, block: int = 128) -> Method:
    if name not in _METHODS:
        raise ConvertError(f"unknown method {name!r}; available: {', '.join(_METHODS)}")
    return _METHODS[name](nm=nm, block=block)
