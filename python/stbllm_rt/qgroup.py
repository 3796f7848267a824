"""stb.qgroup.v1 (docs/format.md): k-bit group quantization, w = scale · code + offset with one fp16 scale and offset
per (row, group of input columns). Pure numpy packing and unpacking of the codes; the C++ reader
(engine/format/qgroup.cpp) decodes the same bytes for the runtime.

Codes are stored densely in chunks of 32 columns, 4·k bytes each, in the order one SIMD load turns into 32 byte
lanes: k = 4 puts column i in the low nibble of byte i and column 16 + i in its high nibble; k = 2 puts column
8s + i in bits 2s..2s+1 of byte i; k = 3 stores the low two bits as k = 2 does, then a u32 of the third bits.
"""
from __future__ import annotations

import numpy as np

from ._core import FormatError

CODEC = "stb.qgroup.v1"
CHUNK = 32
BITS = (2, 3, 4)


def check_params(bits: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group % CHUNK or not CHUNK <= group <= 4096:
        raise ValueError(f"group must be a multiple of {CHUNK} in [{CHUNK}, 4096], got {group}")


def row_bytes(cols: int, bits: int) -> int:
    return -(-cols // CHUNK) * 4 * bits


def _two_bit_plane(codes: np.ndarray) -> np.ndarray:
    """uint8 [rows, chunks, 32] codes (low two bits used) -> [rows, chunks, 8] bytes: byte i = sum_s c[8s+i] << 2s."""
    c = codes.reshape(*codes.shape[:2], 4, 8).astype(np.uint8) & 3
    return (c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6).astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] in [0, 2^bits) -> the `codes` component [rows, row_bytes(cols, bits)]."""
    rows, cols = codes.shape
    chunks = -(-cols // CHUNK)
    padded = np.zeros((rows, chunks * CHUNK), np.uint8)
    padded[:, :cols] = codes
    c = padded.reshape(rows, chunks, CHUNK)
    if bits == 4:
        out = c[:, :, :16] | (c[:, :, 16:] << 4)
    else:
        out = _two_bit_plane(c)
        if bits == 3:
            high = np.packbits((c >> 2) & 1, axis=2, bitorder="little")  # 4 bytes: the little-endian u32
            out = np.concatenate([out, high], axis=2)
    return np.ascontiguousarray(out.reshape(rows, -1))


def unpack_codes(packed: np.ndarray, rows: int, cols: int, bits: int) -> np.ndarray:
    """Inverse of pack_codes: all chunk columns, padding included: uint8 [rows, chunks * 32]."""
    chunks = -(-cols // CHUNK)
    p = np.asarray(packed, np.uint8).reshape(rows, chunks, 4 * bits)
    if bits == 4:
        codes = np.concatenate([p & 0xF, p >> 4], axis=2)
    else:
        low = p[:, :, :8]
        codes = np.concatenate([(low >> (2 * s)) & 3 for s in range(4)], axis=2)
        if bits == 3:
            codes |= np.unpackbits(p[:, :, 8:], axis=2, bitorder="little") << 2
    return codes.reshape(rows, chunks * CHUNK)


def dequantize(codes_component, scales_component, offsets_component, shape, params) -> np.ndarray:
    """The tensor as float32, float(scale) · code + float(offset) (product rounded, then the sum), after the checks
    the C++ reader makes: finite scales and offsets, zero codes past the last column."""
    rows, cols = shape
    bits, group = params["bits"], params["group"]
    groups = -(-cols // group)
    scales = np.asarray(scales_component).view("<f2").reshape(rows, groups).astype(np.float32)
    offsets = np.asarray(offsets_component).view("<f2").reshape(rows, groups).astype(np.float32)
    for what, values in (("scales", scales), ("offsets", offsets)):
        if not np.isfinite(values).all():
            raise FormatError(f"{what} hold a non-finite value")
    codes = unpack_codes(codes_component, rows, cols, bits)
    if codes[:, cols:].any():
        raise FormatError("a code past the last column is not zero")
    per_col = lambda a: np.repeat(a, group, axis=1)[:, :cols]  # noqa: E731
    return per_col(scales) * codes[:, :cols].astype(np.float32) + per_col(offsets)
